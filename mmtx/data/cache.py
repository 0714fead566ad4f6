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
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from mmtx.files import atomic_save, remove_orphans

log = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """A short stable hash of the parts' string forms."""
    h = hashlib.sha1()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


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
        _report_skipped(path, cached)
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        remove_orphans(path)
        cached = _load(path, fingerprint)  # built by another process while this one waited
        if cached is not None:
            _report_skipped(path, cached)
            return cached
        data = dict(build(), fingerprint=fingerprint)
        atomic_save(data, path)
    log.info("cached %s", path)
    return data


def _report_skipped(path: Path, cached: dict[str, Any]) -> None:
    """Repeat, for every run that trains on a cache, the warning its build gave about skipped files
    (the cache records them as `skipped`)."""
    skipped = cached.get("skipped") or []
    if skipped:
        log.warning("%d unreadable file(s) were skipped when cache %s was built, e.g. %s",
                    len(skipped), path, list(skipped)[:3])


def _load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)  # nothing in the file can run
    except pickle.UnpicklingError as err:  # it needs a Python global: not a cache mmtx wrote
        log.warning("cache %s holds something other than tensors and plain values, which mmtx never loads "
                    "(%s); rebuilding it", path, str(err).splitlines()[-3:])
        return None
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if cached.get("fingerprint") == fingerprint:
        return cached
    log.info("source changed since cache %s was built; rebuilding it", path)
    return None
