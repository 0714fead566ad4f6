"""The transformer feed-forward layer."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (Vaswani et al., 2017; GELU as in ViT)."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
