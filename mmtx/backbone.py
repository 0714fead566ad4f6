"""The one transformer stack every task shares."""

from __future__ import annotations

import math
from typing import Annotated, Any, Mapping

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function

from mmtx.batch import Tokens
from mmtx.errors import ConfigError, Count, Positive, Rate, one_of
from mmtx.nn.block import BLOCKS
from mmtx.nn.attention import KVCache
from mmtx.nn.mlp import MLPS, ExpertLinear, MoeSpec, build_mlp, moe_spec


class Backbone(nn.Module):
    """A stack of pre-norm blocks and a final LayerNorm (`block=post`: post-norm blocks, BERT's, and no final norm).

    `causal=True` makes every block attend only to earlier positions (a
    decoder's own stack); a task that uses a shared backbone causally (the
    language model) asks for it per call, `forward(..., causal=True)`, so the
    same weights serve causal and bidirectional tasks; `prefix=P` with `causal`
    lets every position see the first P too (a prefix LM: `mmtx.tasks.PrefixLM`). `cross_attention=True` gives every block a cross-attention to a
    `context` sequence (the decoder of an encoder-decoder); `rotary=True`
    gives self-attention rotary positions. `mlp=moe` makes the MLP of every `moe.every_n_blocks`-th block a
    mixture of experts (`mmtx.nn.mlp.MoeSpec` holds `moe`'s keys). `norm_eps` (every LayerNorm) and
    `activation` (the MLPs' GELU: gelu | gelu_tanh) follow pretrained weights
    (ViT's 1e-6 and exact GELU by default; GPT-2's 1e-5 and tanh GELU). `caches` (one `KVCache` a block,
    from `new_caches`) lets a decoder process one new position at a time.
    """

    def __init__(
        self,
        dim: Count,
        depth: Count,
        num_heads: Count,
        *,
        mlp_ratio: Positive = 4.0,
        dropout: Rate = 0.0,
        attn_dropout: Rate = 0.0,
        drop_path: Rate = 0.0,
        qkv_bias: bool = True,
        causal: bool = False,
        cross_attention: bool = False,
        rotary: bool = False,
        bias: bool = True,
        norm_eps: float = 1e-6,
        activation: str = "gelu",
        block: str = "pre",
        mlp: Annotated[str, one_of(*MLPS)] = "dense",
        moe: Mapping[str, Any] | MoeSpec | None = None,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"backbone.block must be one of {', '.join(BLOCKS)}, got {block!r}")
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.causal = causal
        self.cross_attention = cross_attention
        self.rotary = rotary
        experts = moe_spec(mlp, moe)
        if experts is not None:
            experts.check_depth(depth)
        # Stochastic depth rises linearly with depth (Huang et al., 2016; DeiT).
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            BLOCKS[block](dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout,
                  drop_path=rate, qkv_bias=qkv_bias, cross_attention=cross_attention, rotary=rotary, bias=bias,
                  norm_eps=norm_eps, activation=activation,
                  mlp=build_mlp(mlp, experts, i, dim, int(dim * mlp_ratio), dropout=dropout, bias=bias,
                                activation=activation))
            for i, rate in enumerate(rates)
        )
        # Pre-norm blocks leave their sum unnormalised: one LayerNorm ends the stack. Post-norm blocks end normalised.
        self.norm = nn.LayerNorm(dim, eps=norm_eps, bias=bias) if block == "pre" else nn.Identity()
        self.apply(init_weights)

    def forward(
        self,
        tokens: Tokens,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        causal: bool | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        causal = self.causal if causal is None else causal
        x = tokens.x
        for i, block in enumerate(self.blocks):
            x = block(x, mask=tokens.mask, causal=causal, context=context, context_mask=context_mask,
                      cache=caches[i] if caches else None, prefix=prefix)
        return self.norm(x)

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        """Empty KV caches, one a block, for decoding up to `max_len` positions."""
        head_dim = self.dim // self.num_heads
        return [KVCache(batch, self.num_heads, head_dim, max_len, device, dtype) for _ in self.blocks]


def init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) linears (experts' too), zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, ExpertLinear):  # every expert as a linear
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def scale_residual_init(backbone: nn.Module) -> None:
    """Re-draw the residual output projections with std 0.02 / sqrt(2 * depth)."""
    std = 0.02 / math.sqrt(2 * backbone.depth)
    for block in backbone.blocks:
        for layer in (block.attn.proj, block.mlp.fc2):
            nn.init.normal_(layer.weight, std=std)
