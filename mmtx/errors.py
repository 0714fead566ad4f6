"""The errors mmtx raises on purpose, and how every entry point reports them.

An `MmtxError` is a message for the user: it names the thing at fault (a file, a
config key, a value) and says how to fix it. Each also derives from the builtin
a caller would catch (`ValueError`, `FileNotFoundError`, ...). The entry points
(`mmtx.train`, `mmtx.eval`, `mmtx.generate`, `mmtx.predict`, `mmtx.export`) print such an
error as one short message, without a traceback, and exit with status 1; `MMTX_DEBUG=1`
(or Hydra's `HYDRA_FULL_ERROR=1`) shows the full traceback instead. A disk that is full or
read-only is such a message too, wherever the write happened.

In a multirun (`-m`), a job that fails prints its message (and, for an error that is not
mmtx's, its traceback), and the launcher goes on with the next job; the command exits with
status 1 once every job has run (`run_cli`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import traceback
from typing import Annotated, Any, Callable, Iterator, NamedTuple


class MmtxError(Exception):
    """A mistake in what the user gave mmtx (or a run that cannot go on), explained in one message."""


class ConfigError(MmtxError, ValueError):
    """A configuration value or key that cannot work; the message names the key."""


class DataError(MmtxError, ValueError):
    """Data whose content cannot be used (a corrupt file, mismatched sizes or line counts)."""


class MissingError(MmtxError, FileNotFoundError):
    """A file, folder or data set that is not where mmtx was told to look."""


def optional(module: str, extra: str, purpose: str) -> Any:
    """`module` (a package of one of mmtx's extras), imported; or a `MissingError` that names what needed it
    and the extra that installs it. Every import of a package that is not a core dependency goes through
    here, inside the function that needs it (tests/test_packaging.py holds mmtx to that)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]
        raise MissingError(f"{purpose} needs {missing}, which is not installed: pip install 'mmtx[{extra}]'") from None


class CheckpointError(MmtxError, ValueError):
    """A checkpoint that mmtx refuses to load (corrupt, foreign, unsafe, or of another task)."""


class NonFiniteError(MmtxError, FloatingPointError):
    """Training stopped because its loss or gradients stayed non-finite (NaN or infinity)."""


class StorageError(MmtxError, OSError):
    """A file mmtx must write cannot be written: the disk is full, the file system read-only, the folder not
    writable. The message names the file and the folder (and, for a full disk, the bytes it needed)."""


# The errno values of a file operation the user must make room or permission for (not a bug of mmtx).
STORAGE_ERRNOS = {errno.ENOSPC: "cannot write it: no space is left on the device holding {folder}",
                  errno.EDQUOT: "cannot write it: the disk quota of the device holding {folder} is exceeded",
                  errno.EROFS: "cannot write it: {folder} is on a read-only file system",
                  errno.EACCES: "permission denied (folder {folder})", errno.EPERM: "permission denied (folder {folder})"}


def storage_message(err: OSError) -> str | None:
    """One line for an OSError of the disk (full, read-only, not permitted) that names the file and the folder;
    None for any other error."""
    if err.errno not in STORAGE_ERRNOS or not err.filename:
        return None
    path = os.path.abspath(os.fsdecode(err.filename))
    reason = STORAGE_ERRNOS[err.errno].format(folder=os.path.dirname(path))
    return f"{path}: {reason}; make room or permission there, or write elsewhere"


def debug_errors() -> bool:
    """True when the user asked for full tracebacks (MMTX_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("MMTX_DEBUG", "HYDRA_FULL_ERROR"))


def user_error(err: BaseException) -> MmtxError | None:
    """The MmtxError that `err` is or was raised from (`raise ... from`: Hydra's instantiate wraps what a
    target raises), or a write refused by the disk (a full or read-only file system, anywhere: a logger's file
    as well as a checkpoint) as a StorageError. An error merely raised while handling one (`__context__`) is a
    bug of its own, kept whole."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MmtxError):
            return _from_worker(err)
        if isinstance(err, OSError) and storage_message(err):
            return StorageError(storage_message(err))
        seen.add(id(err))
        err = err.__cause__
    return None


def _from_worker(err: MmtxError) -> MmtxError:
    """`err` as raised, when a DataLoader worker raised it: PyTorch re-raises it in the training process with the
    worker's traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    its own message is the traceback's last line."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return err
    last = text.rstrip().splitlines()[-1]
    return type(err)(last.split(": ", 1)[1] if ": " in last else last)


# -- the command line: one line per mistake, and multiruns that survive a bad job ---------------------------

_CLI = {"active": False}  # set by run_cli: the process is an mmtx command, not a Python caller
_FAILED_JOBS: list[str] = []  # "job N: message" of every job of this process's multirun that failed


def in_cli() -> bool:
    """Whether this process runs an mmtx command (`run_cli`), so that a mistake may end it."""
    return _CLI["active"]


def multirun_job() -> int | None:
    """The job number when this process runs a job of a Hydra multirun (`-m`), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return int(HydraConfig.get().job.num)
    except Exception:  # noqa: BLE001 - not under Hydra
        return None
    return None


def record_failed_job(description: str) -> None:
    """Remember a failed job of this multirun: `run_cli` exits with status 1 once the sweep is over."""
    _FAILED_JOBS.append(description)


def failed_jobs() -> list[str]:
    return list(_FAILED_JOBS)


def exit_now(message: str) -> None:
    """End an mmtx command with `message` on stderr and status 1 (no traceback)."""
    print(f"{message}\n(set MMTX_DEBUG=1 for the full traceback)", file=sys.stderr, flush=True)
    raise SystemExit(1)


@contextlib.contextmanager
def reported(program: str, on_job_failure: Callable[[str], Any] | None = None) -> Iterator[None]:
    """Run an entry point's body; an MmtxError (however wrapped) ends it with one line on stderr and
    exit status 1, unless full tracebacks were asked for.

    In a job of a multirun, any error (mmtx's or not) ends that job only: its message is printed (with the
    traceback when it is not mmtx's own), `on_job_failure(message)` records it (mmtx.train writes the job's
    summary.json), and the launcher goes on with the next job. Ctrl-C and signals still end the sweep."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only mmtx's own messages are shortened; the rest re-raise
        found = user_error(err)
        job = multirun_job()
        if job is None:
            if found is None or debug_errors():
                raise
            exit_now(f"{program}: error: {found}")
        message = str(found) if found is not None else f"{type(err).__name__}: {err}"
        if found is None or debug_errors():
            traceback.print_exc()
        print(f"{program}: error in job {job}: {message}\n(job {job} failed; the sweep goes on with its other jobs)",
              file=sys.stderr, flush=True)
        record_failed_job(f"job {job}: {message}")
        if on_job_failure is not None:
            on_job_failure(message)


def run_cli(cli: Callable[[], Any]) -> Any:
    """Run a Hydra application (`@hydra.main`) as an mmtx command: after a multirun, exit with status 1 if any of
    its jobs failed (each has run, and printed its error)."""
    _CLI["active"] = True
    # A log file the disk refuses (full, read-only) loses its lines quietly, as logging's documentation advises for
    # production: the one-line error says what happened, not a "--- Logging error ---" traceback per record.
    import logging

    logging.raiseExceptions = debug_errors()
    result = cli()
    if _FAILED_JOBS:
        print(f"{len(_FAILED_JOBS)} job(s) of the multirun failed: " + "; ".join(_FAILED_JOBS), file=sys.stderr,
              flush=True)
        raise SystemExit(1)
    return result


# -- what a configured value must be ------------------------------------------------------------------------------
#
# Declared once, on the constructor parameter that takes the value (`dropout: Rate = 0.0`, or
# `Annotated[int, integer(2)]`); `mmtx.config.validate` reads these declarations from every `_target_` of a composed
# configuration and names the key at fault before anything is built. A plain `int`, `float` or `bool` parameter is
# checked for its type.


class Rule(NamedTuple):
    """What a value must be, in words, and the test of it."""

    words: str
    test: Callable[[Any], bool]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           optional: bool = False) -> Rule:
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    words = "a number" + (" " + " and ".join(w for w in (lo, hi) if w) if lo or hi else "")
    words += " or null" if optional else ""

    def test(value: Any) -> bool:
        if value is None:
            return optional
        if not is_number(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)

    return Rule(words, test)


def integer(low: int, optional: bool = False, also: tuple[Any, ...] = ()) -> Rule:
    words = f"a whole number >= {low}" + "".join(f" or {a}" for a in also) + (" or null" if optional else "")
    return Rule(words, lambda v: (v is None and optional) or v in also or (_integer(v) and v >= low))


def limit(optional: bool = True) -> Rule:
    """Lightning's limit_*_batches / val_check_interval: a fraction in [0, 1] or a whole number of batches."""
    return Rule("a fraction in [0, 1] or a whole number of batches >= 0" + (" or null" if optional else ""),
                lambda v: (v is None and optional) or (_integer(v) and v >= 0) or (is_number(v) and 0 <= v <= 1))


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: str) -> Rule:
    return Rule(" or ".join(repr(c) for c in choices), lambda v: v in choices)



# The common declarations.
Count = Annotated[int, integer(1)]  # sizes, depths, heads, batch sizes
MaybeCount = Annotated[int | None, integer(1, optional=True)]
Natural = Annotated[int, integer(0)]  # a whole number that may be 0
MaybeNatural = Annotated[int | None, integer(0, optional=True)]
Rate = Annotated[float, number(0, 1, high_open=True)]  # dropout, label smoothing, a held-out fraction: [0, 1)
MaybeRate = Annotated[float | None, number(0, 1, high_open=True, optional=True)]
Positive = Annotated[float, number(0, low_open=True)]
MaybePositive = Annotated[float | None, number(0, low_open=True, optional=True)]
NonNegative = Annotated[float, number(0)]
