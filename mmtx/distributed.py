"""Distributed strategies built from config (Lightning's own; nothing is reimplemented here)."""

from __future__ import annotations

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
