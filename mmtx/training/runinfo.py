"""What a run was made from: seed, package versions, the git commit of the code, the command line.

Written to `<run dir>/run_info.json`, logged with the hyperparameters and stored
in every checkpoint (`mmtx_run_info`), so any result can be traced to its code.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import mmtx


def git_state(path: Path | None = None) -> dict[str, Any]:
    """The commit of the git checkout holding `path` (default: the mmtx package) and whether it
    has uncommitted changes. Outside a checkout (an installed wheel, the Docker image) or without git:
    the commit in $MMTX_GIT_COMMIT (set by the image's GIT_COMMIT build argument), else None."""
    where = str(path or Path(mmtx.__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # an installed copy, e.g. the Docker image, which records its commit at build time
        return {"git_commit": os.environ.get("MMTX_GIT_COMMIT") or None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def cpu_model() -> str | None:
    """The processor's name as Linux reports it (`platform.processor()` is empty there), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_info(seed: int | None) -> dict[str, Any]:
    import lightning
    import torch

    return {
        "mmtx_version": mmtx.__version__,
        **git_state(),
        "seed": seed,
        "torch": str(torch.__version__),  # a TorchVersion object, which weights-only loading refuses
        "lightning": str(lightning.__version__),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "host": socket.gethostname(),
        # Two CPUs that dispatch to different kernels (AVX2, AVX512) round differently, so a long run's figures
        # can differ between machines with everything else equal. CUDA is left uninitialised here (forked ranks).
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
