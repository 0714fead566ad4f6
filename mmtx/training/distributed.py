"""Distributed strategies built from config (Lightning's own; nothing is reimplemented here), and ranks that die
ending the run at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from hydra.utils import get_class


def fsdp(
    wrap: Sequence[str] = ("mmtx.nn.block.Block",),
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
):
    """Lightning's FSDPStrategy with each transformer block (the classes named in `wrap`) its own FSDP
    unit, optionally recomputing block activations in the backward pass to save memory.

    state_dict_type="full" gathers a plain checkpoint on rank 0 (readable by mmtx.eval and
    mmtx.generate on one device); "sharded" writes one shard per rank (faster, for huge models).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    classes = {get_class(name) for name in wrap}
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
    )


# -- a rank that dies ends the run, with a message naming it -------------------------------------------------

_RUN = {"dir": None}  # the run folder of this process's training run (rank 0), for the summary of a dead rank


def describe_exit(returncode: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f"signal {-returncode}"
        oom = " (the kernel's out-of-memory killer sends it when memory runs out: see dmesg)" if -returncode == 9 else ""
        return f"was killed by {name}{oom}"
    return f"exited with status {returncode}"


def watch_ranks(run_dir: Path) -> None:
    """When Lightning launches the ranks of this run (DDP from one command), a rank that dies (killed by the
    out-of-memory killer, crashed) ends the whole run within seconds, with one message naming the rank, how it
    ended and its log file, and the run's summary.json saying so; the other ranks would otherwise wait in their
    next collective until its timeout.

    Lightning's launcher already watches its child processes and kills all of them when one dies; this gives its
    watcher the message and the summary (and leaves it as it is where Lightning has no such watcher)."""
    _RUN["dir"] = Path(run_dir)
    try:
        from lightning.fabric.strategies.launchers import subprocess_script
    except ImportError:
        return
    base = getattr(subprocess_script, "_ChildProcessObserver", None)
    if base is None or getattr(base, "mmtx_watcher", False) or not hasattr(base, "_run"):
        return

    class RankWatcher(base):  # type: ignore[misc, valid-type]
        mmtx_watcher = True

        def _run(self) -> bool:
            for rank, proc in enumerate(self._child_processes, start=1):
                if proc.poll() not in (None, 0):
                    _report_dead_rank(rank, proc.pid, proc.returncode)
                    break
            return super()._run()

    subprocess_script._ChildProcessObserver = RankWatcher


def _report_dead_rank(rank: int, pid: int, returncode: int) -> None:
    run_dir = _RUN["dir"]
    log_file = f"; its log: {run_dir / f'train_ddp_process_{rank}.log'}" if run_dir is not None else ""
    last = run_dir / "checkpoints" / "last.ckpt" if run_dir is not None else None
    resume = f"; continue from its last.ckpt with resume={last}" if last is not None and last.is_file() else ""
    message = f"rank {rank} (process {pid}) {describe_exit(returncode)}{log_file}. Ending the run's other ranks now{resume}"
    print(f"mmtx.train: error: {message}", file=sys.stderr, flush=True)
    if run_dir is not None and not (run_dir / "summary.json").exists():
        summary = {"status": "failed", "error": message, "run_dir": str(run_dir),
                   "last_checkpoint": str(last) if resume else None}
        with contextlib.suppress(OSError):
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def die_with_launcher() -> None:
    """A rank > 0 that Lightning (or torchrun) started ends when the process that started it ends (Linux:
    PR_SET_PDEATHSIG): when rank 0 is killed (the out-of-memory killer), its ranks do not wait in a collective until
    its timeout."""
    if os.environ.get("LOCAL_RANK") in (None, "", "0") or not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the parent died before the call: nothing would signal this process
            os.kill(os.getpid(), signal.SIGKILL)
