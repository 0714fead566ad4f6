"""Logger factories whose defaults need no account and no network."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from mmtx.errors import optional


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb(
    save_dir: str,
    project: str = "mmtx",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    offline: bool | None = None,
    log_model: bool = False,
    id: str | None = None,
    task: str | None = None,
):
    """Lightning's WandbLogger, offline when no API key is configured (offline=None).

    group=None: the jobs of a Hydra multirun are grouped by sweep (`<project>/<sweep folder>`,
    e.g. `multirun/2026-11-23_10-00-00`), other runs by `task` (their task name).

    Offline runs are written under `<run dir>/wandb` and can be uploaded later
    with `wandb sync`. `id`: continue that W&B run (a resumed training run passes
    the id stored in its checkpoint, so its curves go on in the same W&B run).
    """
    optional("wandb", "wandb", "logger=wandb")  # the extra's name when it is missing, not Lightning's message
    from lightning.pytorch.loggers import WandbLogger  # imports wandb: only when this logger is chosen

    if offline is None:
        offline = not _has_wandb_key()
    if group is None:
        group = _sweep_group() or task
    return WandbLogger(
        save_dir=save_dir, project=project, entity=entity, group=group, tags=list(tags or []),
        name=name, offline=offline, log_model=log_model and not offline,
        **({"id": id, "resume": "allow"} if id else {}),
    )


def _sweep_group() -> str | None:
    """`<task>/multirun/<time>` for a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep_dir = Path(HydraConfig.get().sweep.dir)
            return f"{sweep_dir.parent.parent.name}/{sweep_dir.parent.name}/{sweep_dir.name}"
    except Exception:  # not under Hydra: no sweep
        return None
    return None
