"""The LightningModules: tokenizer -> backbone -> head -> loss, one per kind of head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mmtx.loggers import log_confusion_matrix, log_media

from mmtx.optim import build_optimizer


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
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.head = head
        self.optim = dict(optim)
        self.run_config = run_config or {}
        self._forward = torch.compile(self.forward_logits) if compile else self.forward_logits

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.head.prepare(self.tokenizer(batch))  # Tokens: (B, T, D), mask (B, T) | None
        x = self.backbone(tokens)  # (B, T, D)
        return self.head(x, tokens.mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._forward(batch)

    @property
    def vocab(self):
        return getattr(self.tokenizer, "vocab", None)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        optimizer, schedule = build_optimizer(self, total_steps=total, **self.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log `train/grad_norm`: the global L2 norm of the gradients before clipping (this rank's shard
        under FSDP), on the steps that are logged."""
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps):
            return
        norms = [p.grad.detach().norm(2) for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)), on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        if self.vocab is not None and self.trainer.is_global_zero:
            self.vocab.save(Path(self.trainer.default_root_dir) / "tokenizer.json")

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
        label_smoothing: float = 0.0,
        class_names: list[str] | None = None,
        confusion_matrix: bool = True,
        media_samples: int = 16,
        compile: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, backbone, head, optim, compile, run_config)
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

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch.get("target")
        if target is None:
            return F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        target = target * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch)
        if stage == "val" and self.media_samples and not self._media:
            self._keep_media(batch, logits.detach().argmax(-1))
        metric = getattr(self, f"{stage}_acc")
        metric(logits.detach(), batch["label"])
        if f"{stage}_" in self.confusion:
            self.confusion[f"{stage}_"].update(logits.detach().argmax(-1), batch["label"])
        on_step = stage == "train"
        batch_size = batch["label"].shape[0]
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

    def _keep_media(self, batch: dict[str, torch.Tensor], predicted: torch.Tensor) -> None:
        """The first `media_samples` inputs of the epoch's first validation batch, with their labels."""
        n = self.media_samples
        names = [str(c) for c in self.class_names]
        captions = [f"true {names[t]} / predicted {names[p]}" for t, p in zip(batch["label"][:n].tolist(), predicted[:n].tolist())]
        if "image" in batch:
            dm = self.trainer.datamodule
            images = batch["image"][:n].float()
            if getattr(dm, "mean", None) is not None:  # undo the normalisation: back to [0, 1]
                images = (images * dm.std.to(images.device) + dm.mean.to(images.device)) / 255.0
            self._media = {"images": images.clamp(0, 1).cpu(), "captions": captions}
        elif "audio" in batch:
            lengths = batch["audio_lengths"][:n].tolist()
            clips = [clip[:length].float().cpu() for clip, length in zip(batch["audio"][:n], lengths)]
            self._media = {"audio": clips, "sample_rate": getattr(self.tokenizer, "sample_rate", 16000), "captions": captions}

    def on_test_epoch_end(self) -> None:
        self._log_confusion("test")
