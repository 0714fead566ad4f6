"""Find and compose the Hydra configuration from Python (notebooks, benchmarks, tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mmtx.errors import StorageError, debug_errors, exit_now, in_cli
from mmtx.files import config_dir

# Resolvers the sweep and launcher configs use: the Optuna direction of a checkpoint mode, and a
# device count for SLURM (trainer.devices=auto means one).
OmegaConf.register_new_resolver(
    "mmtx_direction", lambda mode: "maximize" if str(mode) == "max" else "minimize", replace=True)
OmegaConf.register_new_resolver(
    "launcher_devices", lambda devices: 1 if str(devices) in ("auto", "-1") else int(devices), replace=True)


_CLAIMED: dict[str, str] = {}
_MADE: dict[str, list[Path]] = {}  # a claimed folder -> the parents claim_dir created for it, deepest first


def missing_parents(path: str | Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, deepest first (what creating it would make)."""
    out = []
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent.parent != parent:
        out.append(parent)
        parent = parent.parent
    return out


def claim_dir(path: str) -> str:
    """`path`, or `path_1`, `path_2`, ... if it is taken: created here, atomically (`os.mkdir` fails when
    the folder exists), so two runs started in the same second never share a run folder.

    Used by `hydra.run.dir` and `hydra.sweep.dir` (`${mmtx_unique_dir:...}`). The same path asked for
    again in one process (Hydra resolves the folder more than once) gets the same answer. A folder that
    cannot be made (a read-only or full disk) is a StorageError naming it.
    """
    if path in _CLAIMED:
        return _CLAIMED[path]
    made = missing_parents(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            candidate = path if n == 0 else f"{path}_{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _CLAIMED[path] = candidate
            _MADE[os.path.abspath(candidate)] = made
            return candidate
    except OSError as err:
        from mmtx.files import write_failure

        failure = write_failure(err, Path(path) / ".", hint="paths.output_root")
        detail = str(failure) if isinstance(failure, StorageError) else f"{type(err).__name__}: {err}"
        raise StorageError(f"cannot make the run folder {os.path.abspath(path)}: {detail}") from err
    raise FileExistsError(f"no free run folder name left for {path}")


def claimed_folders(folder: str | Path) -> list[Path]:
    """[folder, the parents made for it, deepest first] when this process made `folder` (`claim_dir`), else []."""
    key = os.path.abspath(folder)
    return [Path(key), *_MADE[key]] if key in _MADE else []


def _unique_dir(path: str) -> str:
    """The `mmtx_unique_dir` resolver: `claim_dir`; from the command line, a folder that cannot be made ends the
    command with one line (inside Hydra's resolution any exception would become a long traceback)."""
    try:
        return claim_dir(path)
    except StorageError as err:
        if in_cli() and not debug_errors():
            exit_now(f"mmtx: error: {err}")
        raise


OmegaConf.register_new_resolver("mmtx_unique_dir", _unique_dir, replace=True, use_cache=True)


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
