"""Transformer blocks: pre-norm (ViT, GPT-2, Whisper: mmtx's own) and post-norm (the original Transformer, BERT).

The two hold the same parts under the same names (norm1, attn, norm2, mlp); they differ in how the parts are put
together, which is each class's `forward`."""

from __future__ import annotations

import torch
from torch import nn

from mmtx.nn.attention import Attention, CrossAttention, KVCache
from mmtx.nn.mlp import Mlp


class Block(nn.Module):
    """x + attn(norm(x)) [+ cross_attn(norm(x), context)] + mlp(norm(x)).

    Pre-norm (Xiong et al., 2020) trains without warm-up tricks at depth; drop
    path is stochastic depth (Huang et al., 2016) on each residual branch.
    `bias=False` drops the biases of the projections, MLP and norms (as nanoGPT
    does); `qkv_bias` governs the query/key/value projection alone. `norm_eps` and `activation` (gelu |
    gelu_tanh) are the numbers a family's pretrained weights were trained with (ViT: 1e-6, exact; GPT-2: 1e-5,
    tanh). `mlp`: the feed-forward layer, when not a dense `Mlp` of `mlp_ratio` (`mmtx.nn.mlp.build_mlp`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        cross_attention: bool = False,
        rotary: bool = False,
        bias: bool = True,
        norm_eps: float = 1e-6,
        activation: str = "gelu",
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, dropout=dropout,
                              attn_dropout=attn_dropout, rotary=rotary, bias=bias)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
            self.cross_attn = CrossAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, dropout=dropout,
                                             attn_dropout=attn_dropout, bias=bias)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        # The feed-forward layer: a dense MLP unless the backbone hands the block another (a mixture of experts).
        self.mlp = mlp if mlp is not None else Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), dropout=dropout,
                                                   bias=bias, activation=activation)
        self.drop_path = _drop_path(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask=mask, causal=causal, cache=cache, prefix=prefix))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention and needs a `context`")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context, context_mask=context_mask, cache=cache))
        return x + self.drop_path(self.mlp(self.norm2(x), mask))


class PostNormBlock(Block):
    """norm1(x + attn(x)), then norm2(x + mlp(x)): the original Transformer's and BERT's order (Vaswani et al.,
    2017; Devlin et al., 2019), for weights trained that way. The same parts as `Block`; no cross-attention."""

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        if kwargs.get("cross_attention"):
            raise ValueError("a post-norm block has no cross-attention here (backbone.block=pre for a decoder)")
        super().__init__(dim, num_heads, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, prefix: int = 0) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.attn(x, mask=mask, causal=causal, cache=cache, prefix=prefix)))
        return self.norm2(x + self.drop_path(self.mlp(x, mask)))


BLOCKS = {"pre": Block, "post": PostNormBlock}  # backbone.block


def _drop_path(rate: float) -> nn.Module:
    """timm's DropPath, imported only when used: importing timm loads its whole model zoo (about a second)."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)
