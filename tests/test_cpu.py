"""mmtx.data.memory: the allocator setting CPU training uses."""

import torch


def test_cpu_training_keeps_freed_memory():
    import platform
    import resource
    import sys

    from mmtx.training.cpu import keep_freed_memory

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False  # a no-op elsewhere
        return
    assert keep_freed_memory() is True
    for _ in range(3):  # 16 MB buffers: the heap grows to hold them once
        torch.ones(4 << 20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # freed and allocated again, as a training step's buffers are
        torch.ones(4 << 20).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000  # glibc's defaults: about 16,000 here (each buffer a fresh mmap, faulted in)
