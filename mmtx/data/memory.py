"""How much memory a data set may hold (`data.resident_max_gb`), and what this process can still take."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

def available_memory() -> int | None:
    """Bytes of memory this process can still take before the kernel runs out (Linux): the smaller of the
    system's MemAvailable and what its cgroup's limit leaves (a container's, a SLURM job's); None elsewhere."""
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            found.append(max(0, int(limit) - usage))
        break
    return min(found) if found else None


def check_resident_max_gb(value: Any) -> float | None:
    """`data.resident_max_gb` checked: a positive number of GB, or None (80% of the memory available)."""
    from mmtx.errors import ConfigError

    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ConfigError(f"data.resident_max_gb={value!r} must be a positive number of GB, or null for 80% of the "
                          "memory available")
    return value


def resident_budget(resident_max_gb: float | None, gpu: bool = False,
                    processes: int = 1) -> tuple[float, str] | None:
    """The bytes a data set may take held in memory, and why (for the one line that says the data is streamed
    instead): `data.resident_max_gb` GB when set; else 80% of the memory available, shared by the `processes` of a
    machine that each hold a copy (DDP's ranks), and, where the data is to live on a GPU (`gpu`), at most half of
    its free memory (the model, its gradients and optimizer state and the activations need the rest); None when
    unknown."""
    from mmtx.files import size_text

    if resident_max_gb is not None:
        return resident_max_gb * 1e9, f"data.resident_max_gb={resident_max_gb:g}"
    budgets = []
    free = available_memory()
    if free is not None:
        shared = f", shared by {processes} processes" if processes > 1 else ""
        budgets.append((0.8 * free / processes,
                        f"80% of the {size_text(free)} of memory available{shared} (data.resident_max_gb=null)"))
    if gpu:
        import torch

        gpu_free, _ = torch.cuda.mem_get_info()
        budgets.append((0.5 * gpu_free, f"half the {size_text(gpu_free)} of GPU memory free (data.resident_max_gb=null)"))
    return min(budgets) if budgets else None


def refuse_if_too_large(need: int, what: str, fix: str) -> None:
    """Stop, before the machine runs out, when `what` would take `need` bytes of memory and more than 80% of what is
    left (`available_memory`): a DataError naming its size, the memory available and `fix` (the keys to change)."""
    from mmtx.errors import DataError
    from mmtx.files import size_text

    free = available_memory()
    if free is not None and need > 0.8 * free:
        raise DataError(f"{what} takes {size_text(need)} of memory, more than this machine can spare "
                        f"({size_text(free)} available); {fix}")
