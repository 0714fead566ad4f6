"""The LightningModules: tokenizer -> backbone -> head -> loss, one per kind of head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mmtx.batch import AudioBatch, Batch, ImageBatch
from mmtx.errors import NonFiniteError
from mmtx.loggers import log_confusion_matrix, log_media
from mmtx.optim import build_optimizer

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is NaN or infinite, as AMP's GradScaler skips
    steps whose gradients overflowed, and stops the run after `max_steps` such steps in a row.

    The decision is one device sync a step (and, with several ranks, one all-reduce of a flag, so that
    every rank skips the same steps).
    """

    def __init__(self, max_steps: int = 10) -> None:
        self.max_steps = max_steps
        self.run = 0  # consecutive skipped steps
        self.skipped = 0  # all skipped steps of this process
        self.last_finite: tuple[int, torch.Tensor | None] | None = None  # (step, loss) of the last step taken
        self._loss: torch.Tensor | None = None  # summed over this step's micro-batches

    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss = loss if self._loss is None else self._loss + loss

    def skip_step(self, grad_norm: torch.Tensor | None, trainer: L.Trainer) -> bool:
        loss, self._loss = self._loss, None
        checks = [t.float().reshape(1) for t in (loss, grad_norm) if t is not None]
        if not checks:
            return False
        bad = (~torch.isfinite(torch.cat(checks))).any().float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bool(bad):
            self.run = 0
            self.last_finite = (trainer.global_step + 1, loss)  # read only if the run stops: no sync here
            return False
        self.run += 1
        self.skipped += 1
        step = trainer.global_step + 1
        if self.run == 1:
            log.warning("step %d: the loss or gradient norm is not finite; skipping this optimizer step "
                        "(module.max_nonfinite_steps=%d in a row stop the run)", step, self.max_steps)
        if self.run >= self.max_steps:
            raise NonFiniteError(self.message(step, trainer))
        return True

    def message(self, step: int, trainer: L.Trainer) -> str:
        lr = trainer.lightning_module.optim.get("lr")
        if self.last_finite is None or self.last_finite[1] is None:
            last = "no step had a finite loss"
        else:
            last = f"the last finite loss was {float(self.last_finite[1]):.4g}, at step {self.last_finite[0]}"
        return (
            f"training stopped at step {step}: the loss or gradient norm was NaN or infinite for {self.run} "
            f"optimizer steps in a row (module.max_nonfinite_steps={self.max_steps}), each skipped; {last}. "
            f"Likely causes: a learning rate too high (optim.lr={lr}: try a tenth of it, or a longer "
            f"optim.warmup_fraction), or overflow in reduced precision (trainer.precision={trainer.precision}: "
            "try trainer.precision=32-true or bf16-mixed)"
        )


class TaskModule(L.LightningModule):
    """What every mmtx task shares: the three stages, AdamW + warm-up/cosine, and
    checkpoints that carry the run configuration (and the text vocabulary, if any)
    so `mmtx.eval` and `mmtx.generate` rebuild exactly this model.

    Subclasses define `shared_step(batch, stage)`.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        optim: dict[str, Any],
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.head = head
        self.optim = dict(optim)
        self.run_config = run_config or {}
        self._forward = torch.compile(self.forward_logits) if compile else self.forward_logits
        self.guard = NonFiniteGuard(max_nonfinite_steps)

    def forward_logits(self, batch: Batch) -> torch.Tensor:
        tokens = self.head.prepare(self.tokenizer(batch))  # Tokens: (B, T, D), mask (B, T) | None
        x = self.backbone(tokens)  # (B, T, D)
        return self.head(x, tokens.mask)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch)

    @property
    def vocab(self):
        return getattr(self.tokenizer, "vocab", None)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch, "train")
        self.guard.add_loss(loss.detach())
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        optimizer, schedule = build_optimizer(self, total_steps=total, **self.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Once per optimizer step, after backward (gradients unscaled under AMP) and before the step.

        The global L2 norm of the gradients, computed once, decides whether the step is taken
        (`NonFiniteGuard`; a GradScaler's overflowing steps are its own business), is logged as
        `train/grad_norm` (before clipping; this rank's shard under FSDP) on logged steps, and clips
        by norm (`trainer.gradient_clip_val`) without being computed a second time.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self.guard.skip_step(norm if scaler is None else None, self.trainer):
            for p in self.parameters():
                p.grad = None  # the optimizer leaves parameters without gradients as they are
            self.log("train/skipped_steps", float(self.guard.skipped), on_step=True, on_epoch=False)
            return
        if norm is not None and self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        by_norm = (gradient_clip_algorithm or "norm") == "norm"
        if gradient_clip_val and by_norm and norm is not None and not isinstance(self.trainer.strategy, FSDPStrategy):
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), gradient_clip_val, norm)
        else:  # clipping by value, or FSDP's own sharded clipping
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def weights_are_finite(self) -> bool:
        """True when every parameter is finite and the last optimizer step was not skipped as non-finite."""
        if self.guard.run:
            return False
        checks = [torch.isfinite(p).all() for p in self.parameters()]
        return bool(torch.stack(checks).all()) if checks else True  # one device sync

    def on_fit_start(self) -> None:
        if self.vocab is not None and self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)  # a user's own Trainer may name a folder not made yet
            self.vocab.save(folder / "tokenizer.json")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmtx_config"] = self.run_config
        if getattr(self, "run_info", None):
            checkpoint["mmtx_run_info"] = self.run_info  # seed, versions, git commit (mmtx.runinfo)
        for logger in self.loggers if self._trainer is not None else []:
            if type(logger).__name__ == "WandbLogger":
                checkpoint["mmtx_wandb_id"] = logger.version  # a resumed run continues this W&B run
        if self.vocab is not None:
            checkpoint["mmtx_vocab"] = self.vocab.to_json()


class ClassificationModule(TaskModule):
    """Encoder-only classification (images today; audio later).

    Loss: cross-entropy with label smoothing; with soft targets from
    Mixup/CutMix, the same smoothing is applied to them. Metrics: top-1
    accuracy (torchmetrics) logged as `{stage}/acc` beside `{stage}/loss`;
    with `confusion_matrix`, the validation and test confusion matrices are
    logged at each epoch end (a W&B plot, TensorBoard text, `<run>/{stage}_confusion.tsv`).
    At each validation end, the first `media_samples` images or audio clips of the
    validation split are logged with their true and predicted labels (W&B images or
    audio with captions; TensorBoard images); 0 turns this off.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        optim: dict[str, Any],
        label_smoothing: float = 0.1,
        class_names: list[str] | None = None,
        confusion_matrix: bool = True,
        media_samples: int = 16,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, backbone, head, optim, compile, max_nonfinite_steps, run_config)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.class_names = list(class_names or range(num_classes))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.media_samples = media_samples
        self._media: dict[str, Any] = {}
        self.confusion = nn.ModuleDict(
            {f"{s}_": MulticlassConfusionMatrix(num_classes) for s in ("val", "test")} if confusion_matrix else {}
        )

    def loss(self, logits: torch.Tensor, batch: ImageBatch | AudioBatch) -> torch.Tensor:
        target = getattr(batch, "soft_label", None)  # Mixup/CutMix: (B, K) probabilities
        if target is None:
            return F.cross_entropy(logits.float(), batch.label, label_smoothing=self.label_smoothing)
        target = target * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def shared_step(self, batch: ImageBatch | AudioBatch, stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch)
        if stage == "val" and self.media_samples and not self._media:
            self._keep_media(batch, logits.detach().argmax(-1))
        metric = getattr(self, f"{stage}_acc")
        metric(logits.detach(), batch.label)
        if f"{stage}_" in self.confusion:
            self.confusion[f"{stage}_"].update(logits.detach().argmax(-1), batch.label)
        on_step = stage == "train"
        batch_size = len(batch)
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def _log_confusion(self, stage: str) -> None:
        if f"{stage}_" not in self.confusion:
            return
        matrix = self.confusion[f"{stage}_"].compute()  # (true, predicted) counts, reduced across ranks
        self.confusion[f"{stage}_"].reset()
        if not self.trainer.sanity_checking:
            log_confusion_matrix(self.trainer, f"{stage}_confusion", matrix.cpu(), [str(c) for c in self.class_names])

    def on_validation_epoch_end(self) -> None:
        self._log_confusion("val")
        media, self._media = self._media, {}
        if media and not self.trainer.sanity_checking:
            log_media(self.trainer, "val_samples", **media)

    def _keep_media(self, batch: ImageBatch | AudioBatch, predicted: torch.Tensor) -> None:
        """The first `media_samples` inputs of the epoch's first validation batch, with their labels."""
        n = self.media_samples
        names = [str(c) for c in self.class_names]
        captions = [f"true {names[t]} / predicted {names[p]}" for t, p in zip(batch.label[:n].tolist(), predicted[:n].tolist())]
        if isinstance(batch, ImageBatch):
            dm = self.trainer.datamodule
            images = batch.image[:n].float()
            if getattr(dm, "mean", None) is not None:  # undo the normalisation: back to [0, 1]
                images = (images * dm.std.to(images.device) + dm.mean.to(images.device)) / 255.0
            self._media = {"images": images.clamp(0, 1).cpu(), "captions": captions}
        else:
            lengths = batch.lengths[:n].tolist()
            clips = [clip[:length].float().cpu() for clip, length in zip(batch.audio[:n], lengths)]
            self._media = {"audio": clips, "sample_rate": getattr(self.tokenizer, "sample_rate", 16000), "captions": captions}

    def on_test_epoch_end(self) -> None:
        self._log_confusion("test")
