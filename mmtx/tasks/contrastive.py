"""Contrastive alignment of two fields of multimodal samples (CLIP, Radford et al. 2021; ImageBind, Girdhar et al.
2023): each field is encoded alone by the shared backbone, pooled and projected to a unit vector, and the symmetric
InfoNCE loss pulls a sample's two vectors together and pushes the other samples' apart, at a learned temperature.

Under DDP the negatives are every rank's samples: the embeddings are all-gathered with their gradients
(`torch.distributed.nn.functional.all_gather`), as open_clip's `gather_with_grad`.

Evaluation (validation and test, over the whole split): retrieval recall@k in both directions, where a retrieved
sample of the query's class counts (`{a}_to_{b}_r@k`: the paired sample alone is one of many right answers when
samples were paired by class), and zero-shot classification of the first field by the nearest class prototype of
the second (the mean of the second field's embeddings of each class in the split: `zero_shot_acc`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from mmtx.batch import FusedBatch
from mmtx.data.modalities import modality_of
from mmtx.errors import CheckpointError, ConfigError, Count, Positive
from mmtx.tasks.base import StepContext, TaskPart
from mmtx.tasks.classification import POOLS


class FieldEmbedding(nn.Module):
    """One field's pooled backbone output -> a unit vector of `embed_dim` (CLIP's projection, no bias)."""

    def __init__(self, dim: Count, embed_dim: Count, pool: str) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"family.pool must be one of {sorted(POOLS)}, got {pool!r}")
        self.pool = POOLS[pool](dim)
        self.proj = nn.Linear(dim, embed_dim, bias=False)
        trunc_normal_(self.proj.weight, std=dim ** -0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(x, mask)), dim=-1)  # (B, T, D) -> (B, D) -> (B, E)


def gathered(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's `x` concatenated, with gradients flowing back to each rank's own rows; this rank's first row in
    it). One process: `x` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy of (B, E) unit vectors whose i-th rows belong together, against every
    rank's rows as negatives."""
    all_a, first = gathered(a)
    all_b, _ = gathered(b)
    targets = torch.arange(first, first + a.shape[0], device=a.device)  # (B,): the pair's row in the gathered set
    a_to_b = scale * a.float() @ all_b.float().T  # (B, world * B)
    b_to_a = scale * b.float() @ all_a.float().T
    return (F.cross_entropy(a_to_b, targets) + F.cross_entropy(b_to_a, targets)) / 2


def recall_at(query: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
              k: int) -> torch.Tensor:
    """The share of queries (N, E) with a key of their own class among their `k` most similar keys (M, E)."""
    top = (query.float() @ keys.float().T).topk(min(k, keys.shape[0]), dim=-1).indices  # (N, k)
    return (key_labels[top] == query_labels[:, None]).any(-1).float().mean()


def zero_shot_accuracy(query: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Accuracy of classifying each query by its most similar class prototype: the normalised mean of the keys of
    that class (a class without keys is never chosen)."""
    sums = torch.zeros(num_classes, keys.shape[1], device=keys.device).index_add_(0, key_labels, keys.float())
    counts = torch.bincount(key_labels, minlength=num_classes)
    scores = query.float() @ F.normalize(sums, dim=-1).T  # (N, classes)
    scores[:, counts == 0] = float("-inf")
    return (scores.argmax(-1) == query_labels).float().mean()


class Contrastive(TaskPart):
    """Symmetric InfoNCE between two fields (`fields`: [a, b]; null: the tokenizer's first two) of a `FusedBatch`,
    each encoded alone (`FusedTokenizer.field_tokens`), pooled (`pool`) and projected to `embed_dim`.

    temperature: CLIP's initial 0.07; `learn_temperature` makes its log a parameter (clamped at 1/100, as CLIP).
    Metrics: `{stage}/loss`, and in validation and test `{a}_to_{b}_r@k`, `{b}_to_{a}_r@k` for k in `recall_at`
    and `zero_shot_acc` (monitor `val/zero_shot_acc` or `val/loss` for the best checkpoint)."""

    kind = "contrastive"
    outputs_needed = ("val", "test")  # the embeddings feed the epoch's retrieval metrics

    def __init__(
        self,
        tokenizer: nn.Module,
        dim: Count,
        num_classes: int,
        class_names: list[str] | None = None,
        fields: list[str] | None = None,
        embed_dim: Count = 128,
        pool: str = "mean",
        temperature: Positive = 0.07,
        learn_temperature: bool = True,
        recall_at: list[int] = (1, 5),
    ) -> None:
        super().__init__()
        names = list(getattr(tokenizer, "names", ()))
        if len(names) < 2:
            raise ConfigError("the contrastive family aligns two fields of a sample: use data=paired with two "
                              f"data.fields and tokenizer=fused (this tokenizer has {names or 'no fields'})")
        self.pair = list(fields) if fields else names[:2]
        if len(self.pair) != 2 or len(set(self.pair)) != 2 or not set(self.pair) <= set(names):
            raise ConfigError(f"family.fields={self.pair}: name two different fields of the tokenizer's {names}")
        self.tokenizer = tokenizer
        self.embed = nn.ModuleDict({name: FieldEmbedding(dim, embed_dim, pool) for name in self.pair})
        log_scale = torch.tensor(math.log(1 / temperature))
        self.logit_scale = nn.Parameter(log_scale, requires_grad=learn_temperature)
        self.num_classes = num_classes
        self.class_names = [str(c) for c in (class_names or range(num_classes))]
        self.ks = sorted(int(k) for k in recall_at)
        self._kept: dict[str, list[torch.Tensor]] = {}

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    def forward(self, backbone: nn.Module, batch: FusedBatch) -> torch.Tensor:
        """(2, B, E): the two fields' unit vectors."""
        out = []
        for name in self.pair:
            head = self.embed[name]
            tokens = head.pool.prepare(self.tokenizer.field_tokens(name, batch))  # Tokens: (B, T, D)
            out.append(head(backbone(tokens), tokens.mask))  # (B, E)
        return torch.stack(out)  # (2, B, E)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def loss(self, outputs: torch.Tensor, batch: FusedBatch) -> torch.Tensor:
        return info_nce(outputs[0], outputs[1], self.scale())

    def step(self, outputs: torch.Tensor | None, batch: FusedBatch, stage: str, ctx: StepContext,
             loss: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.loss(outputs, batch) if loss is None else loss
        if stage == "train":
            self.log_train_loss(loss, ctx)
            return loss
        ctx.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch), sync_dist=True)
        if outputs is not None and batch.label is not None:
            for key, value in (("a", outputs[0]), ("b", outputs[1]), ("label", batch.label)):
                self._kept.setdefault(key, []).append(value.detach())
        return loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        kept, self._kept = self._kept, {}
        if stage == "train" or not kept:
            return
        a, b, labels = (torch.cat(kept[key]) for key in ("a", "b", "label"))
        if ctx.trainer.world_size > 1:  # every rank's samples: the same figures as one process
            a, b, labels = (ctx.module.all_gather(x).flatten(0, 1) for x in (a, b, labels))
        first, second = self.pair
        for k in self.ks:
            ctx.log(f"{stage}/{first}_to_{second}_r@{k}", recall_at(a, b, labels, labels, k), on_epoch=True)
            ctx.log(f"{stage}/{second}_to_{first}_r@{k}", recall_at(b, a, labels, labels, k), on_epoch=True)
        ctx.log(f"{stage}/zero_shot_acc", zero_shot_accuracy(a, b, labels, labels, self.num_classes), on_epoch=True,
                prog_bar=True)
        ctx.log(f"{stage}/temperature", 1 / self.scale().detach(), on_epoch=True)

    def extra_state(self) -> dict[str, Any]:
        geometry = modality_of(self.tokenizer).geometry(self.tokenizer)
        family = {"num_classes": self.num_classes, "class_names": list(self.class_names)}
        return {**super().extra_state(), "mmtx_runtime": {"tokenizer": geometry, "family": family}}

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        if "mmtx_runtime" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no mmtx_runtime (its fields' geometry and classes)")
        return checkpoint["mmtx_runtime"]
