"""Decoder-only sequence-to-sequence (a prefix LM): the source's tokens, then the target's, in one sequence on the
shared backbone, attended bidirectionally over the source and causally after it (Raffel et al., 2020's prefix LM;
PaLI and Fuyu put image tokens before text this way). The same data, metrics, decoding and checkpoints as the
encoder-decoder (`mmtx.tasks.Seq2Seq`, `family=seq2seq`); what differs is that no second stack exists: the backbone
that reads the clip (or image, or fused fields) writes the text.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from mmtx.backbone import scale_residual_init
from mmtx.batch import AudioBatch, FusedBatch, TokenBatch, Tokens
from mmtx.data.modalities import modality_of
from mmtx.errors import ConfigError, Count, MaybeCount, Rate
from mmtx.tasks.base import TiedOutput
from mmtx.tasks.seq2seq import Seq2Seq
from mmtx.tokenizers.text import TokenEmbedding, Vocab

log = logging.getLogger(__name__)


class TargetText(nn.Module):
    """The target side of a prefix LM: the target embedding (its own positions, counted from the first target token)
    and the output layer tied to it. The stack that runs between them is the shared backbone."""

    def __init__(self, dim: int, vocab: Vocab, max_len: int, pos_embed: str, dropout: float) -> None:
        super().__init__()
        self.embed = TokenEmbedding(dim, vocab, max_len=max_len, pos_embed=pos_embed, dropout=dropout)
        self.head = TiedOutput(self.embed.embed)

    @property
    def max_len(self) -> int:
        return self.embed.max_len

    @property
    def vocab(self) -> Vocab | None:
        return self.embed.vocab


class PrefixLM(Seq2Seq):
    """Teacher-forced next-token loss of the target after the source prefix, with label smoothing; greedy or beam
    decoding with the backbone's KV caches (the prefix runs once, then one position a step).

    Batches are the encoder-decoder's `PairBatch`es (the source: audio, text, or a `FusedBatch` of several fields).
    The sequence the backbone reads is [source tokens (S, from the run's tokenizer); target tokens (T)]; a padded
    source's padding is masked out of every query's keys; the loss and the logits cover the target positions only.
    `pos_embed`: the target's positions (learned | none: rotary ones, with `backbone.rotary=true`).
    """

    kind = "prefix_lm"

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        vocab: Vocab,
        bos_id: int,
        eos_id: int,
        prefix_ids: Sequence[int] = (),
        max_len: int = 256,
        pos_embed: str = "learned",
        dropout: Rate = 0.0,
        label_smoothing: Rate = 0.1,
        beam_size: Count = 4,
        length_penalty: float = 0.6,
        max_decode_len: int | None = 64,
        metrics: Sequence[str] = ("bleu",),
        val_decode_batches: int | None = 4,
        val_beam_size: MaybeCount = None,
        log_examples: int = 8,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__(tokenizer, dim, vocab, bos_id, eos_id, {"dropout": dropout}, prefix_ids, max_len, pos_embed,
                         label_smoothing, beam_size, length_penalty, max_decode_len, metrics, val_decode_batches,
                         val_beam_size, log_examples, tie_embeddings)

    def make_decoder(self, dim: int, vocab: Vocab, decoder: dict[str, Any], max_len: int, pos_embed: str) -> nn.Module:
        return TargetText(dim, vocab, max_len, pos_embed, decoder.get("dropout") or 0.0)

    def attach(self, backbone: nn.Module) -> None:
        if backbone.cross_attention:
            raise ConfigError("family=prefix_lm runs the backbone on the source and the target together and has "
                              "nothing to cross-attend to: set backbone.cross_attention=false (or use family=seq2seq)")
        if self.decoder.embed.pos is None and not backbone.rotary:
            log.warning("this prefix LM's target has no positions (family.pos_embed=none, backbone.rotary=false): "
                        "only causal masking tells it where a target token is")
        scale_residual_init(backbone)  # the backbone is a decoder here (GPT-2's residual scaling, as the LM's)

    def encode(self, backbone: nn.Module, source: TokenBatch | AudioBatch | FusedBatch
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The source's tokens (B, S, D) and mask, not yet through the backbone: it reads them with the target."""
        tokens = self.tokenizer(source)
        return tokens.x, tokens.mask

    def run_decoder(self, backbone: nn.Module, ids: torch.Tensor, memory: torch.Tensor,
                    memory_mask: torch.Tensor | None, caches=None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) of target ids (B, T) at target positions start..; the first call of a cached decode
        (start 0) runs the source prefix too, the next ones only their new positions."""
        B, S, _ = memory.shape
        T = ids.shape[1]
        target = self.decoder.embed(TokenBatch(ids), start=start)  # Tokens: (B, T, D)
        x = target.x if start else torch.cat([memory, target.x], dim=1)  # (B, S + T, D) | the new positions
        mask = None
        if memory_mask is not None:  # keys: the source (its padding out), the target so far, the new positions
            mask = torch.cat([memory_mask, memory_mask.new_ones(B, start + T)], dim=1)  # (B, S + start + T)
        hidden = backbone(Tokens(x, mask), caches=caches, causal=True, prefix=S)
        return self.decoder.head(hidden[:, -T:])  # (B, T, V): the target positions only

    def new_decoder_caches(self, backbone: nn.Module, batch: int, max_len: int, memory: torch.Tensor):
        return backbone.new_caches(batch, memory.shape[1] + max_len, device=memory.device, dtype=memory.dtype)

    # -- a checkpoint rebuilds it without its data ---------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """Besides the encoder-decoder's (the target vocabulary, an audio source's sample rate): a fused source's
        geometry and the target's special ids, so `mmtx.load` rebuilds a model of several fields without its data."""
        state = super().extra_state()
        if getattr(self.tokenizer, "modality", None) == "fused":
            family = {"bos_id": self.bos_id, "eos_id": self.eos_id, "max_len": self.decoder.max_len,
                      "prefix_ids": list(self.prefix_ids)}
            state["mmtx_runtime"] = {"tokenizer": modality_of(self.tokenizer).geometry(self.tokenizer), "family": family}
        return state

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        runtime = checkpoint.get("mmtx_runtime")
        if runtime is None or "mmtx_tgt_vocab" not in checkpoint:
            return super().runtime_from_checkpoint(checkpoint, cfg, path)
        return {"tokenizer": runtime["tokenizer"],
                "family": {**runtime["family"], "vocab": Vocab.from_json(checkpoint["mmtx_tgt_vocab"])}}
