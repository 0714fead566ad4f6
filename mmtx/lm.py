"""Decoder-only language modelling: the causal LM module, its metrics and its samples."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.backbone import scale_residual_init
from mmtx.batch import IGNORE_INDEX, TokenBatch
from mmtx.generation import generate
from mmtx.loggers import log_text_table
from mmtx.module import TaskModule

log = logging.getLogger(__name__)


class LMModule(TaskModule):
    """Next-token prediction over the shared backbone (run causal).

    The head's output matrix is the tokenizer's embedding matrix (tied). The
    residual output projections start scaled by 1/sqrt(2 * depth) (GPT-2,
    Radford et al., 2019) so the residual stream's variance does not grow
    with depth. Metrics: `{stage}/loss` in nats per token (`train/loss`: the
    mean since it was last logged) and, when the data says how many
    characters a token covers, `val/bpc` and `test/bpc` (bits per character
    = loss / ln 2 / chars_per_token), comparable across vocabularies.
    At each validation end, `samples` continuations of `sample_prompts` are
    logged as a table (W&B: a table; TensorBoard: text; always
    `<run dir>/samples.tsv`).
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        optim: dict[str, Any],
        chars_per_token: float | None = None,
        sample_prompts: Sequence[str] = ("\n",),
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 200,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, backbone, head, optim, compile, max_nonfinite_steps, run_config)
        if getattr(tokenizer, "pos", None) is None and not backbone.rotary:
            log.warning("this language model has no positions (tokenizer.pos_embed=none, backbone.rotary=false): "
                        "only causal masking tells it where a token is")
        self.head.proj.weight = self.tokenizer.embed.weight  # tied input and output embeddings
        scale_residual_init(backbone)
        self.chars_per_token = chars_per_token
        self.sample_prompts = list(sample_prompts)
        self.sample = {"max_new_tokens": sample_tokens, "temperature": sample_temperature, "top_k": sample_top_k}
        self._train_loss: torch.Tensor | None = None  # summed since train/loss was last logged
        self._train_steps = 0

    def forward_logits(self, batch: TokenBatch) -> torch.Tensor:
        """Next-token logits (B, T, V): the language model owns causality, so the shared backbone runs
        causally here whatever its configuration (a classifier may use the same weights bidirectionally)."""
        tokens = self.head.prepare(self.tokenizer(batch))  # Tokens: (B, T, D)
        return self.head(self.backbone(tokens, causal=True), tokens.mask)

    # -- the model as a decoder ----------------------------------------------------

    @property
    def max_len(self) -> int:
        return self.tokenizer.max_len

    def decode(self, ids: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T) at positions start..start+T-1."""
        tokens = self.tokenizer(TokenBatch(ids), start=start)
        return self.head(self.backbone(tokens, caches=caches, causal=True))

    def new_caches(self, batch: int, max_len: int):
        p = self.tokenizer.embed.weight
        return self.backbone.new_caches(batch, max_len, device=p.device, dtype=_compute_dtype(p))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6N + 12 L D T (Kaplan et al., 2020; PaLM, Appendix B).

        N counts the parameters minus the position table (the tied embedding
        counts once, as the output matmul); 12 L D T is attention's QK^T and AV.
        """
        n = sum(p.numel() for p in self.parameters())
        if getattr(self.tokenizer, "pos", None) is not None:
            n -= self.tokenizer.pos.numel()
        return 6 * n + 12 * self.backbone.depth * self.backbone.dim * seq_len

    # -- training ----------------------------------------------------------------------

    def shared_step(self, batch: TokenBatch, stage: str) -> torch.Tensor:
        logits = self(batch)  # (B, T, V)
        targets = batch.targets  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        if stage == "train":
            self._log_train_loss(loss.detach())
            return loss
        n = targets.numel()
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if self.chars_per_token:
            bpc = loss / math.log(2) / self.chars_per_token
            self.log(f"{stage}/bpc", bpc, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def _log_train_loss(self, loss: torch.Tensor) -> None:
        """`train/loss`: the mean over the steps since the loggers last wrote (as the Hugging Face
        Trainer reports it), logged on the steps they write (`trainer.log_every_n_steps`) only.

        Language models train by steps, so an epoch mean says little; and Lightning's `self.log`
        costs about a millisecond a call on the CPU, a few percent of a small model's step.
        """
        self._train_loss = loss if self._train_loss is None else self._train_loss + loss  # on the device: no sync
        self._train_steps += 1
        step = self.trainer.global_step + 1  # this step's number, once the optimizer has stepped
        if step % self.trainer.log_every_n_steps and step != self.trainer.max_steps:
            return
        self.log("train/loss", self._train_loss / self._train_steps, on_step=True, on_epoch=False, prog_bar=True)
        self._train_loss, self._train_steps = None, 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The train/loss window in progress, so that a resumed run logs the means an unbroken one would.
        window = None if self._train_loss is None else self._train_loss.detach().float().cpu()
        checkpoint["mmtx_train_loss_window"] = {"sum": window, "steps": self._train_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        window = checkpoint.get("mmtx_train_loss_window") or {}
        self._train_loss, self._train_steps = window.get("sum"), int(window.get("steps", 0))

    def on_validation_epoch_end(self) -> None:
        if self.vocab is None or not self.sample_prompts or self.sample["max_new_tokens"] <= 0:
            return
        if self.trainer.sanity_checking:
            return
        rows = [[self.global_step, prompt, self.complete(prompt, **self.sample)] for prompt in self.sample_prompts]
        log_text_table(self.trainer, "samples", ["step", "prompt", "text"], rows)

    def complete(self, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> str:
        """The text of `prompt` continued by the model."""
        ids = torch.tensor([self.vocab.encode(prompt)], device=self.device)
        was_training = self.training
        self.eval()
        out = generate(self, ids, max_new_tokens, temperature, top_k, top_p, generator=generator)
        self.train(was_training)
        return self.vocab.decode(out[0].tolist())


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype activations have: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(p.device.type):
        return torch.get_autocast_dtype(p.device.type)
    return p.dtype
