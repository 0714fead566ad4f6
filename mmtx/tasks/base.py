"""What a task family is to the LightningModule: the small interface every task part implements.

A task part owns everything that makes one task on the shared backbone what it is: its tokenizer (raw
batch -> Tokens), its head, its loss and metrics, and its one decode entry. It does not own the
backbone: the module passes it in, so several parts can share one (co-training is a list of parts).
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch import nn

from mmtx.batch import Batch


class StepContext:
    """What a task part may use of the LightningModule that runs it: the trainer, the shared backbone,
    and `log`, which names metrics `{prefix}{stage}/{name}` (prefix: "" for a run with one task part,
    `{member}/` when several share the backbone)."""

    def __init__(self, module: L.LightningModule, prefix: str = "") -> None:
        self.module = module
        self.prefix = prefix
        self.batch_idx = 0  # of the batch being run, set by the module before each step

    @property
    def trainer(self) -> L.Trainer:
        return self.module.trainer

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone

    @property
    def global_step(self) -> int:
        return self.module.global_step

    @property
    def sanity_checking(self) -> bool:
        return self.module._trainer is not None and self.module.trainer.sanity_checking

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        # The member prefix names the loader of a co-training run's validation: no `/dataloader_idx_N` suffix.
        kwargs.setdefault("add_dataloader_idx", False)
        self.module.log(f"{self.prefix}{name}", value, **kwargs)

    def log_step_value(self, name: str, value: torch.Tensor) -> None:
        """A training value for this step's log line (`{prefix}{name}`), read from the device with the step's other
        logged values in one transfer right after the optimizer step (`MmtxModule.optimizer_step`), not one by one."""
        self.module.log_step_value(f"{self.prefix}{name}", value)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run the block with `modules` in eval mode (no dropout), then give each its mode back: decoding
    during validation must not leave a training model in eval mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@contextlib.contextmanager
def whole_weights(trainer: L.Trainer | None) -> Iterator[None]:
    """Run the block with every parameter whole on this rank: under FSDP, a task part that computes outside a
    training or validation step (a language model's samples at a validation's end) would otherwise meet the
    flat shards FSDP keeps between forwards. Every rank must enter it (it gathers); a no-op otherwise."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False, recurse=True):
        yield


class TiedOutput(nn.Module):
    """Vocabulary logits from the token embedding matrix itself (Press & Wolf, 2017): the output layer of
    the language model and of the encoder-decoder's decoder, and the one place their weights are tied."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.proj = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        self.proj.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, T, D) -> (B, T, V)


class TaskPart(nn.Module, abc.ABC):
    """One task on a shared backbone. Subclasses set `tokenizer` and implement `forward` and `step`.

    attach(backbone)                        adapt the shared backbone once, when the model is built
    forward(backbone, batch) -> outputs     the model's outputs for a batch (logits)
    loss(outputs, batch) -> loss            the loss alone, a pure function (optional: compiled with the forward)
    step(outputs, batch, stage, ctx[, loss]) -> loss
                                            the loss, with this task's metrics logged through `ctx.log`
    epoch_end(stage, ctx)                   metrics and media that need the whole epoch
    extra_state() -> dict                   what a checkpoint must carry besides weights (vocabularies)
    save_files(folder)                      files a run folder gets at the start (tokenizer.json)
    """

    tokenizer: nn.Module
    # What a trained part can be asked for (`mmtx.load`'s Model and the command lines ask these, never a class name):
    # `kind` names the family (Model.kind, messages); `can` holds "predict" (label files, mmtx.predict and ONNX
    # export) and / or "generate" (mmtx.generate).
    kind: str = "task"
    can: frozenset[str] = frozenset()
    _train_loss: torch.Tensor | None = None  # the training losses summed since train/loss was last logged
    _train_steps = 0
    _logged_window = 0  # train/loss was last logged in this window of trainer.log_every_n_steps steps

    def attach(self, backbone: nn.Module) -> None:
        """Adapt the shared backbone this part will run on, once, when the model is built (the language
        model re-draws its residual projections); most tasks leave it as it is."""

    def prepare(self, tokens):
        """Add what the head needs to the backbone's input (a CLS token); most tasks add nothing."""
        return tokens

    @abc.abstractmethod
    def forward(self, backbone: nn.Module, batch: Batch) -> torch.Tensor:
        """The part's outputs (logits) for a batch, running `backbone` as this task needs it."""

    @abc.abstractmethod
    def step(self, outputs: torch.Tensor, batch: Batch, stage: str, ctx: StepContext) -> torch.Tensor:
        """The loss of `outputs` for `batch`, this task's metrics logged through `ctx.log`. A part that defines
        `loss` is handed it (`loss=`, computed with the forward) and, in the stages not in `outputs_needed`,
        `outputs=None`."""

    # The stages whose `step` reads the outputs (classification: its accuracy); in the others a part with a `loss`
    # gets only the loss, and a language model's (B, T, V) logits never leave the compiled graph.
    outputs_needed: tuple[str, ...] = ("train", "val", "test")

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """The loss of `outputs` for `batch`, with nothing logged: `module.compile` compiles it with the forward
        into one graph. None (the default): `step` computes the loss itself."""
        return None

    def forward_loss(self, backbone: nn.Module, batch: Batch, keep_outputs: bool = True):
        """(outputs, loss) of a batch: what `MmtxModule` runs (compiled under `module.compile`) before `step`. The
        outputs are None when the loss is all the step needs (`keep_outputs` false)."""
        outputs = self(backbone, batch)
        loss = self.loss(outputs, batch)
        return (outputs if keep_outputs or loss is None else None), loss

    def epoch_end(self, stage: str, ctx: StepContext) -> None:
        pass

    def log_train_loss(self, loss: torch.Tensor, ctx: StepContext) -> None:
        """`train/loss`, every task's one training-loss key: the mean over the steps since the loggers last
        wrote (as the Hugging Face Trainer reports it), logged on the steps they write
        (`trainer.log_every_n_steps`) and the last one.

        Not an epoch mean: runs are often bounded by steps, and Lightning's `self.log` costs about a
        millisecond a call on the CPU, a few percent of a small model's step.
        """
        loss = loss.detach()
        self._train_loss = loss if self._train_loss is None else self._train_loss + loss  # on the device: no sync
        self._train_steps += 1
        trainer = ctx.trainer
        step = trainer.global_step + 1  # this step's number, once the optimizer has stepped
        # Logged at the first step this part trains in each window of log_every_n_steps: every window's last
        # step alone, or, co-trained (a part need not train every step), its first step at or past the mark.
        window = step // trainer.log_every_n_steps
        if window <= self._logged_window and step != trainer.max_steps:
            return
        # Not a progress-bar value (Lightning would read it on every step until the epoch ends): the bar shows
        # mmtx.training.progress.SmoothedLoss, read without waiting.
        ctx.log_step_value("train/loss", self._train_loss / self._train_steps)
        self._train_loss, self._train_steps, self._logged_window = None, 0, window

    def extra_state(self) -> dict[str, Any]:
        # The train/loss window in progress, so that a resumed run logs the means an unbroken one would.
        window = None if self._train_loss is None else self._train_loss.float().cpu()
        state: dict[str, Any] = {"mmtx_train_loss_window": {"sum": window, "steps": self._train_steps,
                                                            "logged_window": self._logged_window}}
        if self.vocab is not None:
            state["mmtx_vocab"] = self.vocab.to_json()
        return state

    @classmethod
    def runtime_from_checkpoint(cls, checkpoint: dict[str, Any], cfg: Any, path: str) -> dict[str, Any]:
        """The run-time values (`build_model`'s second argument: vocabulary, classes, input geometry) of a model
        of this family, from what its checkpoint stored (`extra_state`): how `mmtx.load` rebuilds it without
        its data. A checkpoint that lacks them is a `CheckpointError` naming `path`."""
        from mmtx.errors import CheckpointError

        raise CheckpointError(f"checkpoint {path}: the task family {cls.__name__} cannot be rebuilt without its data")

    def load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        window = checkpoint.get("mmtx_train_loss_window") or {}
        self._train_loss, self._train_steps = window.get("sum"), int(window.get("steps", 0))
        self._logged_window = int(window.get("logged_window", 0))

    def save_files(self, folder: Path) -> None:
        vocab = getattr(self.tokenizer, "vocab", None)
        if vocab is not None:
            vocab.save(folder / "tokenizer.json")

    @property
    def vocab(self):
        return getattr(self.tokenizer, "vocab", None)
