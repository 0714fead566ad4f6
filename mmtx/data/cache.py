"""Decode once, reuse afterwards: tensor caches keyed by their source's fingerprint.

A cache file holds a dict of tensors and plain values plus the fingerprint of
the source it was built from. A load whose fingerprint differs (files added,
removed or modified) rebuilds it. Writes go to a temporary file in the same
folder and are renamed into place, so an interrupted build never leaves a
half-written cache behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """A short stable hash of the parts' string forms."""
    h = hashlib.sha1()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_build(
    path: str | os.PathLike, fingerprint: str, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Return the cache at `path` if it was built from `fingerprint`, else build and save it.

    A lock file beside the cache makes processes that need the same cache at once (the ranks of
    a torchrun or SLURM job) wait for the one that builds it instead of building it again.
    """
    from filelock import FileLock

    path = Path(path)
    cached = _load(path, fingerprint)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        cached = _load(path, fingerprint)  # built by another process while this one waited
        if cached is not None:
            return cached
        data = dict(build(), fingerprint=fingerprint)
        atomic_save(data, path)
    log.info("cached %s", path)
    return data


def _load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if cached.get("fingerprint") == fingerprint:
        return cached
    log.info("source changed since cache %s was built; rebuilding it", path)
    return None
