"""Decoder-only head: next-token logits over the vocabulary."""

from __future__ import annotations

import torch
from torch import nn

from mmtx.batch import Tokens


class LMHead(nn.Module):
    """Project each position to vocabulary logits. The weight is tied to the input
    embedding by the LM module (Press & Wolf, 2017), so it has no bias."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)  # (B, T, D) -> (B, T, V)
