"""Checkpoints that survive being killed mid-write, and finding the one to resume from."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmtx.data.cache import atomic_save

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but local files are written to a temporary name and renamed.

    A run killed while saving leaves the previous `last.ckpt` intact rather
    than a truncated one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def check_checkpoint(path: str | Path) -> Path:
    """Fail with one clear message if `path` is missing or not a readable checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint ({err})") from err
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupt (member {bad} fails its CRC check)")
    return path


def find_resume(resume: str | None, output_root: str | Path, task_name: str, exclude: Path | None = None) -> str | None:
    """The checkpoint to resume from: None, an explicit path, or `auto` (the task's newest last.ckpt)."""
    if resume in (None, "", False):
        return None
    if resume != "auto":
        return str(check_checkpoint(resume))
    root = Path(output_root) / task_name
    found = [
        p for p in root.glob("**/checkpoints/last.ckpt")
        if exclude is None or exclude.resolve() not in p.resolve().parents
    ]
    if not found:
        raise FileNotFoundError(
            f"resume=auto: no previous run of task {task_name!r} with a checkpoints/last.ckpt under {root}"
        )
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(check_checkpoint(newest))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by mmtx.train onto the CPU, with its run configuration."""
    path = check_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "mmtx_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} has no mmtx run configuration (was it written by mmtx.train?)")
    return checkpoint
