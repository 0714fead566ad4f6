"""Logger factories whose defaults need no account and no network."""

from __future__ import annotations

import netrc
import os


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
):
    """Lightning's WandbLogger, offline when no API key is configured (offline=None).

    Offline runs are written under `<run dir>/wandb` and can be uploaded later
    with `wandb sync`.
    """
    from lightning.pytorch.loggers import WandbLogger  # imports wandb: only when this logger is chosen

    if offline is None:
        offline = not _has_wandb_key()
    return WandbLogger(
        save_dir=save_dir, project=project, entity=entity, group=group, tags=list(tags or []),
        name=name, offline=offline, log_model=log_model and not offline,
    )
