"""Find and compose the Hydra configuration from Python (notebooks, benchmarks, tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

# Resolvers the sweep and launcher configs use: the Optuna direction of a checkpoint mode, and a
# device count for SLURM (trainer.devices=auto means one).
OmegaConf.register_new_resolver(
    "mmtx_direction", lambda mode: "maximize" if str(mode) == "max" else "minimize", replace=True)
OmegaConf.register_new_resolver(
    "launcher_devices", lambda devices: 1 if str(devices) in ("auto", "-1") else int(devices), replace=True)


_CLAIMED: dict[str, str] = {}


def claim_dir(path: str) -> str:
    """`path`, or `path_1`, `path_2`, ... if it is taken: created here, atomically (`os.mkdir` fails when
    the folder exists), so two runs started in the same second never share a run folder.

    Used by `hydra.run.dir` and `hydra.sweep.dir` (`${mmtx_unique_dir:...}`). The same path asked for
    again in one process (Hydra resolves the folder more than once) gets the same answer.
    """
    if path in _CLAIMED:
        return _CLAIMED[path]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = path if n == 0 else f"{path}_{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        _CLAIMED[path] = candidate
        return candidate
    raise FileExistsError(f"no free run folder name left for {path}")


OmegaConf.register_new_resolver("mmtx_unique_dir", claim_dir, replace=True, use_cache=True)


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
