"""Callbacks mmtx adds to Lightning's: RNG state in checkpoints, throughput, an always-current last.ckpt, EMA of
weights with a warm-up."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import Throughput as LightningThroughput
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmtx.batch import IGNORE_INDEX, PairBatch, TokenBatch
from mmtx.errors import ConfigError, MaybeNatural, MaybePositive, StorageError

log = logging.getLogger(__name__)


class RNGState(L.Callback):
    """Save the Python, NumPy and torch (CPU and CUDA) RNG states in checkpoints and restore them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters; with
    this, a resumed run also draws the same random numbers (augmentations,
    dropout) as if it had never stopped.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        version, state, gauss = random.getstate()
        return {
            "python": {"version": version, "state": list(state), "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state["numpy"]
        np.random.set_state(
            ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets; MFU is reported
# against these (Chowdhery et al., 2022, Appendix B) and not at all on devices not listed. Lightning's
# `get_available_flops` is not used for this: its H200 figure (2.0e15) is the sparse one, it finds no entry
# for a device named plain "NVIDIA H200", and its A10G figure is the A10's.
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,  # H100 SXM5; the PCIe card is lower (756e12), but is named "H100 PCIe"
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,
    "A100": 312.0e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of a CUDA device, looked up by name; None where unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in PEAK_BF16_FLOPS if k in name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def saving_seconds(trainer: L.Trainer) -> float:
    """The wall time this run's checkpoint IO has spent writing checkpoints (mmtx.checkpoints.io.AtomicCheckpointIO)."""
    io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)  # another IO plugin: not counted
    return float(getattr(io, "seconds", 0.0))


class Throughput(L.Callback):
    """Log throughput over each window of `window` optimizer steps (wall clock, all ranks together),
    computed by Lightning's `Throughput` meter from totals handed to it once a window (so counting
    target tokens on the device costs one sync a window, not one a step). Windows run across epoch
    boundaries (an epoch shorter than a window still gets figures) and the clock stops while validation
    runs and while checkpoints are written (the seconds `AtomicCheckpointIO` spent saving are left out). Each window's figures go straight to the loggers at that step, as Lightning's own
    `LearningRateMonitor` does, so they are never dropped for falling between `log_every_n_steps`.

    `train/samples_per_sec` always; for encoder-decoder batches `train/tgt_tokens_per_sec` (target
    tokens that carry loss); for token batches `train/tokens_per_sec` and, where the device's peak is
    known and the module can count its FLOPs (`flops_per_token(seq_len)`), `train/mfu`: model FLOPs per
    second per device over that device's bf16 dense peak. A co-training run mixes batches of different kinds
    (images, tokens, pairs) from step to step, so it logs `train/samples_per_sec` alone (all members together).
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._meter: LightningThroughput | None = None
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._paused_at: float | None = None
        self._saving0 = 0.0  # the checkpoint IO's seconds spent saving, at the window clock's start
        self._saving_paused = 0.0
        self._steps = self._samples = self._tokens = 0
        self._seq_len = 0
        self._tgt_tokens: torch.Tensor | int = 0  # summed on the device: no sync per step
        self._tokens_counted = 0  # tokens whose FLOPs the meter has been given
        self._meter = None
        self._mixed = False  # co-training ({member: batch}): samples only

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            self._paused_at = time.perf_counter()  # validation time is not training throughput
            self._saving_paused = saving_seconds(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:  # move the start on by the pause: the meter's clock never runs back
            self._t0 += time.perf_counter() - self._paused_at
            self._saving0 += saving_seconds(trainer) - self._saving_paused  # saves in the pause: already out
            self._paused_at = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes start-up costs: start timing after it
            self._t0, self._saving0 = now, saving_seconds(trainer)
            self._meter = LightningThroughput(available_flops=peak_flops(pl_module.device),
                                              world_size=trainer.world_size, window_size=2)
            self._mixed = isinstance(batch, dict)  # co-training: {member: batch}
            self._meter.update(time=0.0, batches=0, samples=0, **({} if self._mixed else {"lengths": 0, "flops": 0}))
            return
        self._samples += sum(len(b) for b in batch.values()) if self._mixed else len(batch)
        if isinstance(batch, TokenBatch):
            self._tokens += batch.tokens.numel()
            self._seq_len = batch.tokens.shape[1]
        elif isinstance(batch, PairBatch):
            self._tgt_tokens = self._tgt_tokens + (batch.target.targets != IGNORE_INDEX).sum()
        self._steps += 1
        if self._steps % self.window == 0:
            metrics = self._window_metrics(now - (saving_seconds(trainer) - self._saving0), pl_module)
            for logger in trainer.loggers:  # rank zero only (Lightning's loggers are)
                logger.log_metrics(metrics, step=trainer.global_step)

    def _window_metrics(self, now: float, pl_module: L.LightningModule) -> dict[str, float]:
        if self._mixed:
            self._meter.update(time=now - self._t0, batches=self._steps, samples=self._samples)
            rates = self._meter.compute()
            return {"train/samples_per_sec": rates.get("samples_per_sec", rates["device/samples_per_sec"])}
        tokens = self._tokens or int(self._tgt_tokens)  # one sync a window
        flops = None
        if self._tokens and self._meter.available_flops and hasattr(pl_module, "flops_per_token"):
            per_token = pl_module.flops_per_token(self._seq_len)
            flops = int(per_token * (self._tokens - self._tokens_counted)) if per_token else None
        self._meter.update(time=now - self._t0, batches=self._steps, samples=self._samples,
                           lengths=max(tokens, self._samples), flops=flops)
        self._tokens_counted = self._tokens
        rates = self._meter.compute()

        def total(key: str) -> float:  # all ranks together (Lightning names per-device rates device/...)
            return rates.get(key, rates[f"device/{key}"])

        metrics = {"train/samples_per_sec": total("samples_per_sec")}
        if isinstance(self._tgt_tokens, torch.Tensor):
            metrics["train/tgt_tokens_per_sec"] = total("items_per_sec")
        if self._tokens:
            metrics["train/tokens_per_sec"] = total("items_per_sec")
            if "device/mfu" in rates:
                metrics["train/mfu"] = rates["device/mfu"]
        return metrics


def val_metrics_finite(trainer: L.Trainer) -> bool:
    """False when a validation metric of the latest validation is NaN or infinite."""
    for key, value in trainer.callback_metrics.items():
        if key.startswith("val/") and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            return False
    return True


def healthy(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Whether the model is worth keeping: finite weights, its last step not skipped as non-finite, and
    finite validation metrics."""
    weights_ok = pl_module.weights_are_finite() if hasattr(pl_module, "weights_are_finite") else True
    return weights_ok and val_metrics_finite(trainer)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that never keeps a model with non-finite weights or validation metrics
    as "best" (Lightning would save it, scoring a NaN as the worst value, and a diverged classifier can
    still show a finite accuracy)."""

    @property
    def state_key(self) -> str:
        # Lightning names every hook call by it (six a training step); ModelCheckpoint builds it from its settings
        # each time (a dict's repr). The settings are fixed once the callback is made: built once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = super().state_key
        return key

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not healthy(trainer, trainer.lightning_module):
            log.warning("step %d: not saving a best checkpoint: the model's weights or validation metrics are not "
                        "finite", trainer.global_step)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class LastCheckpoint(L.Callback):
    """Keep `<dirpath>/last.ckpt` current: after each validation (`on_validation`), every `every_n_minutes` of
    wall time and every `every_n_steps` steps (each when set), when training ends, and when it stops on an
    exception, Ctrl-C or a scheduler's signal (one process; with several ranks Lightning ends them).

    Not at every epoch end: a full resumable checkpoint (weights and optimizer state: 0.5 GB at GPT-2 small's
    size) at the end of every short epoch would sit in the training loop's hot path. The wall-time cadence is a
    host clock, read without touching the device. The time each save takes is kept out of the `Throughput`
    windows (`AtomicCheckpointIO.seconds`).

    Lightning's ModelCheckpoint(save_last=True) writes only when it saves a
    best checkpoint, so its last.ckpt can lag (a run stopped by max_steps
    leaves one from the previous validation). This callback owns last.ckpt;
    saves go through the atomic checkpoint IO, so a run killed at any moment
    resumes from here. A model with non-finite weights or validation metrics
    never replaces it.
    """

    def __init__(self, every_n_steps: MaybeNatural = None, every_n_minutes: MaybePositive = 30.0,
                 on_validation: bool = True, dirpath: str | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.on_validation = on_validation
        self.dirpath = dirpath
        self._saved_step = -1
        self._saved_at = time.monotonic()

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        if not healthy(trainer, pl_module):
            log.warning("step %d: last.ckpt not updated: the model's weights or validation metrics are not finite",
                        trainer.global_step)
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        trainer.save_checkpoint(dirpath / "last.ckpt", weights_only=False)  # the full state: resumable
        self._saved_step = trainer.global_step
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_at = time.monotonic()  # the wall-time cadence counts from the start of training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        by_steps = bool(self.every_n_steps) and step % self.every_n_steps == 0
        by_time = False
        if self.every_n_minutes and step % max(1, trainer.log_every_n_steps) == 0:  # looked at on log steps
            by_time = time.monotonic() - self._saved_at >= 60 * self.every_n_minutes
            if trainer.world_size > 1:  # saving is collective and clocks differ: rank 0's clock decides for all
                by_time = bool(trainer.strategy.broadcast(by_time, src=0))
        if by_steps or by_time:
            self._save(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or isinstance(exception, StorageError):  # a refused write: not again
            return
        # With several ranks, saving would wait at a barrier for ranks that may be gone; a stopping signal is the
        # exception: Lightning stops every rank at the same step (it broadcasts rank 0's signal), all alive.
        if trainer.world_size == 1 or isinstance(exception, SIGTERMException):
            self._save(trainer, pl_module)


# -- the signals a scheduler sends before it kills a job ------------------------------------------------------

# SIGTERM: what SLURM (preemption, time limit), Kubernetes and `kill` send first; SIGUSR1: SLURM's warning before the
# time limit (`#SBATCH --signal=USR1@120`), after which mmtx requeues the job; SIGUSR2: submitit's (launcher=slurm),
# whose own handler requeues the job once mmtx has saved.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """What `stopping_signals` saw: the signal received (its number, or None), and what to do once the run's
    summary is written (`finish`)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def finish(self, rank_zero: bool) -> None:
        """After a stopping signal: hand it to the handler that was there before (submitit's requeues the job and
        exits), or, for SIGUSR1 under SLURM, requeue the job; then exit with 128 + the signal's number (143 for
        SIGTERM), so that a job script tells a stopped run from a finished one. Ranks other than 0 exit 0 once they
        have stopped cleanly: rank 0's status is the run's, and Lightning's launcher takes a rank > 0 that exits
        non-zero for a crash (and kills the others)."""
        if self.signal is None:
            return
        if not rank_zero:
            raise SystemExit(0)
        handler = self.previous.get(self.signal)
        if callable(handler):
            handler(self.signal, None)
        elif self.signal == signal.SIGUSR1:
            requeue_slurm_job()
        raise SystemExit(128 + self.signal)


@contextlib.contextmanager
def stopping_signals(trainer: L.Trainer) -> Iterator[StopSignals]:
    """While the block runs (trainer.fit), the stopping signals (`STOP_SIGNALS`) end training cleanly at the end of
    the step on every rank: Lightning's SIGTERM path (it broadcasts rank 0's flag, so all ranks stop at the same
    step), then `last.ckpt` saved (`LastCheckpoint.on_exception`, under DDP too). The caller writes the summary
    (status interrupted, the signal named), then calls `StopSignals.finish`.

    Lightning's own SLURM auto-requeue (which saves an `hpc_ckpt` that a new run folder never finds) is off
    (`build_trainer`)."""
    stops = StopSignals()

    def on_signal(signum: int, frame: Any) -> None:
        stops.signal = stops.signal or signum
        if signum != signal.SIGTERM:  # Lightning handles SIGTERM itself (and its handler calls this one)
            trainer._signal_connector.received_sigterm = True
        log.warning("received %s: stopping at the end of this step and saving last.ckpt", signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers as they are
            stops.previous[signum] = signal.signal(signum, on_signal)
    try:
        yield stops
    finally:
        for signum, handler in stops.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (`scontrol requeue`, as Lightning's SLURM plugin does); a new start of
    the same job script continues the run (`resume=auto`, or a `hydra.run.dir` named by $SLURM_JOB_ID)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job and os.environ.get("SLURM_ARRAY_TASK_ID") else \
        os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.warning("could not requeue SLURM job %s: %s", job, done.stderr.strip())
        return False
    log.warning("requeued SLURM job %s: it continues from last.ckpt when it starts again", job)
    return True


class EMA(WeightAveraging):
    """An exponential moving average of the weights (Polyak & Juditsky, 1992; as timm's `ModelEmaV3`), on
    Lightning's `WeightAveraging`: validation and the final test run on the averaged weights, checkpoints hold
    them as their `state_dict` (so `mmtx.eval`, `mmtx.generate` and `mmtx.predict` use them) and the training
    weights beside them (a resumed run continues both).

    The decay warms up as timm's does, min(decay, (1 + n) / (10 + n)) after n updates, so the average is not
    held near the initial weights in a short run (a fixed 0.999 still gives them 37% of the weight after 1,000
    steps). Integer buffers (BatchNorm's step count) are copied, not averaged. `every_n_steps` updates less
    often (the decay then applies per update).
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0, device: str | None = None,
                 use_buffers: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay must be between 0 and 1 (e.g. 0.999), got {decay}")
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=_ema_with_warmup(decay))
        self.every_n_steps = max(1, int(every_n_steps))
        self.start_step = max(0, int(start_step))

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming training restores both models (Lightning's); testing or validating a checkpoint keeps its
        `state_dict`, the averaged weights (Lightning's would put the training weights back for the final
        test after fit)."""
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def _ema_with_warmup(decay: float):
    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        n = num_averaged.to(averaged.dtype)
        weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)  # of the current weights: 0.1 at first
        return averaged.lerp(current, weight)

    return average
