"""The LightningModule: one shared backbone and one or more task parts (`mmtx.tasks`) that run on it.

A run with one task is the one-member case: its part is `tasks.main`, its metrics `{stage}/{name}`.
With several (co-training), a batch is a dict {member: batch}, each member's loss is added, and its
metrics are logged as `{member}/{stage}/{name}`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from mmtx.batch import Batch
from mmtx.checkpoints.io import with_members
from mmtx.errors import Count, NonFiniteError
from mmtx.nn.mlp import active_parameters
from mmtx.tasks.base import StepContext, TaskPart
from mmtx.training.compiling import CompiledOrEager, compiler_unavailable
from mmtx.training.experts import ExpertLog
from mmtx.training.optim import build_optimizer

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is NaN or infinite, as AMP's GradScaler skips
    steps whose gradients overflowed, and stops the run after `max_steps` such steps in a row.

    With a fused optimizer (AdamW's default here) the decision never leaves the device: the optimizer is handed a
    `found_inf` flag, as a GradScaler hands it, and its kernel leaves the parameters, the moments and the step
    count as they were; the counters are device tensors, read with the other logged values on log steps and
    before each validation (`check`), where a run of `max_steps` skipped steps stops the run. Another optimizer
    needs the decision on the host: one device read a step. With several ranks the flag is all-reduced first,
    so that every rank skips the same steps.
    """

    def __init__(self, max_steps: int = 10) -> None:
        self.max_steps = max_steps
        self._loss: torch.Tensor | None = None  # summed over this step's micro-batches
        # On the device: consecutive skipped steps, all skipped steps, the step and loss of the last step taken, and
        # the step count (float64).
        self._counts: torch.Tensor | None = None
        self._step_bad: torch.Tensor | None = None  # what a skipped step adds to the counters
        self._warned_at = 0.0  # the skipped count already warned about
        self.run = 0  # the host's copy of the counts, as of the last `check`
        self.skipped = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss = loss if self._loss is None else self._loss + loss

    def flag(self, grad_norm: torch.Tensor | None, trainer: L.Trainer) -> torch.Tensor | None:
        """1.0 on the device when this step's loss or gradient norm is not finite, else 0.0 (None: nothing to
        check); the counters are updated on the device."""
        loss, self._loss = self._loss, None
        checks = [t.detach() for t in (loss, grad_norm) if t is not None]
        if not checks:
            return None
        # One sum is finite exactly when both are (a NaN or an infinity stays one; two finite values this large
        # would overflow only past 3e38): fewer small kernels a step than checking each.
        total = checks[0].float() + checks[1].float() if len(checks) == 2 else checks[0].float()
        bad = torch.isfinite(total).logical_not_().float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        counts = self._counts
        if counts is None or counts.device != bad.device:  # once: the step count is kept on the device from here
            counts = torch.tensor([0.0, 0.0, 0.0, float("nan"), trainer.global_step], dtype=torch.float64,
                                  device=bad.device)
            self._step_bad = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=bad.device)
        step = counts[4:5] + 1  # this step's number, counted on the device (a copy from the host would wait)
        finite_loss = loss.detach().double().reshape(1) if loss is not None else counts[3:4]
        if_taken = torch.cat([torch.zeros_like(step), counts[1:2], step, finite_loss, step])
        if_skipped = counts + self._step_bad  # one more in the run and in all, the last finite step and loss kept
        self._counts = torch.where(bad.bool(), if_skipped, if_taken)
        return bad

    def last_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (a device read: for checkpoint saves, not every step)."""
        return self._counts is not None and bool(self._counts[0] > 0)

    def skip_step(self, grad_norm: torch.Tensor | None, trainer: L.Trainer) -> bool:
        """The host's decision (a device read), for an optimizer that cannot take the flag: True to skip."""
        bad = self.flag(grad_norm, trainer)
        if bad is None or not bool(bad):
            self.run = 0
            return False
        self.check(trainer)
        return True

    def counts(self) -> torch.Tensor | None:
        """The counters on the device: (run, skipped, last finite step, last finite loss, step); None before a step."""
        return self._counts

    def check(self, trainer: L.Trainer, numbers: list[float] | None = None, step: int | None = None) -> float | None:
        """Read the counters (one transfer; `numbers`: already read with other values): warn at new skips, stop the
        run after `max_steps` in a row. Returns the number of skipped steps so far (None before the first step)."""
        if self._counts is None:
            return None
        run, skipped, last_step, last_loss, _ = numbers if numbers is not None else self._counts.tolist()
        step = trainer.global_step if step is None else step
        self.run, self.skipped = int(run), int(skipped)
        if skipped > self._warned_at:
            log.warning("step %d: %d optimizer step(s) with a loss or gradient norm that is not finite, skipped so "
                        "far (module.max_nonfinite_steps=%d in a row stop the run)", step,
                        self.skipped, self.max_steps)
            self._warned_at = skipped
        if self.run >= self.max_steps:
            raise NonFiniteError(self.message(step, trainer, last_step, last_loss))
        return skipped

    def message(self, step: int, trainer: L.Trainer, last_step: float, last_loss: float) -> str:
        lr = trainer.lightning_module.optim.get("lr")
        if last_loss != last_loss:  # NaN: no step had a finite loss
            last = "no step had a finite loss"
        else:
            last = f"the last finite loss was {last_loss:.4g}, at step {int(last_step)}"
        return (
            f"training stopped at step {step}: the loss or gradient norm was NaN or infinite for {self.run} "
            f"optimizer steps in a row (module.max_nonfinite_steps={self.max_steps}), each skipped; {last}. "
            f"Likely causes: a learning rate too high (optim.lr={lr}: try a tenth of it, or a longer "
            f"optim.warmup_fraction), or overflow in reduced precision (trainer.precision={trainer.precision}: "
            "try trainer.precision=32-true or bf16-mixed)"
        )


def host_number(value: float) -> torch.Tensor:
    """A number already read from the device, as the tensor Lightning's `self.log` wants: a float64 scalar on the
    CPU (a plain float would become a tensor on the model's device, written there and read back). Lightning reading
    it costs no device sync; scripts/count_syncs.py tells such reads apart by this dtype and device."""
    return torch.tensor(value, dtype=torch.float64)


def _takes_found_inf(optimizer: Any) -> bool:
    """Whether `optimizer` skips a flagged step on the device (`found_inf`, as a GradScaler sets it): the fused
    kernels of Adam and AdamW."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))




class MmtxModule(L.LightningModule):
    """What every mmtx run shares: the backbone, the task part(s), AdamW + warm-up/cosine, the
    non-finite step guard, and checkpoints that carry the run configuration (and the vocabularies)
    so `mmtx.eval` and `mmtx.generate` rebuild exactly this model.

    tasks: {member: TaskPart}; one entry for a single-task run. Each part's `forward(backbone, batch)`
    gives its outputs and `step(outputs, batch, stage, ctx)` its loss (see `mmtx.tasks.base`).
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, member: str | None = None, **kwargs):
        """The model a checkpoint of mmtx.train (or a folder of mmtx.export) holds, rebuilt from the run
        configuration stored in it, in eval mode on `map_location` (a device; default: the CPU), as Lightning's
        `load_from_checkpoint` is used. `member`: a co-training checkpoint's member. Lightning's other keyword
        arguments (hparams overrides, strict) do not apply: the stored configuration is the model's."""
        from mmtx.checkpoints import load
        from mmtx.errors import ConfigError

        if kwargs:
            raise ConfigError(f"MmtxModule.load_from_checkpoint takes checkpoint_path, map_location and member "
                              f"(the model is rebuilt from its stored configuration), not {', '.join(kwargs)}")
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return load(checkpoint_path, member, str(device)).module

    def __init__(
        self,
        backbone: nn.Module,
        tasks: dict[str, TaskPart],
        optim: dict[str, Any],
        compile: bool = False,
        max_nonfinite_steps: Count = 10,
        tf32: bool = True,
        run_config: dict[str, Any] | None = None,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = nn.ModuleDict(tasks)
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in self.tasks}
        self.new_parameters: set[str] = set()  # those `init_from` did not set (`finetune.new_lr`)
        self.new_lr: float | None = None
        for part in self.tasks.values():
            part.attach(backbone)
        self.optim = dict(optim)
        self.run_config = run_config or {}
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.tf32 = tf32
        self._step_values: dict[str, torch.Tensor] = {}  # this step's logged training values, read when it ends
        several = len(self.tasks) > 1
        self._contexts = {name: StepContext(self, f"{name}/" if several else "") for name in self.tasks}
        self._compile = compile  # compiled once the device is known (`setup`), unless the compiler cannot run there
        self._forwards: dict[str, Any] = dict(self.tasks)  # each part's forward: eager until then
        self._losses: dict[str, Any] = {name: part.forward_loss for name, part in self.tasks.items()}
        self.experts = ExpertLog(self)  # a mixture-of-experts backbone's router losses and routing logs (else empty)

    def setup(self, stage: str) -> None:
        """On the training device, before the first batch: compile every task part's forward and loss into one graph
        (`module.compile`), or say in one warning why not and run eagerly; float32 matmuls on TF32 tensor cores for a
        float32 run on a CUDA GPU (`module.tf32`)."""
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else self.device
        if device.type == "cuda" and self.tf32 and str(trainer.precision if trainer else "") in ("32-true", "32") \
                and torch.get_float32_matmul_precision() == "highest":
            torch.set_float32_matmul_precision("high")  # as Lightning advises; bf16-mixed runs do not need it
            log.info("module.tf32=true: float32 matmuls run on TF32 tensor cores (module.tf32=false: full float32)")
        if not self._compile or any(isinstance(f, CompiledOrEager) for f in self._losses.values()):
            return
        why = compiler_unavailable(device)
        if why is not None:
            log.warning("module.compile=true: %s; this run continues without compiling", why)
            self._compile = False
            return
        self._forwards = {name: CompiledOrEager(part) for name, part in self.tasks.items()}
        self._losses = {name: CompiledOrEager(part.forward_loss) for name, part in self.tasks.items()}

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` before and after every hook it calls, 45 times a training step; a plain
        # attribute, it need not go through nn.Module.__setattr__'s checks for parameters, buffers and submodules.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def task(self) -> TaskPart:
        """The task part of a single-task run."""
        if len(self.tasks) != 1:
            raise RuntimeError(f"this model has {len(self.tasks)} task parts ({', '.join(self.tasks)}): "
                                 "pick one from .tasks")
        return next(iter(self.tasks.values()))

    def _members(self, batch: Batch | dict[str, Batch]):
        """(name, part, batch) for every member that has a batch in `batch`."""
        if isinstance(batch, dict):
            return [(name, self.tasks[name], b) for name, b in batch.items() if b is not None]
        name = next(iter(self.tasks)) if len(self.tasks) == 1 else None
        if name is None:
            raise TypeError("a model with several task parts takes a dict {member: batch}")
        return [(name, self.tasks[name], batch)]

    def forward(self, batch: Batch | dict[str, Batch]):
        """The outputs (logits) of a batch; a dict {member: outputs} for a dict of batches."""
        outputs = {name: self._forwards[name](self.backbone, b) for name, _, b in self._members(batch)}
        return outputs if isinstance(batch, dict) else next(iter(outputs.values()))

    def shared_step(self, batch: Batch | dict[str, Batch], stage: str, batch_idx: int = 0) -> torch.Tensor:
        """The loss of every member's batch, weighted by its `loss_weight` and summed; each member's
        metrics (its loss unweighted) logged by its part."""
        total = None
        for name, part, member_batch in self._members(batch):
            ctx = self._contexts[name]
            ctx.batch_idx = batch_idx
            if self.experts:
                self.experts.clear()
            outputs, loss = self._losses[name](self.backbone, member_batch, stage in part.outputs_needed)
            if loss is None:  # a part that computes its loss in `step`
                loss = part.step(outputs, member_batch, stage, ctx)
            else:
                loss = part.step(outputs, member_batch, stage, ctx, loss=loss)
            router = self.experts.take(stage, ctx) if self.experts else None
            if router is not None and stage == "train":  # the logged train/loss stays the task's own
                loss = loss + router
            if self.loss_weights[name] != 1.0:
                loss = loss * self.loss_weights[name]
            total = loss if total is None else total + loss
        return total

    def log_step_value(self, key: str, value: torch.Tensor) -> None:
        """Keep a training value (a device tensor) for this step's log line: read with the others in `optimizer_step`."""
        self._step_values[key] = value.detach()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch, "train", batch_idx)
        self.guard.add_loss(loss.detach())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A run that reaches `trainer.max_steps` part-way through an epoch validates its final weights.

        Lightning validates at epoch ends and every `val_check_interval`, not when `max_steps` stops training
        between two of them; the final weights (a co-training run's `max_steps: sum` stops 13% into
        cotrain_multimodal's sixth epoch, after the cosine schedule's last steps) would then never be a
        candidate for the best checkpoint, which the test scores. Asking the loop to stop makes it run the
        validation it runs for early stopping, once, on this step (`_should_check_val_fx`); at an epoch end or
        a `val_check_interval` step it validates once all the same."""
        trainer = self._trainer
        if trainer is None:
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step (before the callbacks' on_train_batch_end, which show this step's values):
        trainer = self.trainer
        step = trainer.global_step + 1  # this step's number (Lightning counts it once the hook returns)
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if last or step % max(1, trainer.log_every_n_steps) == 0 or self._step_values:
            self._log_step_values(trainer, step)

    def _log_step_values(self, trainer: L.Trainer, step: int) -> None:
        """The step's logged training values (train/loss of each part, train/grad_norm) and the guard's counters,
        read from the device in one transfer, logged as numbers (Lightning then reads nothing itself); the guard
        warns, counts and stops the run on what it read. On log steps (and, co-trained, where a member logs)."""
        values, self._step_values = self._step_values, {}
        counts = self.guard.counts()
        tensors = [v.double().reshape(1) for v in values.values()] + ([counts] if counts is not None else [])
        if not tensors:
            return
        numbers = torch.cat([t.to(tensors[0].device) for t in tensors]).tolist()  # the one device read
        for key, number in zip(values, numbers):
            self.log(key, host_number(number), on_step=True, on_epoch=False)
        if counts is not None:
            skipped = self.guard.check(trainer, numbers[len(values):], step)
            if skipped:
                self.log("train/skipped_steps", host_number(skipped), on_step=True, on_epoch=False)

    def on_validation_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.guard.check(self.trainer)  # skipped steps since the last log step count before validating

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.shared_step(batch, "val", batch_idx)  # co-training: one loader per member, its batches {member: batch}

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.shared_step(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        for name, part in self.tasks.items():
            part.epoch_end("val", self._contexts[name])
        if self.experts:
            self.experts.epoch_end("val", self._contexts)

    def on_test_epoch_end(self) -> None:
        for name, part in self.tasks.items():
            part.epoch_end("test", self._contexts[name])
        if self.experts:
            self.experts.epoch_end("test", self._contexts)

    def flops_per_token(self, seq_len: int) -> float | None:
        """Training FLOPs per token of a single-task language model (see `LanguageModel.flops_per_token`), of the
        parameters a token meets (a mixture of experts counts the experts it is routed to, not all of them)."""
        part = self.task if len(self.tasks) == 1 else None
        if not hasattr(part, "flops_per_token"):
            return None
        return part.flops_per_token(self.backbone, active_parameters(self), seq_len)

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        optimizer, schedule = build_optimizer(self, total_steps=total, **self.optim, new_lr=self.new_lr,
                                              new=self.new_parameters)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Once per optimizer step, after backward (gradients unscaled under AMP) and before the step.

        The global L2 norm of the gradients, computed once, decides whether the step is taken
        (`NonFiniteGuard`; a GradScaler's overflowing steps are its own business), is logged as
        `train/grad_norm` (before clipping) on logged steps, and clips by norm (`trainer.gradient_clip_val`)
        without being computed a second time. Under FSDP each rank holds a shard: the skip decision is the
        ranks' worst, and the clipping and the logged norm are the FSDP module's (all shards).
        """
        # The optimizer's parameters, as Lightning's own clipping takes them: walking `self.parameters()` visits
        # every submodule (a co-training run's other members and their metrics too) and cost 0.3-0.8 ms a step.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        checked = norm if scaler is None else None
        if _takes_found_inf(optimizer) and scaler is None:
            optimizer.found_inf = self.guard.flag(checked, self.trainer)  # the kernel skips a flagged step itself
        elif self.guard.skip_step(checked, self.trainer):
            for p in params:
                p.grad = None  # the optimizer leaves parameters without gradients as they are
            return
        by_norm = (gradient_clip_algorithm or "norm") == "norm"
        if gradient_clip_val and by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin clips by value only; by norm is the FSDP module's own method,
            # which reduces the shards' norms across ranks (every rank calls it) and returns that global norm.
            norm = self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and by_norm and norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        else:  # clipping by value (Lightning's, FSDP's included), or none
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if norm is not None and (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_step_value("train/grad_norm", norm)  # this step logs: read with its other values

    def weights_are_finite(self) -> bool:
        """True when every parameter is finite and the last optimizer step was not skipped as non-finite."""
        if self.guard.last_skipped():
            return False
        checks = [torch.isfinite(p).all() for p in self.parameters()]
        return bool(torch.stack(checks).all()) if checks else True  # one device sync

    def on_fit_start(self) -> None:
        if not self.trainer.is_global_zero:
            return
        if self.experts:
            log.info("mixture of experts in %d layers: %s parameters, %s of them a token meets (FLOPs and MFU count "
                     "those)", len(self.experts.layers), f"{sum(p.numel() for p in self.parameters()):,}",
                     f"{active_parameters(self):,}")
        folder = Path(self.trainer.default_root_dir)
        for name, part in self.tasks.items():
            target = folder if len(self.tasks) == 1 else folder / name
            target.mkdir(parents=True, exist_ok=True)  # a user's own Trainer may name a folder not made yet
            part.save_files(target)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmtx_config"] = self.run_config
        if getattr(self, "run_info", None):
            checkpoint["mmtx_run_info"] = self.run_info  # seed, versions, git commit (mmtx.training.runinfo)
        for logger in self.loggers if self._trainer is not None else []:
            if type(logger).__name__ == "WandbLogger":
                checkpoint["mmtx_wandb_id"] = logger.version  # a resumed run continues this W&B run
        checkpoint["mmtx_members"] = {name: part.extra_state() for name, part in self.tasks.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        members = with_members(checkpoint)["mmtx_members"]  # a checkpoint of the layout before one for all
        for name, part in self.tasks.items():
            part.load_extra_state(members.get(name, {}))
