"""File-system chores every part of mmtx shares: writes that are atomic (a temporary file or folder
renamed into place, so a killed write leaves the previous version), writes that fail with one message
naming the file and the folder when the disk is full or read-only, folders checked for writability before
any work, the removal of what killed writes left behind (and of nothing mmtx did not write), tables
written as TSV, the data root (`data.root`, else $MMTX_DATA_DIR, else ./data), and where the shipped
configuration (conf/) is."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from mmtx.errors import StorageError

log = logging.getLogger(__name__)


# -- writes that fail clearly ---------------------------------------------------------------------------------

def size_text(n: float) -> str:
    """1.5 GB, 20.0 MB, 512 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists (what the file system can be asked about)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


# What torch.save's writer says when a write fails (it gives no errno): a full disk shows as "unexpected pos".
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing", "PytorchStreamWriter")


def write_failure(err: BaseException, path: str | os.PathLike, needed: int | None = None,
                  hint: str = "") -> BaseException:
    """What a failed write of `path` amounts to: a StorageError naming the file, its folder and, for a full disk,
    the bytes it needed and those free; `err` itself when the disk is not at fault. `hint`: where else to write
    (a config key), appended to the message."""
    if isinstance(err, StorageError):
        return err
    is_os = isinstance(err, OSError)
    if not is_os and not (isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES)):
        return err
    path = Path(os.path.abspath(path))
    folder = _existing(path.parent)
    code = getattr(err, "errno", None) if is_os else None
    try:
        stat = os.statvfs(folder)
    except OSError:
        return err
    free = stat.f_bavail * stat.f_frsize
    where = f" ({hint})" if hint else ""
    if code == errno.EROFS or stat.f_flag & os.ST_RDONLY:
        return StorageError(f"cannot write {path}: {folder} is on a read-only file system; write elsewhere{where}")
    if code in (errno.ENOSPC, errno.EDQUOT) or (needed is not None and free < needed + 2**20) or (not is_os and free < 2**20):
        need = f"it needs about {size_text(needed)}, and " if needed else ""
        return StorageError(f"cannot write {path}: no space left on the device holding {folder} ({need}{size_text(free)} "
                            f"is free); the previous {path.name}, if any, is intact. Free space there, or write "
                            f"elsewhere{where}")
    if code in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {path}: permission denied in {folder}; write elsewhere{where}")
    return err


def check_writable(folder: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Make `folder` (and its parents) and check that a file can be written in it, before any work is done:
    a StorageError naming `what` (e.g. "the run folder") and the folder otherwise."""
    folder = Path(folder).expanduser()
    probe = folder / f".mmtx-write-check.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        failure = write_failure(err, probe, hint=hint)
        detail = str(failure) if isinstance(failure, StorageError) else f"{type(err).__name__}: {err}"
        raise StorageError(f"{what} {folder.resolve()} is not writable: {detail}") from err
    return folder


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors (their storages, each counted once) in a nest of dicts, lists and tuples: about
    what torch.save writes."""
    import torch  # here: the light helpers of this module (config_dir, the data root) do not need it

    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _replacing(path: Path, needed: Callable[[], int], hint: str) -> Iterator[Path]:
    """Yields the temporary file to write `path`'s new contents to, renamed onto `path` when the block ends; a
    write the disk refuses is a StorageError (`write_failure`, `needed()`: the bytes it takes), the previous `path`
    left as it was and the temporary file removed."""
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # first: the space it took counts as free again
        failure = write_failure(err, path, needed(), hint)
        if failure is err:
            raise
        raise failure from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | os.PathLike, hint: str = "") -> None:
    """torch.save to `path` through a temporary file and a rename; a write the disk refuses (full, read-only)
    is a StorageError naming the file, and the previous `path` stays as it was."""
    path = Path(path)
    with _replacing(path, lambda: tensor_bytes(obj), hint) as tmp:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)


def atomic_write_text(path: str | os.PathLike, text: str, hint: str = "") -> None:
    """Write `text` to `path` through a temporary file and a rename (a refused write: as `atomic_save`)."""
    path = Path(path)
    data = text.encode("utf-8")
    with _replacing(path, lambda: len(data), hint) as tmp:
        tmp.write_bytes(data)


# -- what killed writes leave, and only that ------------------------------------------------------------------

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


def remove_written(folder: str | os.PathLike, names: Iterable[str]) -> bool:
    """Remove the entries `names` of `folder` (files, or folders with what is in them), which this process wrote,
    then `folder` itself if nothing else is left in it; anything else in it stays. Whether `folder` went."""
    folder = Path(folder)
    for name in names:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty: never what someone else put there
    except OSError:
        return False
    return True


@contextlib.contextmanager
def building_dir(path: str | os.PathLike, hint: str = "") -> Iterator[Path | None]:
    """Build the folder `path` atomically: yields a temporary folder to fill, renamed to `path` when the
    block ends without error (removed otherwise), or None when `path` already exists (built meanwhile by
    another process: a lock beside it makes the others wait). Orphans of killed builds are removed first.
    A write the disk refuses is a StorageError naming the file (`hint`: where else to write).

    >>> with building_dir(folder) as tmp:
    ...     if tmp is not None:
    ...         (tmp / "meta.json").write_text("{}")
    """
    from filelock import FileLock

    path = Path(path)
    check_writable(path.parent, "the cache folder", hint)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            yield None
            return
        remove_orphans(path)
        tmp = _tmp(path)
        tmp.mkdir()
        try:
            yield tmp
            os.rename(tmp, path)
        except OSError as err:
            failure = write_failure(err, getattr(err, "filename", None) or tmp, hint=hint)
            if failure is err:
                raise
            raise failure from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- tables ---------------------------------------------------------------------------------------------------

class TSV(csv.Dialect):
    """mmtx's tab-separated tables: a field holding a tab, a newline or a quote is quoted ("..."), a quote
    inside doubled, as the csv module (and spreadsheets, pandas `sep="\\t"`) read them back."""

    delimiter = "\t"
    quotechar = '"'
    doublequote = True
    escapechar = None
    lineterminator = "\n"
    quoting = csv.QUOTE_MINIMAL
    skipinitialspace = False
    strict = True


def tsv_text(rows: Iterable[Sequence[Any]]) -> str:
    """`rows` as TSV text (mmtx's dialect, `TSV`)."""
    out = io.StringIO()
    csv.writer(out, dialect=TSV).writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


def read_tsv(path: str | os.PathLike) -> list[list[str]]:
    """The rows of a TSV file written by mmtx (`tsv_text`)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, dialect=TSV))


def append_tsv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], append: bool = True) -> None:
    """Append `rows` to the TSV file `path` (its `header` first when new), or replace it (`append=False`, atomically)."""
    path = Path(path)
    if not append or not path.exists():
        atomic_write_text(path, tsv_text([header, *rows]))
        return
    try:
        with path.open("a", encoding="utf-8", newline="") as f:
            f.write(tsv_text(rows))
    except OSError as err:
        failure = write_failure(err, path)
        if failure is err:
            raise
        raise failure from err


# -- the data root --------------------------------------------------------------------------------------------

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


def config_dir() -> str:
    """The `conf/` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent  # the mmtx package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mmtx configuration not found (looked in {here / 'conf'} and {here.parent / 'conf'})")
