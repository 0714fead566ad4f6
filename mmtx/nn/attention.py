"""Multi-head attention through `F.scaled_dot_product_attention`.

SDPA picks a fused kernel (flash or memory-efficient on GPU, a fused CPU
kernel otherwise); we keep the fast path free of masks: with no padding and no
causality the kernel gets `attn_mask=None`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(
    key_mask: torch.Tensor | None, q_len: int, causal: bool
) -> tuple[torch.Tensor | None, bool]:
    """Combine a key-padding mask and causality into SDPA arguments.

    key_mask: (B, S) bool, True for real keys. Returns (attn_mask, is_causal):
    a boolean (B, 1, T, S) mask where True means "may attend", or None with
    `is_causal` set when causality alone is needed (so SDPA can use its
    fused causal kernel).
    """
    if key_mask is None:
        return None, causal
    mask = key_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if causal:
        s_len = key_mask.shape[1]
        # Queries are the last q_len positions of the keys (true with a KV cache too).
        tril = torch.ones(q_len, s_len, dtype=torch.bool, device=key_mask.device)
        tril = tril.tril(diagonal=s_len - q_len)  # (T, S)
        mask = mask & tril
    # A query whose every key is masked would give NaN; let it see itself-less
    # rows as all-True instead (its output is ignored downstream anyway).
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask, False


class Attention(nn.Module):
    """Multi-head self-attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, T, 3D) -> 3 x (B, H, T, Dh)
        attn_mask, is_causal = attention_mask(mask, T, causal)
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, D)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Multi-head attention from `x` (queries) to `context` (keys and values)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, D = x.shape
        S = context.shape[1]
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        kv = self.kv(context).reshape(B, S, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, S, 2D) -> 2 x (B, H, S, Dh)
        attn_mask, _ = attention_mask(context_mask, T, causal=False)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, D)
        return self.proj_drop(self.proj(x))
