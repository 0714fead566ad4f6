"""Encoder-only classification head: a pooling (chosen from a table) and one linear layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function

from mmtx.batch import Tokens
from mmtx.errors import ConfigError


class ClsPool(nn.Module):
    """A learned CLS token is put in front of the tokens (`prepare`); its output is the pooled vector (ViT)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.token, std=0.02)

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens.prepend(self.token.expand(tokens.x.shape[0], -1, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 0]  # (B, T, D) -> (B, D)


class MeanPool(nn.Module):
    """The mean over real tokens (padding excluded); no extra token (many CIFAR ViTs, audio models)."""

    def __init__(self, dim: int) -> None:
        super().__init__()

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)  # (B, T, D) -> (B, D)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)


_POOLS = {"cls": ClsPool, "mean": MeanPool}  # head.pool


class ClassifierHead(nn.Module):
    """Pool the backbone output (`head.pool`: cls | mean, see `ClsPool`, `MeanPool`), then one linear
    layer to class logits."""

    def __init__(self, dim: int, num_classes: int, pool: str = "cls", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ConfigError(f"head.pool must be one of {sorted(_POOLS)}, got {pool!r}")
        self.pool = _POOLS[pool](dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, num_classes)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def prepare(self, tokens: Tokens) -> Tokens:
        """Add what the pooling needs to the backbone input (the CLS token)."""
        return self.pool.prepare(tokens)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.drop(self.pool(x, mask)))  # (B, T, D) -> (B, D) -> (B, num_classes)
