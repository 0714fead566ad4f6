"""What a mixture-of-experts model adds to a step: its router losses join the task's loss, and its routing is
logged (Switch Transformer's diagnostics: each expert's share of the tokens, the fraction dropped past capacity).

Training logs, on log steps and per member when co-trained (`{member}/train/moe/...`), the mean since the last
log line: `train/moe/balance_loss` and `train/moe/z_loss` (unweighted, mean over layers), and for each layer
(`block1`, `block3`, ...; an encoder-decoder's `decoder.block1`) `load{e}` (expert e's fraction of the routed
tokens, before capacity) and `dropped` (the fraction of choices past capacity). Validation and test log the same
over the whole split at the epoch's end (`val/moe/...`): which experts each modality uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtx.nn.mlp import STATS, moe_layers

CALLS, BALANCE, Z, ASSIGNED, KEPT = range(len(STATS))


def layer_key(name: str) -> str:
    """A short log name for a layer: backbone.blocks.3.mlp -> block3; tasks.main.decoder.stack.blocks.1.mlp ->
    decoder.stack.block1."""
    name = name.removesuffix(".mlp").replace("blocks.", "block")
    if name.startswith("backbone."):
        return name.removeprefix("backbone.")
    if name.startswith("tasks."):
        return name.split(".", 2)[2]
    return name


class ExpertLog:
    """The mixtures of experts of one model: `take` after each member's forward, `epoch_end` after an evaluation.
    `ctx` is the member's `mmtx.tasks.base.StepContext` (its metric prefix, `log`, `log_step_value`)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(layer_key(name), layer) for name, layer in moe_layers(model)]
        self._sums: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (prefix, stage) -> {layer: stats summed}
        self._logged_window: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def clear(self) -> None:
        for _, layer in self.layers:
            layer.record = None

    def take(self, stage: str, ctx: Any) -> torch.Tensor | None:
        """The weighted router losses of the forward just run (None if it met no mixture); its counts are added to
        this member's sums for the logs, and written out on a training log step."""
        losses, sums = [], self._sums.setdefault((ctx.prefix, stage), {})
        for key, layer in self.layers:
            record, layer.record = layer.record, None
            if record is None:  # a layer this member does not run (another member's decoder)
                continue
            losses.append(record["loss"])
            sums[key] = record["stats"] if key not in sums else sums[key] + record["stats"]
        if stage == "train":
            self._log_train(ctx)
        return torch.stack(losses).sum() if losses else None

    def _log_train(self, ctx: Any) -> None:
        trainer = ctx.trainer
        step = trainer.global_step + 1  # this step's number, once the optimizer has stepped
        window = step // max(1, trainer.log_every_n_steps)  # as `TaskPart.log_train_loss`: a member's first step past the mark
        if window <= self._logged_window.get(ctx.prefix, 0) and step != trainer.max_steps:
            return
        sums = self._sums.pop((ctx.prefix, "train"), {})
        for name, value in self.values(sums).items():
            ctx.log_step_value(f"train/moe/{name}", value)  # read with the step's other values, in one transfer
        self._logged_window[ctx.prefix] = window

    def epoch_end(self, stage: str, contexts: dict[str, Any]) -> None:
        """Log an evaluation's routing over the whole split, per member (all ranks' counts summed)."""
        for ctx in contexts.values():
            sums = self._sums.pop((ctx.prefix, stage), {})
            if not sums or ctx.sanity_checking:
                continue
            trainer = ctx.module._trainer
            if trainer is not None and trainer.world_size > 1:
                sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
            for name, value in self.values(sums).items():
                ctx.log(f"{stage}/moe/{name}", value, on_step=False, on_epoch=True, sync_dist=False)

    @staticmethod
    def values(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logged values of summed stats (device tensors; nothing read here)."""
        if not sums:
            return {}
        stacked = torch.stack(list(sums.values()))  # (layers, len(STATS) + E)
        calls = stacked[:, CALLS].sum().clamp(min=1)
        out = {"balance_loss": stacked[:, BALANCE].sum() / calls, "z_loss": stacked[:, Z].sum() / calls}
        for key, row in sums.items():
            assigned = row[ASSIGNED].clamp(min=1)
            out[f"{key}/dropped"] = 1 - row[KEPT] / assigned
            for e, count in enumerate(row[len(STATS):]):
                out[f"{key}/load{e}"] = count / assigned
        return out
