"""The errors mmtx raises on purpose, and how every entry point reports them.

An `MmtxError` is a message for the user: it names the thing at fault (a file, a
config key, a value) and says how to fix it. Each also derives from the builtin
a caller would catch (`ValueError`, `FileNotFoundError`, ...). The entry points
(`mmtx.train`, `mmtx.eval`, `mmtx.generate`) print such an error as one short
message, without a traceback, and exit with status 1; `MMTX_DEBUG=1` (or Hydra's
`HYDRA_FULL_ERROR=1`) shows the full traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class MmtxError(Exception):
    """A mistake in what the user gave mmtx (or a run that cannot go on), explained in one message."""


class ConfigError(MmtxError, ValueError):
    """A configuration value or key that cannot work; the message names the key."""


class DataError(MmtxError, ValueError):
    """Data whose content cannot be used (a corrupt file, mismatched sizes or line counts)."""


class MissingError(MmtxError, FileNotFoundError):
    """A file, folder or data set that is not where mmtx was told to look."""


class CheckpointError(MmtxError, ValueError):
    """A checkpoint that mmtx refuses to load (corrupt, foreign, unsafe, or of another task)."""


class NonFiniteError(MmtxError, FloatingPointError):
    """Training stopped because its loss or gradients stayed non-finite (NaN or infinity)."""


def debug_errors() -> bool:
    """True when the user asked for full tracebacks (MMTX_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("MMTX_DEBUG", "HYDRA_FULL_ERROR"))


def user_error(err: BaseException) -> MmtxError | None:
    """The MmtxError that `err` is or was raised from (`raise ... from`: Hydra's instantiate wraps what a
    target raises). An error merely raised while handling one (`__context__`) is a bug of its own, kept whole."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MmtxError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


@contextlib.contextmanager
def reported(program: str) -> Iterator[None]:
    """Run an entry point's body; an MmtxError (however wrapped) ends it with one line on stderr and
    exit status 1, unless full tracebacks were asked for."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only mmtx's own messages are shortened; the rest re-raise
        found = user_error(err)
        if found is None or debug_errors():
            raise
        print(f"{program}: error: {found}\n(set MMTX_DEBUG=1 for the full traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
