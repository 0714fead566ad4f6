"""AdamW with decoupled weight decay, linear warm-up and cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The parameters that modules list in their `no_weight_decay()` (timm's convention: learned positions,
    the CLS token), as names in `model`."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (linear, conv, embedding) only, as timm and nanoGPT do: not on
    biases and norms (1-D), nor on what a module lists in `no_weight_decay()` (learned positions, the
    CLS token). A tied matrix is one parameter and lands in one group."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


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
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a per-step LambdaLR. Warm-up is `warmup_steps` or a fraction of the run."""
    warmup = warmup_steps if warmup_steps is not None else int(warmup_fraction * total_steps)
    warmup = max(1, warmup)
    optimizer = torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, min_lr_ratio)
    )
    return optimizer, schedule
