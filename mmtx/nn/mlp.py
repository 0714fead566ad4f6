"""The transformer feed-forward layer."""

from __future__ import annotations

import torch
from torch import nn

from mmtx.errors import ConfigError

# The GELU of each family: the exact erf form (BERT, ViT) or GPT-2's tanh approximation (Hendrycks & Gimpel, 2016).
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (Vaswani et al., 2017; GELU as in ViT).

    `activation`: gelu (exact) | gelu_tanh (GPT-2's approximation, for its weights to give its numbers)."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"backbone.activation={activation!r}: one of {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU(approximate=ACTIVATIONS[activation])
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
