"""File-system chores every part of mmtx shares: writes that are atomic (a temporary file or folder
renamed into place, so a killed write leaves the previous version), the removal of what killed writes
left behind, and the data root (`data.root`, else $MMTX_DATA_DIR, else ./data)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(path: str | os.PathLike) -> None:
    """Remove the temporary files and folders (`.<name>.<pid>.tmp`) that writes of `path` killed
    midway left behind. Call it only while holding `path`'s lock, when no other write of it is under way."""
    path = Path(path)
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by an interrupted write", orphan)
        if orphan.is_dir():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def building_dir(path: str | os.PathLike) -> Iterator[Path | None]:
    """Build the folder `path` atomically: yields a temporary folder to fill, renamed to `path` when the
    block ends without error (removed otherwise), or None when `path` already exists (built meanwhile by
    another process: a lock beside it makes the others wait). Orphans of killed builds are removed first.

    >>> with building_dir(folder) as tmp:
    ...     if tmp is not None:
    ...         (tmp / "meta.json").write_text("{}")
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            yield None
            return
        remove_orphans(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.mkdir()
        try:
            yield tmp
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_root(root: str | None) -> Path:
    """`data.root` if set, else $MMTX_DATA_DIR, else ./data."""
    return Path(root or os.environ.get("MMTX_DATA_DIR") or "data").expanduser()


def describe_root(root: str | None) -> str:
    """The data root as an absolute path, and where that choice came from, for messages."""
    where = resolve_root(root).resolve()
    if root:
        return f"{where} (from data.root)"
    if os.environ.get("MMTX_DATA_DIR"):
        return f"{where} (from $MMTX_DATA_DIR={os.environ['MMTX_DATA_DIR']})"
    return f"{where} (the default ./data: neither data.root nor $MMTX_DATA_DIR is set)"
