"""Multi-head attention through `F.scaled_dot_product_attention`, with optional rotary positions and KV cache.

SDPA picks a fused kernel (flash or memory-efficient on GPU, a fused CPU
kernel otherwise); we keep the fast path free of masks: with no padding,
causality alone goes to SDPA as `is_causal`, and no mask at all otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.errors import ConfigError
from mmtx.nn.pos_embed import apply_rotary, rotary_tables


def attention_mask(
    key_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, prefix: int = 0
) -> tuple[torch.Tensor | None, bool]:
    """Combine a key-padding mask and causality into SDPA arguments.

    key_mask: (B, S) bool, True for real keys, or None. The queries are the
    last `q_len` of the `k_len` positions (true with a KV cache too). With
    `causal`, the first `prefix` positions are seen by every query (a prefix
    LM: bidirectional over the prefix, causal after it; Raffel et al., 2020,
    PaLI, Fuyu). Returns (attn_mask, is_causal): a boolean (B|1, 1, T, S) mask
    where True means "may attend", or None with `is_causal` set when plain
    causality suffices (so SDPA can use its fused causal kernel).
    """
    if key_mask is None and not (causal and prefix and q_len > 1):
        # Branches, not a boolean expression: with dynamic shapes (torch.compile) the lengths are symbols, and SDPA
        # takes a Python bool, which a branch gives (Dynamo guards on it).
        if not causal or q_len == 1:  # q_len == 1 with a cache: the one new query may see every key
            return None, False
        if q_len == k_len:
            return None, True
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if causal:
        device = key_mask.device if key_mask is not None else None
        tril = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)  # (T, S)
        if prefix:
            tril[:, :prefix] = True  # every query sees the whole prefix
        mask = tril[None, None] if mask is None else mask & tril
    # A query whose every key is masked would give NaN; let such rows (padding
    # queries, whose outputs are ignored) see everything instead.
    return mask | ~mask.any(dim=-1, keepdim=True), False


class KVCache:
    """Keys and values of the positions seen so far, for one block of a decoder.

    Preallocated to `max_len` so each decoding step writes one position in
    place instead of concatenating (B, H, S, Dh) tensors. `cross` holds the
    block's cross-attention keys and values of the encoder output, computed
    once per source. `reorder` follows beam search's choice of hypotheses.
    """

    def __init__(self, batch: int, num_heads: int, head_dim: int, max_len: int, device=None, dtype=None) -> None:
        shape = (batch, num_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.cross: tuple[torch.Tensor, torch.Tensor] | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (B',) in that order (beam search)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        if self.cross is not None:
            self.cross = (self.cross[0].index_select(0, index), self.cross[1].index_select(0, index))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, Dh) new keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class _MultiHead(nn.Module):
    """What self- and cross-attention share: the head split, SDPA and the output projection."""

    def __init__(self, dim: int, num_heads: int, *, dropout: float, attn_dropout: float, bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(dropout)

    def attend(self, q, k, v, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """(B, H, T, Dh) queries over (B, H, S, Dh) keys/values -> (B, T, D) projected output."""
        if attn_mask is not None and attn_mask.dtype == torch.bool and torch.compiler.is_compiling():
            # Compiled, the mask goes in as the additive float mask SDPA would make of it (the same numbers): torch
            # 2.11's CPU inductor gave the one SDPA made a static stride in the backward, wrong at the next length.
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        B, H, T, Dh = x.shape
        x = x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, H, T, Dh) -> (B, T, D)
        return self.proj_drop(self.proj(x))


class Attention(_MultiHead):
    """Multi-head self-attention; `rotary=True` rotates queries and keys by position (RoFormer, Su et al., 2021)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        rotary: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, dropout=dropout, attn_dropout=attn_dropout, bias=bias)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rotary = rotary
        # The (cos, sin) table, computed for the positions seen so far, on the inputs' device. A cache, not a
        # buffer: the module's state never changes shape at run time (EMA weight averaging, DDP's buffer
        # broadcast and checkpoints see none of it).
        self._rope: torch.Tensor | None = None

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (..., T, Dh) at positions start..start+T-1."""
        end = start + x.shape[-2]
        if torch.compiler.is_compiling():  # a pure function of the shape: no Python state for Dynamo to guard on
            return apply_rotary(x, rotary_tables(end, self.head_dim, device=x.device)[start:end])
        rope = self._rope
        if rope is None or rope.shape[0] < end or rope.device != x.device:  # (re)compute, covering these positions
            length = end if rope is None else max(end, rope.shape[0] if rope.shape[0] >= end else 2 * rope.shape[0])
            rope = self._rope = rotary_tables(length, self.head_dim, device=x.device)
        return apply_rotary(x, rope[start:end])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, T, 3D) -> 3 x (B, H, T, Dh)
        start = cache.length if cache is not None else 0
        if self.rotary:
            q, k = self._rotate(q, start), self._rotate(k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, Dh)
        attn_mask, is_causal = attention_mask(mask, T, k.shape[2], causal, prefix)
        return self.attend(q, k, v, attn_mask, is_causal)


class CrossAttention(_MultiHead):
    """Multi-head attention from `x` (queries) to `context` (keys and values)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, dropout=dropout, attn_dropout=attn_dropout, bias=bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        S = context.shape[1]
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        if cache is not None and cache.cross is not None:
            k, v = cache.cross  # the encoder output's keys and values, computed at the first step
        else:
            kv = self.kv(context).reshape(B, S, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, S, 2D) -> 2 x (B, H, S, Dh)
            if cache is not None:
                cache.cross = (k, v)
        attn_mask, _ = attention_mask(context_mask, T, S, causal=False)
        return self.attend(q, k, v, attn_mask, False)
