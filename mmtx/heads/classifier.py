"""Encoder-only classification head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function

from mmtx.batch import Tokens
from mmtx.errors import ConfigError


class ClassifierHead(nn.Module):
    """Pool the backbone output, then one linear layer to class logits.

    pool="cls": a learned CLS token is prepended to the tokens (`prepare`)
    and its output is classified (ViT). pool="mean": the mean over real
    tokens (padding excluded), no extra token (as in many CIFAR ViTs and
    audio models).
    """

    def __init__(self, dim: int, num_classes: int, pool: str = "cls", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"head.pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, num_classes)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def prepare(self, tokens: Tokens) -> Tokens:
        """Add what the head needs to the backbone input (the CLS token)."""
        if self.cls_token is None:
            return tokens
        return tokens.prepend(self.cls_token.expand(tokens.x.shape[0], -1, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cls_token is not None:
            pooled = x[:, 0]  # (B, T, D) -> (B, D)
        elif mask is None:
            pooled = x.mean(dim=1)  # (B, T, D) -> (B, D)
        else:
            weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return self.proj(self.drop(pooled))
