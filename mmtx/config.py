"""Find and compose the Hydra configuration from Python (notebooks, benchmarks, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

# Resolvers the sweep and launcher configs use: the Optuna direction of a checkpoint mode, and a
# device count for SLURM (trainer.devices=auto means one).
OmegaConf.register_new_resolver(
    "mmtx_direction", lambda mode: "maximize" if str(mode) == "max" else "minimize", replace=True)
OmegaConf.register_new_resolver(
    "launcher_devices", lambda devices: 1 if str(devices) in ("auto", "-1") else int(devices), replace=True)


def config_dir() -> str:
    """The `conf/` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mmtx configuration not found (looked in {here / 'conf'} and {here.parent / 'conf'})")


def compose(task: str = "vit_cifar", overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the run configuration exactly as `python -m mmtx.train task=TASK OVERRIDES...` would.

    >>> cfg = compose("vit_cifar", ["backbone=tiny", "data.batch_size=64"])
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=[f"task={task}", *overrides])
