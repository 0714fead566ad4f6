"""`module.compile`: whether inductor can build kernels on this machine, and a compiled function that falls back
to itself when compiling fails."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


def compiler_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile`'s inductor cannot build kernels for `device` (None: it can): on a CPU it needs a C++
    compiler, on a CUDA GPU Triton and compute capability 7.0 or newer."""
    import shutil

    if device.type == "cpu":
        compilers = [os.environ.get("CXX")] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
        if not any(shutil.which(c) for c in compilers):
            return (f"inductor builds CPU kernels with a C++ compiler and none was found ({', '.join(compilers)} not "
                    "on PATH): install g++ (apt install g++) or name one in $CXX")
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; inductor's Triton "
                    "kernels need 7.0 or newer (Volta)")
        import importlib.util

        if importlib.util.find_spec("triton") is None:  # torch's CUDA wheels bring it
            return "inductor builds GPU kernels with Triton, which is not installed (pip install triton)"
    elif device.type != "mps":
        return f"inductor has no backend for a {device.type} device"
    return None


class CompiledOrEager:
    """`torch.compile(fn)`, which falls back to `fn` itself, with one warning naming the compiler's error, when the
    first compilation fails (a compiler that cannot build for this machine): the run goes on eagerly, not down."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - only the compiler's own errors fall back; the model's are raised
            from torch._dynamo.exc import BackendCompilerFailed

            if not isinstance(err, BackendCompilerFailed) and type(err).__name__ not in ("InductorError", "CppCompileError"):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("module.compile=true: compiling failed (%s: %s); this run continues without compiling",
                        type(err).__name__, first[:300])
            self.compiled = None
            return self.fn(*args, **kwargs)
