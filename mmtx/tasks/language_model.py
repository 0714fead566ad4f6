"""Decoder-only language modelling: next-token loss over the shared backbone run causally, bits per
character, and sampled continuations."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.backbone import scale_residual_init
from mmtx.batch import IGNORE_INDEX, TokenBatch
from mmtx.errors import CheckpointError, ConfigError, Count, MaybeNatural, Natural, NonNegative
from mmtx.tasks.base import StepContext, TaskPart, TiedOutput, evaluating, whole_weights
from mmtx.tasks.decoding import compute_dtype, generate
from mmtx.tasks.reports import log_text_table

log = logging.getLogger(__name__)


class CausalLM:
    """The language model as a decoder for `mmtx.tasks.decoding.generate`: a token embedding, the shared
    backbone run causally (with KV caches), and the tied output layer."""

    def __init__(self, part: "LanguageModel", backbone: nn.Module) -> None:
        self.part, self.backbone = part, backbone
        self.max_len = part.tokenizer.max_len  # the longest context it was trained for

    def decode(self, ids: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T) at positions start..start+T-1."""
        tokens = self.part.tokenizer(TokenBatch(ids), start=start)
        logits = self.part.head(self.backbone(tokens, caches=caches, causal=True))
        return logits[..., :self.part.tokenizer.vocab_size]  # never a padding row (tokenizer.vocab.pad_to_multiple_of)

    def new_caches(self, batch: int, max_len: int):
        p = self.part.tokenizer.embed.weight
        return self.backbone.new_caches(batch, max_len, device=p.device, dtype=compute_dtype(p))


class LanguageModel(TaskPart):
    """Next-token prediction. The language model owns causality: the shared backbone runs causally here
    whatever else uses it. The output matrix is the token embedding (tied, `TiedOutput`); the backbone's
    residual output projections start scaled by 1/sqrt(2 * depth) (GPT-2, Radford et al., 2019).

    Metrics: `{stage}/loss` in nats per token (`train/loss`: the mean since it was last logged) and,
    when the data says how many characters a token covers, `val/bpc` and `test/bpc` (loss / ln 2 /
    chars_per_token), comparable across vocabularies. At each validation end, `sample_tokens`
    continuations of each of `sample_prompts` are logged as a table (`<run dir>/samples.tsv`); with none given,
    the data's `default_prompt` (a newline when the vocabulary has one, else the training text's first token). A
    prompt the vocabulary cannot encode is an error naming `family.sample_prompts`, when the model is built.
    """

    kind = "language_model"
    can = frozenset({"generate"})

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        chars_per_token: float | None = None,
        sample_prompts: Sequence[str] | None = None,
        sample_tokens: Natural = 200,
        sample_temperature: NonNegative = 0.8,
        sample_top_k: MaybeNatural = 200,
        default_prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        if tokenizer.embed.embedding_dim != dim:
            raise ConfigError(f"the token embedding is {tokenizer.embed.embedding_dim} wide but backbone.dim={dim}")
        self.head = TiedOutput(tokenizer.embed)
        self.chars_per_token = chars_per_token
        self.default_prompt = default_prompt
        self.sample_prompts = self._prompts(sample_prompts)
        self.sample = {"max_new_tokens": sample_tokens, "temperature": sample_temperature, "top_k": sample_top_k}

    def _prompts(self, given: Sequence[str] | None) -> list[str]:
        """The prompts samples continue: `given` (each checked against the vocabulary now, not at the first
        validation), else the default prompt (the data's, else a newline the vocabulary can encode), else none."""
        if given is None:
            given = [self.default_prompt] if self.default_prompt else []
            if not given and self.vocab is not None:
                with contextlib.suppress(ConfigError):
                    given = ["\n"] if self.vocab.encode("\n") else []
            return list(given)
        for prompt in given:
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f"family.sample_prompts holds {prompt!r}: each prompt must be a non-empty string "
                                  "(null: a default prompt from the training text)")
            if self.vocab is not None:
                try:
                    self.vocab.encode(prompt)
                except ConfigError as err:
                    raise ConfigError(f"family.sample_prompts: the prompt {prompt!r} cannot be encoded: {err} (null: "
                                      "a default prompt from the training text)") from None
        return list(given)

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        from mmtx.data.text import text_runtime
        from mmtx.tokenizers.text import Vocab

        if "mmtx_vocab" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no tokenizer (it was not written by a text task's training "
                                  "run)")
        return text_runtime(Vocab.from_json(checkpoint["mmtx_vocab"]), cfg.data.block_size,
                            default_prompt=checkpoint.get("mmtx_default_prompt"))

    def extra_state(self) -> dict[str, Any]:
        # The prompt a checkpoint's model continues by default (mmtx.generate without prompt=).
        return {**super().extra_state(), "mmtx_default_prompt": self.sample_prompts[0] if self.sample_prompts else None}

    def attach(self, backbone: nn.Module) -> None:
        if getattr(self.tokenizer, "pos", None) is None and not backbone.rotary:
            log.warning("this language model has no positions (tokenizer.pos_embed=none, backbone.rotary=false): "
                        "only causal masking tells it where a token is")
        scale_residual_init(backbone)

    def forward(self, backbone: nn.Module, batch: TokenBatch) -> torch.Tensor:
        tokens = self.tokenizer(batch)  # Tokens: (B, T, D)
        return self.head(backbone(tokens, causal=True))  # (B, T, V)

    def flops_per_token(self, backbone: nn.Module, num_params: int, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6N + 12 L D T (Kaplan et al., 2020; PaLM,
        Appendix B). N: `num_params` minus the position table (the tied embedding counts once, as the
        output matmul); 12 L D T is attention's QK^T and AV."""
        pos = getattr(self.tokenizer, "pos", None)
        n = num_params - (pos.numel() if pos is not None else 0)
        return 6 * n + 12 * backbone.depth * backbone.dim * seq_len

    # -- training ---------------------------------------------------------------------------

    outputs_needed = ()  # the loss is all a step reads: the logits stay inside the compiled graph

    def loss(self, logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Mean next-token cross-entropy, in float32 (compiled, the cast fuses into the softmax's kernels: no
        float32 copy of the (B, T, V) logits is written)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)

    def step(self, logits: torch.Tensor | None, batch: TokenBatch, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        targets = batch.targets  # (B, T)
        loss = self.loss(logits, batch) if loss is None else loss
        if stage == "train":
            self.log_train_loss(loss, ctx)
            return loss
        n = targets.numel()
        ctx.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if self.chars_per_token:
            bpc = loss / math.log(2) / self.chars_per_token
            ctx.log(f"{stage}/bpc", bpc, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        if stage != "val" or self.vocab is None or not self.sample_prompts or self.sample["max_new_tokens"] <= 0:
            return
        if ctx.sanity_checking:
            return
        # An own generator, seeded by the step: the samples are reproducible and training's random numbers
        # (data offsets, dropout) are the same with samples on or off.
        generator = torch.Generator(self.tokenizer.embed.weight.device).manual_seed(ctx.global_step)
        with whole_weights(ctx.trainer):  # FSDP: the embedding and head are flat shards outside a step
            rows = [[ctx.global_step, p, self.complete(ctx.backbone, p, **self.sample, generator=generator)]
                    for p in self.sample_prompts]
        log_text_table(ctx.trainer, f"{ctx.prefix}samples", ["step", "prompt", "text"], rows)

    # -- the one generation entry -------------------------------------------------------------

    def complete(self, backbone: nn.Module, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> str:
        """The text of `prompt` continued by the model (sampling; temperature 0 is greedy; `use_cache`: with KV
        caches, else every step runs the whole context, the last `max_len` tokens)."""
        device = self.tokenizer.embed.weight.device
        ids = self.vocab.encode(prompt)
        if not ids:
            raise ConfigError(f"the prompt {prompt!r} encodes to no token: give a prompt with text in it")
        ids = torch.tensor([ids], device=device)
        with evaluating(self, backbone):
            out = generate(CausalLM(self, backbone), ids, max_new_tokens, temperature, top_k, top_p,
                           use_cache=use_cache, generator=generator)
        return self.vocab.decode(out[0].tolist())
