"""Classification (images, audio): pool the backbone's output, one linear layer, cross-entropy, accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mmtx.batch import AudioBatch, ImageBatch, Tokens
from mmtx.data.modalities import modality_of
from mmtx.errors import CheckpointError, ConfigError, Count, Natural, Rate
from mmtx.tasks.base import StepContext, TaskPart
from mmtx.tasks.reports import log_confusion_matrix, log_media


class ClsPool(nn.Module):
    """A learned CLS token is put in front of the tokens (`prepare`); its output is the pooled vector (ViT)."""

    def __init__(self, dim: Count) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"token"}

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens.prepend(self.token.expand(tokens.x.shape[0], -1, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 0]  # (B, T, D) -> (B, D)


class MeanPool(nn.Module):
    """The mean over real tokens (padding excluded); no extra token (many CIFAR ViTs, audio models)."""

    def __init__(self, dim: Count) -> None:
        super().__init__()

    def prepare(self, tokens: Tokens) -> Tokens:
        return tokens

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)  # (B, T, D) -> (B, D)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)


POOLS = {"cls": ClsPool, "mean": MeanPool}  # family.pool


class ClassifierHead(nn.Module):
    """Pool the backbone output (`family.pool`: cls | mean), then one linear layer to class logits."""

    def __init__(self, dim: Count, num_classes: int, pool: str = "cls", dropout: Rate = 0.0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"family.pool must be one of {sorted(POOLS)}, got {pool!r}")
        self.pool = POOLS[pool](dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, num_classes)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def prepare(self, tokens: Tokens) -> Tokens:
        return self.pool.prepare(tokens)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.drop(self.pool(x, mask)))  # (B, T, D) -> (B, D) -> (B, num_classes)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class probabilities (B, K), smoothed as `F.cross_entropy` smooths hard labels."""
    target = target * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Classification(TaskPart):
    """Encoder-only classification of an image or audio batch.

    Loss: cross-entropy with `label_smoothing`; Mixup/CutMix soft targets get the same smoothing.
    Metrics: top-1 accuracy (torchmetrics) as `{stage}/acc` beside `{stage}/loss`; with
    `confusion_matrix`, the validation and test confusion matrices at each epoch end (a W&B plot,
    TensorBoard text, `<run>/{stage}_confusion.tsv`). At each validation end, the first
    `media_samples` images or clips of the validation split are logged with their true and predicted
    labels (0: off). `predict(backbone, batch)` gives class probabilities.
    """

    kind = "classification"
    can = frozenset({"predict"})

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        num_classes: int,
        pool: str = "cls",
        dropout: Rate = 0.0,
        label_smoothing: Rate = 0.1,
        class_names: list[str] | None = None,
        confusion_matrix: bool = True,
        media_samples: Natural = 16,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.head = ClassifierHead(dim, num_classes, pool=pool, dropout=dropout)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.class_names = [str(c) for c in (class_names or range(num_classes))]
        # Keyed "{stage}_": a ModuleDict key may not be a Module method's name (train).
        self.acc = nn.ModuleDict({f"{s}_": MulticlassAccuracy(num_classes, average="micro") for s in ("train", "val", "test")})
        self.confusion = nn.ModuleDict(
            {f"{s}_": MulticlassConfusionMatrix(num_classes) for s in ("val", "test")} if confusion_matrix else {}
        )
        self.media_samples = media_samples
        self._media: dict[int, list[tuple[torch.Tensor, int, int]]] = {}  # class -> (input, true, predicted)

    def prepare(self, tokens: Tokens) -> Tokens:
        return self.head.prepare(tokens)

    def forward(self, backbone: nn.Module, batch: ImageBatch | AudioBatch) -> torch.Tensor:
        tokens = self.prepare(self.tokenizer(batch))  # Tokens: (B, T, D), mask (B, T) | None
        return self.head(backbone(tokens), tokens.mask)  # (B, num_classes)

    @torch.no_grad()
    def predict(self, backbone: nn.Module, batch: ImageBatch | AudioBatch) -> torch.Tensor:
        """Class probabilities (B, num_classes)."""
        return self(backbone, batch).float().softmax(-1)

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        if "mmtx_runtime" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no mmtx_runtime (input size, classes): it was written by "
                                  "an older mmtx; train it again with this version")
        return checkpoint["mmtx_runtime"]

    def extra_state(self) -> dict[str, Any]:
        """The run-time values this part was built with (input geometry, classes), so that a checkpoint alone
        rebuilds it (`mmtx.predict`): {"mmtx_runtime": {"tokenizer": ..., "family": ...}}."""
        geometry = modality_of(self.tokenizer).geometry(self.tokenizer)
        family = {"num_classes": self.num_classes, "class_names": list(self.class_names)}
        return {**super().extra_state(), "mmtx_runtime": {"tokenizer": geometry, "family": family}}

    def loss(self, logits: torch.Tensor, batch: ImageBatch | AudioBatch) -> torch.Tensor:
        soft = getattr(batch, "soft_label", None)  # Mixup/CutMix (images): (B, K) probabilities
        if soft is not None:
            return soft_target_cross_entropy(logits, soft, self.label_smoothing)
        return F.cross_entropy(logits.float(), batch.label, label_smoothing=self.label_smoothing)

    def step(self, logits: torch.Tensor, batch: ImageBatch | AudioBatch, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.loss(logits, batch) if loss is None else loss
        accuracy = self.acc[f"{stage}_"]
        accuracy(logits.detach(), batch.label)
        if stage != "train":  # predicted labels feed the media and the confusion matrix, not training
            predicted = logits.detach().argmax(-1)
            if stage == "val" and self.media_samples and not ctx.sanity_checking:
                self._keep_media(batch, predicted)
            if f"{stage}_" in self.confusion:
                self.confusion[f"{stage}_"].update(predicted, batch.label)
        n = len(batch)
        if stage == "train":
            self.log_train_loss(loss, ctx)
        else:
            ctx.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        ctx.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        if f"{stage}_" in self.confusion:
            matrix = self.confusion[f"{stage}_"].compute()  # (true, predicted) counts, reduced across ranks
            self.confusion[f"{stage}_"].reset()
            if not ctx.sanity_checking:
                log_confusion_matrix(ctx.trainer, f"{ctx.prefix}{stage}_confusion", matrix.cpu(), self.class_names)
        kept, self._media = self._media, {}
        if stage == "val" and kept and not ctx.sanity_checking:
            log_media(ctx.trainer, f"{ctx.prefix}val_samples", **self._media_to_log(kept, ctx))

    @property
    def modality(self):
        """What the logged media of this part's inputs are (`mmtx.data.modalities`: images, clips)."""
        return modality_of(self.tokenizer)

    def _keep_media(self, batch: ImageBatch | AudioBatch, predicted: torch.Tensor) -> None:
        """Keep validation inputs for the logged media, stratified by class: the first ceil(media_samples /
        num_classes) of each class in the validation split's order (which is fixed, so every validation
        shows the same inputs, whatever order the split is in: a hold-out can be sorted by class)."""
        quota = -(-self.media_samples // self.num_classes)
        if len(self._media) == self.num_classes and all(len(v) >= quota for v in self._media.values()):
            return
        for i, (true, pred) in enumerate(zip(batch.label.tolist(), predicted.tolist())):
            kept = self._media.setdefault(true, [])
            if len(kept) < quota:
                kept.append((self.modality.media(batch, i), true, pred))

    def _media_to_log(self, kept: dict[int, list], ctx: StepContext) -> dict[str, Any]:
        """The kept inputs in round-robin order over the classes (every class before any repeats), at most
        media_samples, with "true A / predicted B" captions; images back in [0, 1]."""
        by_class = [kept[c] for c in sorted(kept)]
        picked = [group[r] for r in range(max(map(len, by_class))) for group in by_class if r < len(group)]
        picked = picked[: self.media_samples]
        names = self.class_names
        captions = [f"true {names[t]} / predicted {names[p]}" for _, t, p in picked]
        media = self.modality.media_log([x for x, _, _ in picked], ctx.trainer.datamodule, self.tokenizer)
        return {**media, "captions": captions}
