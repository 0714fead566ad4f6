"""Encoder-decoder training and decoding: the shared backbone encodes, `Seq2SeqHead` decodes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.generation import beam_search
from mmtx.module import TaskModule

IGNORE = -100  # target positions that carry no loss (padding)


class Seq2SeqModule(TaskModule):
    """Teacher-forced sequence-to-sequence training with label smoothing, and beam-search decoding.

    Batches carry the source for the tokenizer (token ids + `src_mask`, or
    audio + lengths), `tgt_in` (BOS + target, padded) and `tgt_out` (target +
    EOS, padding = -100): the loss is token-level and ignores padding.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        optim: dict[str, Any],
        bos_id: int,
        eos_id: int,
        label_smoothing: float = 0.1,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        max_decode_len: int = 64,
        compile: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, backbone, head, optim, compile, run_config)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.label_smoothing = label_smoothing
        self.search = {"beam_size": beam_size, "length_penalty": length_penalty, "max_len": max_decode_len}

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokenizer(batch)  # Tokens: (B, S, D), mask (B, S) | None
        return self.backbone(tokens), tokens.mask

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        memory, memory_mask = self.encode(batch)
        return self.head(memory, memory_mask, batch["tgt_in"])  # (B, T, V)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(),
                               ignore_index=IGNORE, label_smoothing=self.label_smoothing)

    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss = self.loss(self(batch), batch)
        n = int((batch["tgt_out"] != IGNORE).sum())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=not on_step)
        return loss

    @torch.no_grad()
    def decode(self, batch: dict[str, torch.Tensor], beam_size: int | None = None, max_len: int | None = None,
               length_penalty: float | None = None) -> list[list[int]]:
        """Beam-search the target ids (no BOS/EOS) of every source in `batch`; beam_size=1 is greedy."""
        K = beam_size or self.search["beam_size"]
        memory, memory_mask = self.encode(batch)
        memory = memory.repeat_interleave(K, 0)  # (B*K, S, D): one copy per hypothesis
        memory_mask = memory_mask.repeat_interleave(K, 0) if memory_mask is not None else None
        limit = min(max_len or self.search["max_len"], self.head.max_len)

        def step(ids, caches, t):
            return self.head.decode(ids, memory, memory_mask, caches, t)

        def new_caches(n):
            return self.head.new_caches(n, limit, device=memory.device, dtype=memory.dtype)

        lp = self.search["length_penalty"] if length_penalty is None else length_penalty
        return beam_search(step, new_caches, memory.shape[0] // K, self.bos_id, self.eos_id, K, limit, lp,
                           device=memory.device)
