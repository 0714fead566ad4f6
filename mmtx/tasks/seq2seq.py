"""Sequence-to-sequence (translation, speech recognition): the shared backbone encodes the source, a text
decoder that cross-attends to it writes the target; teacher-forced loss, beam-search decoding, and
BLEU / CER / WER against the original reference strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, SacreBLEUScore, WordErrorRate

from mmtx.backbone import Backbone, scale_residual_init
from mmtx.batch import IGNORE_INDEX, AudioBatch, PairBatch, TokenBatch
from mmtx.errors import CheckpointError, ConfigError, Count, MaybeCount, Rate
from mmtx.tasks.base import StepContext, TaskPart, TiedOutput, evaluating
from mmtx.tasks.decoding import beam_search
from mmtx.tasks.reports import log_text_table
from mmtx.tokenizers.text import TokenEmbedding, Vocab


def text_metric(name: str) -> Metric:
    """A corpus-level text metric that synchronises across ranks by itself (torchmetrics): `bleu`
    (sacreBLEU's 13a tokenization, case-sensitive, 0-100), `cer`, `wer` (0-1)."""
    if name == "bleu":
        return SacreBLEUScore(tokenize="13a")
    if name == "cer":
        return CharErrorRate()
    if name == "wer":
        return WordErrorRate()
    raise ConfigError(f"family.metrics: unknown metric {name!r}; known: bleu, cer, wer")


class TextDecoder(nn.Module):
    """Target embedding -> a causal stack with cross-attention to the encoder's output -> tied output
    layer (Vaswani et al., 2017; Whisper's TextDecoder). The stack is built from a backbone spec (the
    run's backbone settings with the family's `decoder` overrides), so no backbone setting is dropped.

    `forward` scores teacher-forced targets; `decode` runs new positions against per-block KV caches
    (self-attention keys grow; the encoder's cross-attention keys are computed once).
    """

    def __init__(self, dim: Count, vocab: Vocab | int, stack: dict[str, Any], max_len: int = 256,
                 pos_embed: str = "learned", dropout: Rate = 0.0) -> None:
        super().__init__()
        self.embed = TokenEmbedding(dim, vocab, max_len=max_len, pos_embed=pos_embed, dropout=dropout)
        stack = {**stack, "dim": dim, "cross_attention": True, "causal": True}
        stack["rotary"] = bool(stack.get("rotary")) or pos_embed == "none"  # no absolute positions: rotary ones
        self.stack = Backbone(**stack)
        scale_residual_init(self.stack)  # GPT-2's residual scaling, as for the language model
        self.head = TiedOutput(self.embed.embed)

    @property
    def max_len(self) -> int:
        return self.embed.max_len

    @property
    def vocab(self) -> Vocab | None:
        return self.embed.vocab

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                caches=None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for decoder inputs `ids` (B, T) at positions start.., given the encoder output (B, S, D)."""
        tokens = self.embed(TokenBatch(ids), start=start)
        x = self.stack(tokens, context=memory, context_mask=memory_mask, caches=caches)
        return self.head(x)

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None):
        return self.stack.new_caches(batch, max_len, device=device, dtype=dtype)


class Seq2Seq(TaskPart):
    """Teacher-forced encoder-decoder training with label smoothing, and beam-search decoding.

    Batches are `PairBatch`es: the source for the tokenizer (token ids or audio) and the target
    (`tokens`: BOS [+ prefix] + target, `targets`: target + EOS, IGNORE_INDEX at padding and under the
    prefix: forced tokens after BOS that are not predicted, such as Whisper's task prompt; `data.tgt_specials`). With `tie_embeddings`
    and one vocabulary for both sides, the source embedding is the target embedding too (itself tied
    to the output layer), as in Vaswani et al. (2017).

    Validation decodes `val_decode_batches` batches spread over the epoch (null: all; 0: none) with
    `val_beam_size` and logs `metrics` (bleu, cer, wer) as `val/<metric>`; test decodes everything
    with `beam_size`. Examples (source, reference, hypothesis) are logged as a table: the first
    `log_examples` at each validation, all of this process's at test (`<run>/{stage}_examples.tsv`).
    """

    kind = "seq2seq"
    can = frozenset({"generate"})

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        vocab: Vocab,
        bos_id: int,
        eos_id: int,
        decoder: dict[str, Any],
        prefix_ids: Sequence[int] = (),
        max_len: int = 256,
        pos_embed: str = "learned",
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
        super().__init__()
        self.tokenizer = tokenizer
        self.decoder = self.make_decoder(dim, vocab, decoder, max_len, pos_embed)
        self.bos_id, self.eos_id, self.prefix_ids = bos_id, eos_id, [int(i) for i in prefix_ids]
        self.label_smoothing = label_smoothing
        self.search = {"beam_size": beam_size, "length_penalty": length_penalty,
                       "max_len": max_decode_len if max_decode_len is not None else max_len}  # None: the data's
        self.metrics = nn.ModuleDict({name: text_metric(name) for name in metrics})
        self.val_decode_batches, self.val_beam_size = val_decode_batches, val_beam_size
        self.log_examples = log_examples
        src, tgt = self.vocab, self.tgt_vocab
        if tie_embeddings and src is not None and tgt is not None and (src is tgt or src.to_json() == tgt.to_json()):
            self.tokenizer.embed.weight = self.decoder.embed.embed.weight  # one vocabulary: one matrix
        self._examples: list[list[str]] = []

    def make_decoder(self, dim: int, vocab: Vocab, decoder: dict[str, Any], max_len: int, pos_embed: str) -> nn.Module:
        """The target side: a `TextDecoder` (its own stack, cross-attending); `PrefixLM` has no stack of its own."""
        return TextDecoder(dim, vocab, decoder, max_len=max_len, pos_embed=pos_embed, dropout=decoder.get("dropout", 0.0))

    @property
    def tgt_vocab(self) -> Vocab | None:
        return self.decoder.vocab

    @property
    def sample_rate(self) -> int | None:
        return getattr(self.tokenizer, "sample_rate", None)

    def encode(self, backbone: nn.Module, source: TokenBatch | AudioBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokenizer(source)  # Tokens: (B, S, D), mask (B, S) | None
        return backbone(tokens), tokens.mask

    def run_decoder(self, backbone: nn.Module, ids: torch.Tensor, memory: torch.Tensor,
                    memory_mask: torch.Tensor | None, caches=None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) of target ids (B, T) at positions start.., given `encode`'s output (B, S, D)."""
        return self.decoder(ids, memory, memory_mask, caches, start)

    def new_decoder_caches(self, backbone: nn.Module, batch: int, max_len: int, memory: torch.Tensor):
        """KV caches for decoding up to `max_len` target positions of `batch` rows."""
        return self.decoder.new_caches(batch, max_len, device=memory.device, dtype=memory.dtype)

    def forward(self, backbone: nn.Module, batch: PairBatch) -> torch.Tensor:
        memory, memory_mask = self.encode(backbone, batch.source)
        return self.run_decoder(backbone, batch.target.tokens, memory, memory_mask)  # (B, T, V)

    outputs_needed = ()  # decoding at validation runs its own forward passes

    def loss(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """Mean (label-smoothed) cross-entropy of the target tokens, in float32."""
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.target.targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)

    def step(self, logits: torch.Tensor | None, batch: PairBatch, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        targets = batch.target.targets
        loss = self.loss(logits, batch) if loss is None else loss
        if stage == "train":
            self.log_train_loss(loss, ctx)
        else:
            n = int((targets != IGNORE_INDEX).sum())  # a device read: not on a training step
            ctx.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if stage == "test" or (stage == "val" and self._decode_at_validation(ctx)):
            self._score(ctx.backbone, batch, self.val_beam_size if stage == "val" else None)
        return loss

    def _decode_at_validation(self, ctx: StepContext) -> bool:
        """Whether this validation batch is one of the `val_decode_batches` decoded: spread evenly over
        the epoch's batches, which the data module orders by length, so they cover every length."""
        k = self.val_decode_batches
        if k is None:
            return True
        trainer = ctx.trainer
        batch_idx = ctx.batch_idx
        counts = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = int(counts[0]) if counts and counts[0] != float("inf") else 0
        if total <= k:
            return batch_idx < k
        return batch_idx in {i * total // k for i in range(k)}

    def _score(self, backbone: nn.Module, batch: PairBatch, beam_size: int | None) -> None:
        if batch.refs is None:
            return
        hyps = self.translate(backbone, batch.source, beam_size=beam_size)
        for metric in self.metrics.values():
            metric.update(hyps, [[r] for r in batch.refs] if isinstance(metric, SacreBLEUScore) else list(batch.refs))
        sources = [str(s) for s in batch.sources or [""] * len(batch.refs)]
        self._examples += [list(row) for row in zip(sources, batch.refs, hyps)]

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        examples, self._examples = self._examples, []
        for name, metric in self.metrics.items():
            if metric.update_called:  # reduced across ranks by torchmetrics
                ctx.log(f"{stage}/{name}", metric.compute() * (100 if name == "bleu" else 1), prog_bar=True)
            metric.reset()
        if ctx.sanity_checking or self.log_examples <= 0 or not examples:
            return
        rows = examples if stage == "test" else examples[: self.log_examples]
        log_text_table(ctx.trainer, f"{ctx.prefix}{stage}_examples", ["step", "source", "reference", "hypothesis"],
                       [[ctx.global_step, *row] for row in rows], append=stage != "test")

    # -- the vocabularies travel with the run ---------------------------------------------------

    def save_files(self, folder: Path) -> None:
        super().save_files(folder)
        if self.tgt_vocab is not None:
            self.tgt_vocab.save(folder / "tgt_tokenizer.json")

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from mmtx.data.seq2seq import seq2seq_runtime

        if "mmtx_tgt_vocab" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no target tokenizer (mmtx_tgt_vocab): it was not written "
                                  "by an encoder-decoder training run of mmtx")
        src = Vocab.from_json(checkpoint["mmtx_vocab"]) if "mmtx_vocab" in checkpoint else None
        specials = OmegaConf.to_container(cfg.data.tgt_specials) if cfg.data.get("tgt_specials") else None
        return seq2seq_runtime(Vocab.from_json(checkpoint["mmtx_tgt_vocab"]), cfg.data.max_src_len,
                               cfg.data.max_tgt_len, src, checkpoint.get("mmtx_sample_rate"), specials)

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.tgt_vocab is not None:
            state["mmtx_tgt_vocab"] = self.tgt_vocab.to_json()
        if self.sample_rate is not None:
            state["mmtx_sample_rate"] = self.sample_rate
        return state

    # -- the one decode entry ----------------------------------------------------------------------

    def translate(self, backbone: nn.Module, source: TokenBatch | AudioBatch, **search: Any) -> list[str]:
        """The decoded text of every source in `source` (search: beam_size, max_len, length_penalty)."""
        with evaluating(self, backbone):
            ids = self.decode(backbone, source, **search)
        return [self.tgt_vocab.decode(row) for row in ids]

    @torch.no_grad()
    def decode(self, backbone: nn.Module, source: TokenBatch | AudioBatch, beam_size: int | None = None,
               max_len: int | None = None, length_penalty: float | None = None,
               use_cache: bool = True) -> list[list[int]]:
        """Beam-search the target ids (no BOS/EOS) of every source in `source`; beam_size=1 is greedy.

        With the cache each step runs one new position; without it each step reruns the decoder on
        the whole prefix (for comparison).
        """
        K = beam_size or self.search["beam_size"]
        memory, memory_mask = self.encode(backbone, source)
        memory = memory.repeat_interleave(K, 0)  # (B*K, S, D): one copy per hypothesis
        memory_mask = memory_mask.repeat_interleave(K, 0) if memory_mask is not None else None
        limit = min(max_len or self.search["max_len"], self.decoder.max_len)

        def step(ids, caches, t):
            if caches:
                return self.run_decoder(backbone, ids[:, t:], memory, memory_mask, caches, t)
            return self.run_decoder(backbone, ids, memory, memory_mask)

        def new_caches(n):
            return self.new_decoder_caches(backbone, n, limit, memory) if use_cache else []

        lp = self.search["length_penalty"] if length_penalty is None else length_penalty
        return beam_search(step, new_caches, memory.shape[0] // K, self.bos_id, self.eos_id, K, limit, lp,
                           device=memory.device, prefix=self.prefix_ids)
