"""AdamW with decoupled weight decay, linear warm-up and cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtx.errors import ConfigError


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The parameters that modules list in their `no_weight_decay()` (timm's convention: learned positions,
    the CLS token), as names in `model`."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def layer_id(name: str, depth: int) -> int:
    """A parameter's depth for layer-wise learning-rate decay (BEiT; timm's `param_groups_layer_decay`): the
    tokenizer and the CLS token 0, backbone block i i + 1, the final norm and the task heads depth + 1."""
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    if ".tokenizer." in name or name.endswith("pool.token"):
        return 0
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, layer_decay: float | None = None,
                 new_lr: float | None = None, new: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """Weight decay on weight matrices (linear, conv, embedding) only, as timm and nanoGPT do: not on
    biases and norms (1-D), nor on what a module lists in `no_weight_decay()` (learned positions, the
    CLS token). A tied matrix is one parameter and lands in one group. Frozen parameters are left out.

    layer_decay: each parameter's learning rate is lr * layer_decay ** (depth + 1 - its layer) (`layer_id`):
    the heads train at lr, the first block at lr * layer_decay ** depth. new_lr: the learning rate of the
    parameters named in `new` (those `init_from` did not set)."""
    skip = no_weight_decay_names(model)
    depth = getattr(getattr(model, "backbone", None), "depth", 0)
    groups: dict[tuple, dict] = {("decay", None): {"params": [], "weight_decay": weight_decay, "name": "decay"},
                                 ("no_decay", None): {"params": [], "weight_decay": 0.0, "name": "no_decay"}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "no_decay" if p.ndim < 2 or name in skip else "decay"
        group_lr, label = None, None
        if new_lr is not None and name in new:
            group_lr, label = new_lr, "new"
        elif layer_decay is not None and layer_decay != 1.0:
            layer = layer_id(name, depth)
            group_lr, label = lr * layer_decay ** (depth + 1 - layer), f"layer{layer}"
        key = (kind, label)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if kind == "decay" else 0.0,
                           "name": f"{kind}/{label}", "lr": group_lr}
        groups[key]["params"].append(p)
    return [g for key, g in groups.items() if g["params"] or key[1] is None]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over warm-up, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int | None = None,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
    fused: bool | None = None,
    layer_decay: float | None = None,
    new_lr: float | None = None,
    new: set[str] | frozenset[str] = frozenset(),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a per-step LambdaLR. Warm-up is `warmup_steps` or a fraction of the run; every group's
    learning rate (layer-wise decay, new parameters: `param_groups`) follows the same schedule."""
    warmup = warmup_steps if warmup_steps is not None else int(warmup_fraction * total_steps)
    warmup = max(1, warmup)
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1] (or null), got {layer_decay}")
    groups = param_groups(model, weight_decay, lr, layer_decay, new_lr, new)
    for group in groups:
        if group.get("lr") is None:
            group.pop("lr", None)  # the optimizer's lr
    if fused is None:  # the fused kernel where there is one (CUDA, CPU): one pass, and skips flagged steps itself
        fused = all(p.device.type in ("cuda", "cpu") for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, min_lr_ratio)
    )
    return optimizer, schedule
