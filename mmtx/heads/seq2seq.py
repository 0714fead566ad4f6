"""Encoder-decoder head: the decoder side, cross-attending to the encoder's output."""

from __future__ import annotations

import torch
from torch import nn

from mmtx.backbone import Backbone, scale_residual_init
from mmtx.batch import TokenBatch
from mmtx.tokenizers.text import TokenEmbedding, Vocab


class Seq2SeqHead(nn.Module):
    """Target embedding -> a causal stack of the shared blocks with cross-attention -> tied output.

    The encoder is the run's backbone; this head is what an encoder-decoder
    (Vaswani et al., 2017; Whisper's TextDecoder) adds on top: `forward`
    scores teacher-forced targets, `decode` runs one or more new positions
    against per-block KV caches (self-attention keys grow; the encoder's
    cross-attention keys are computed once).
    """

    def __init__(
        self,
        dim: int,
        vocab: Vocab | int,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_len: int = 256,
        pos_embed: str = "learned",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.embed = TokenEmbedding(dim, vocab, max_len=max_len, pos_embed=pos_embed, dropout=dropout)
        self.decoder = Backbone(dim, depth, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, causal=True,
                                cross_attention=True, rotary=pos_embed == "none", bias=bias)
        scale_residual_init(self.decoder)
        self.proj = nn.Linear(dim, self.embed.embed.num_embeddings, bias=False)
        self.proj.weight = self.embed.embed.weight  # tied input and output embeddings

    @property
    def max_len(self) -> int:
        return self.embed.max_len

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for decoder inputs `tgt_in` (B, T) given the encoder output (B, S, D)."""
        return self.decode(tgt_in, memory, memory_mask)

    def decode(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
               caches=None, start: int = 0) -> torch.Tensor:
        tokens = self.embed(TokenBatch(ids), start=start)
        x = self.decoder(tokens, context=memory, context_mask=memory_mask, caches=caches)
        return self.proj(x)  # (B, T, D) -> (B, T, V)

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None):
        return self.decoder.new_caches(batch, max_len, device=device, dtype=dtype)
