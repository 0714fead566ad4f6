"""The one transformer stack every task shares."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from mmtx.batch import Tokens
from mmtx.nn import Block


class Backbone(nn.Module):
    """A stack of pre-norm blocks and a final LayerNorm.

    `causal=True` makes every block attend only to earlier positions (decoder
    use); `cross_attention=True` gives every block a cross-attention to a
    `context` sequence (the decoder of an encoder-decoder).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        causal: bool = False,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.causal = causal
        # Stochastic depth rises linearly with depth (Huang et al., 2016; DeiT).
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, dropout, attn_dropout, rate, qkv_bias, cross_attention)
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)

    def forward(
        self,
        tokens: Tokens,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = tokens.x
        for block in self.blocks:
            x = block(x, tokens.mask, self.causal, context, context_mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) linears, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
