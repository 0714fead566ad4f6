"""Encoder-decoder training and decoding: the shared backbone encodes, `Seq2SeqHead` decodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.batch import IGNORE_INDEX, AudioBatch, PairBatch, TokenBatch
from mmtx.generation import beam_search
from mmtx.loggers import log_text_table
from mmtx.metrics import text_metrics
from mmtx.module import TaskModule


class Seq2SeqModule(TaskModule):
    """Teacher-forced sequence-to-sequence training with label smoothing, and beam-search decoding.

    Batches are `PairBatch`es: the source for the tokenizer (a `TokenBatch` of
    ids and mask, or an `AudioBatch`), and the target as a `TokenBatch` whose
    `tokens` are BOS + target (padded) and `targets` target + EOS (padding =
    IGNORE_INDEX): the loss is token-level and ignores padding. With `tie_embeddings` and one vocabulary for both sides,
    the source embedding is the target embedding too (which is tied to the
    output layer), as in Vaswani et al. (2017).

    Validation decodes `val_decode_batches` batches spread over the epoch (null:
    all; 0: none) with `val_beam_size` and logs `metrics` (bleu: sacreBLEU; cer, wer)
    against the original reference strings, as `val/<metric>`; test decodes
    everything with `beam_size`. Examples (source, reference, hypothesis) are
    logged as a table: the first `log_examples` at each validation, all of
    them at test (W&B table, TensorBoard text, `<run>/{stage}_examples.tsv`).
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
        length_penalty: float = 0.6,
        max_decode_len: int = 64,
        metrics: Sequence[str] = ("bleu",),
        val_decode_batches: int | None = 4,
        val_beam_size: int | None = None,
        log_examples: int = 8,
        tie_embeddings: bool = True,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, backbone, head, optim, compile, max_nonfinite_steps, run_config)
        text_metrics(metrics, [], [])  # unknown names fail here, not after the first epoch
        self.bos_id, self.eos_id = bos_id, eos_id
        self.label_smoothing = label_smoothing
        self.search = {"beam_size": beam_size, "length_penalty": length_penalty, "max_len": max_decode_len}
        self.metrics = list(metrics)
        self.val_decode_batches, self.val_beam_size = val_decode_batches, val_beam_size
        self.log_examples = log_examples
        src_vocab, tgt_vocab = self.vocab, self.tgt_vocab
        shared = bool(
            tie_embeddings and src_vocab is not None and tgt_vocab is not None
            and (src_vocab is tgt_vocab or src_vocab.to_json() == tgt_vocab.to_json())
        )
        if shared:
            self.tokenizer.embed.weight = self.head.embed.embed.weight
        self._decoded: dict[str, list[str]] = {"sources": [], "refs": [], "hyps": []}

    @property
    def tgt_vocab(self):
        return self.head.embed.vocab

    @property
    def sample_rate(self) -> int | None:
        return getattr(self.tokenizer, "sample_rate", None)

    def encode(self, source: TokenBatch | AudioBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokenizer(source)  # Tokens: (B, S, D), mask (B, S) | None
        return self.backbone(tokens), tokens.mask

    def forward_logits(self, batch: PairBatch) -> torch.Tensor:
        memory, memory_mask = self.encode(batch.source)
        return self.head(memory, memory_mask, batch.target.tokens)  # (B, T, V)

    def loss(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.target.targets.flatten(),
                               ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)

    def shared_step(self, batch: PairBatch, stage: str) -> torch.Tensor:
        loss = self.loss(self(batch), batch)
        n = int((batch.target.targets != IGNORE_INDEX).sum())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=not on_step)
        return loss

    # -- decoding during validation and test ---------------------------------------------

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        self.shared_step(batch, "val")
        if self._decode_at_validation(batch_idx):
            self._collect(batch, self.val_beam_size)

    def _decode_at_validation(self, batch_idx: int) -> bool:
        """Whether validation batch `batch_idx` is one of the `val_decode_batches` decoded: spread evenly
        over the epoch's batches, which the data module orders by length, so they cover every length."""
        k = self.val_decode_batches
        if k is None:
            return True
        trainer = self._trainer
        counts = (trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches) if trainer else []
        total = int(counts[0]) if counts and counts[0] != float("inf") else 0
        if total <= k:
            return batch_idx < k
        return batch_idx in {i * total // k for i in range(k)}

    def test_step(self, batch: PairBatch, batch_idx: int) -> None:
        self.shared_step(batch, "test")
        self._collect(batch, None)

    def _collect(self, batch: PairBatch, beam_size: int | None) -> None:
        if batch.refs is None:
            return
        self._decoded["hyps"] += self.translate(batch.source, beam_size=beam_size)
        self._decoded["refs"] += list(batch.refs)
        self._decoded["sources"] += [str(s) for s in batch.sources or [""] * len(batch.refs)]

    def _report(self, stage: str) -> None:
        decoded, self._decoded = self._decoded, {"sources": [], "refs": [], "hyps": []}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, decoded)  # every rank scores the whole set
            decoded = {k: [x for part in gathered for x in part[k]] for k in decoded}
        if not decoded["hyps"]:
            return
        for name, value in text_metrics(self.metrics, decoded["hyps"], decoded["refs"]).items():
            self.log(f"{stage}/{name}", value, prog_bar=True)
        if self.trainer.sanity_checking or self.log_examples <= 0:
            return
        rows = list(zip(decoded["sources"], decoded["refs"], decoded["hyps"]))
        rows = rows if stage == "test" else rows[: self.log_examples]
        log_text_table(self.trainer, f"{stage}_examples", ["step", "source", "reference", "hypothesis"],
                       [[self.global_step, *row] for row in rows], append=stage != "test")

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    # -- the vocabularies travel with the run ---------------------------------------------------

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.tgt_vocab is not None and self.trainer.is_global_zero:
            self.tgt_vocab.save(Path(self.trainer.default_root_dir) / "tgt_tokenizer.json")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tgt_vocab is not None:
            checkpoint["mmtx_tgt_vocab"] = self.tgt_vocab.to_json()
        if self.sample_rate is not None:
            checkpoint["mmtx_sample_rate"] = self.sample_rate

    def translate(self, source: TokenBatch | AudioBatch, **search: Any) -> list[str]:
        """The decoded text of every source in `source` (search: beam_size, max_len, length_penalty)."""
        was_training = self.training
        self.eval()
        ids = self.decode(source, **search)
        self.train(was_training)
        return [self.tgt_vocab.decode(row) for row in ids]

    @torch.no_grad()
    def decode(self, source: TokenBatch | AudioBatch, beam_size: int | None = None, max_len: int | None = None,
               length_penalty: float | None = None, use_cache: bool = True) -> list[list[int]]:
        """Beam-search the target ids (no BOS/EOS) of every source in `source`; beam_size=1 is greedy.

        With the cache each step runs one new position (self-attention keys and values grow in the
        cache; the encoder's cross-attention keys and values are computed once); without it each step
        reruns the decoder on the whole prefix (for comparison).
        """
        K = beam_size or self.search["beam_size"]
        memory, memory_mask = self.encode(source)
        memory = memory.repeat_interleave(K, 0)  # (B*K, S, D): one copy per hypothesis
        memory_mask = memory_mask.repeat_interleave(K, 0) if memory_mask is not None else None
        limit = min(max_len or self.search["max_len"], self.head.max_len)

        def step(ids, caches, t):
            if caches:
                return self.head.decode(ids[:, -1:], memory, memory_mask, caches, t)
            return self.head.decode(ids, memory, memory_mask)

        def new_caches(n):
            return self.head.new_caches(n, limit, device=memory.device, dtype=memory.dtype) if use_cache else []

        lp = self.search["length_penalty"] if length_penalty is None else length_penalty
        return beam_search(step, new_caches, memory.shape[0] // K, self.bos_id, self.eos_id, K, limit, lp,
                           device=memory.device)
