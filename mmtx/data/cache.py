"""Decode once, reuse afterwards: tensor caches keyed by their source's fingerprint, verified on every load.

A cache file holds a dict of tensors and plain values, the fingerprint of the source it was built from, and
the size and SHA-256 checksum of its contents (`mmtx_cache`). A load whose fingerprint differs (files added,
removed or modified) rebuilds it; so does one whose contents no longer match their checksum (a file damaged or
truncated on disk), with a warning naming it. A cache folder (a text split's token files, a tokenizer) records
the size and checksum of every file in `checksums.json` and is verified and rebuilt the same way. Writes go to a
temporary file or folder in the same place and are renamed into place, so an interrupted build never leaves a
half-written cache behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mmtx.files import atomic_save, building_dir, check_writable, remove_orphans

log = logging.getLogger(__name__)

CHECKSUM_KEY = "mmtx_cache"  # {"bytes": the contents' size, "sha256": their checksum} in a cache file
MANIFEST = "checksums.json"  # {file name: {"bytes", "sha256"}} of every file in a cache folder
CACHE_HINT = "paths.cache_dir"  # where caches go: the key a message about them names


def digest(*parts: Any) -> str:
    """A short stable hash of the parts' string forms."""
    h = hashlib.sha1()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# Caches this process found whole, each with its files' sizes and times: checked once a process (a data module
# loads a cache in prepare_data and again in setup) while its files stay as they were.
_WHOLE: set[tuple] = set()


def _stamp(path: Path) -> tuple:
    """A cache file's or folder's identity and its files' sizes and modification times."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return (str(path), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


# -- cache files --------------------------------------------------------------------------------------------

_BLOCK = 1 << 24  # bytes hashed per thread: large buffers are hashed in parallel blocks (hashlib frees the GIL)


def block_digest(raw: memoryview) -> bytes:
    """SHA-256 of the SHA-256 digests of `raw`'s 16 MiB blocks, hashed by as many threads as there are cores."""
    blocks = [raw[i:i + _BLOCK] for i in range(0, len(raw), _BLOCK)] or [raw]
    if len(blocks) == 1:
        return hashlib.sha256(blocks[0]).digest()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1)) as pool:
        return hashlib.sha256(b"".join(pool.map(lambda b: hashlib.sha256(b).digest(), blocks))).digest()


def content_checksum(data: dict[str, Any]) -> dict[str, Any]:
    """The size and checksum of a cache's contents: every entry but the checksum itself, in key order; a tensor by
    its dtype, shape and bytes (`block_digest`), anything else by its string form; SHA-256 over all of it."""
    h, size = hashlib.sha256(), 0
    for key in sorted(k for k in data if k != CHECKSUM_KEY):
        value = data[key]
        h.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(block_digest(memoryview(raw).cast("B")))
            size += raw.nbytes
        else:
            text = str(value).encode()
            h.update(text)
            size += len(text)
    return {"bytes": size, "sha256": h.hexdigest()}


def load_or_build(
    path: str | os.PathLike, fingerprint: str, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Return the cache at `path` if it was built from `fingerprint` and its contents match their checksum, else
    build and save it (a damaged cache is rebuilt with a warning naming it).

    A lock file beside the cache makes processes that need the same cache at once (the ranks of
    a torchrun or SLURM job) wait for the one that builds it instead of building it again.
    """
    from filelock import FileLock

    path = Path(path)
    cached = _load(path, fingerprint)
    if cached is not None:
        _report_skipped(path, cached)
        return cached
    check_writable(path.parent, "the data cache folder", hint=CACHE_HINT)  # before anything is decoded
    with FileLock(str(path) + ".lock"):
        remove_orphans(path)
        cached = _load(path, fingerprint, quiet=True)  # built by another process while this one waited
        if cached is not None:
            _report_skipped(path, cached)
            return cached
        data = dict(build(), fingerprint=fingerprint)
        data[CHECKSUM_KEY] = content_checksum(data)
        atomic_save(data, path, hint=CACHE_HINT)
        _WHOLE.add(_stamp(path))  # just written: whole
    log.info("cached %s", path)
    return data


def _report_skipped(path: Path, cached: dict[str, Any]) -> None:
    """Repeat, for every run that trains on a cache, the warning its build gave about skipped files
    (the cache records them as `skipped`)."""
    skipped = cached.get("skipped") or []
    if skipped:
        log.warning("%d unreadable file(s) were skipped when cache %s was built, e.g. %s",
                    len(skipped), path, list(skipped)[:3])


def _load(path: Path, fingerprint: str, quiet: bool = False) -> dict[str, Any] | None:
    if not path.exists():
        return None
    stamp = _stamp(path)
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)  # nothing in the file can run
    except pickle.UnpicklingError as err:  # it needs a Python global: not a cache mmtx wrote
        log.warning("cache %s holds something other than tensors and plain values, which mmtx never loads "
                    "(%s); rebuilding it", path, str(err).splitlines()[-3:])
        return None
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint:
        if not quiet:
            log.info("source changed since cache %s was built; rebuilding it", path)
        return None
    recorded = cached.get(CHECKSUM_KEY)
    if not isinstance(recorded, dict):
        log.warning("cache %s records no checksum of its contents (an older mmtx wrote it); rebuilding it", path)
        return None
    if stamp in _WHOLE:
        return cached
    actual = content_checksum(cached)
    if actual != recorded:
        log.warning("cache %s does not match the size and checksum recorded when it was built (%s bytes, sha256 %s; "
                    "now %s bytes, %s): it was damaged or changed on disk; rebuilding it", path, recorded.get("bytes"),
                    str(recorded.get("sha256"))[:12], actual["bytes"], actual["sha256"][:12])
        return None
    _WHOLE.add(stamp)
    return cached


# -- cache folders ------------------------------------------------------------------------------------------

def file_checksum(path: Path) -> dict[str, Any]:
    """A file's size and checksum (`block_digest` of its bytes, read through a memory map)."""
    import mmap

    size = path.stat().st_size
    if size == 0:
        return {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as view:
            digest = block_digest(view)
    return {"bytes": size, "sha256": digest.hex()}


def seal(folder: Path) -> None:
    """Record the size and checksum of every file of `folder` in its `checksums.json` (the last file written)."""
    manifest = {p.name: file_checksum(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a cache folder (a file missing, truncated or changed since `seal`), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"it has no readable {MANIFEST} (an older mmtx, or an interrupted copy, wrote it)"
    for name, recorded in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded.get("bytes"):
            return f"{name} holds {path.stat().st_size} bytes where {recorded.get('bytes')} were written"
        if file_checksum(path)["sha256"] != recorded.get("sha256"):
            return f"{name} does not match the checksum recorded when it was written"
    return None


def verified(folder: Path, quiet: bool = False) -> bool:
    """Whether the cache folder exists and is whole (checked once a process while its files stay as they were);
    a damaged one is named in a warning (unless `quiet`) and rebuilt by `cache_folder`."""
    if not folder.is_dir():
        return False
    stamp = _stamp(folder)
    if stamp in _WHOLE:
        return True
    problem = damage(folder)
    if problem:
        if not quiet:
            log.warning("cache %s is damaged: %s; rebuilding it", folder, problem)
        return False
    _WHOLE.add(stamp)
    return True


@contextlib.contextmanager
def cache_folder(path: str | os.PathLike) -> Iterator[Path | None]:
    """Build the cache folder `path` (`mmtx.files.building_dir`: a temporary folder renamed into place, sealed with
    the checksums of its files), or yield None when a whole one is already there (built meanwhile by another
    process). Call it when `verified(path)` said no: a damaged folder there is moved aside and rebuilt."""
    path = Path(path)
    if path.is_dir():
        from filelock import FileLock

        with FileLock(str(path) + ".lock"):
            if path.is_dir() and not verified(path, quiet=True):  # still damaged now that no other process builds it
                aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # an orphan's name: cleared as one
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
    with building_dir(path, hint=CACHE_HINT) as tmp:
        if tmp is None:
            yield None
            return
        yield tmp
        seal(tmp)
    _WHOLE.add(_stamp(path))  # just built and sealed: whole
