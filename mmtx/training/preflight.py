"""Before and after training: a run that would take no optimizer step stops before it starts, naming the cause and
the key to change, and a fit that ended without one is not called finished (docs/reliability.md)."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from mmtx.errors import ConfigError, DataError


def check_steps(cfg: DictConfig, datamodule, world_size: int, ckpt_path: str | None,
                resumed: dict[str, Any] | None) -> None:
    """Stop before training, naming the cause and the key to change, when the run would take no optimizer step
    (it would otherwise end "finished" and report its untrained weights)."""
    if cfg.get("eval_only"):
        return
    trainer = cfg.trainer
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if max_steps == 0:
        raise ConfigError("trainer.max_steps=0: the run would take no optimizer step and report its untrained weights "
                          "as a result; set trainer.max_steps > 0, or eval_only=true to only test the initial weights")
    if max_epochs == 0 and max_steps in (None, -1):
        raise ConfigError("trainer.max_epochs=0: the run would take no optimizer step; set trainer.max_epochs > 0 "
                          "(or trainer.max_steps), or eval_only=true to only test the initial weights")
    max_time = trainer.get("max_time")
    if max_time is not None and duration_seconds(max_time) == 0:
        raise ConfigError(f"trainer.max_time={max_time}: the run would stop before its first optimizer step; give "
                          "it time (DD:HH:MM:SS), or null for no limit")
    batches = datamodule.check_trainable(world_size)  # names an empty split, or one without a full batch
    limit = trainer.get("limit_train_batches")
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):
        kept = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if kept < 1:
            raise ConfigError(f"trainer.limit_train_batches={limit} keeps none of the {batches} training batches of an "
                              "epoch: no optimizer step would be taken; raise it (1.0: all of them)")
    interval = trainer.get("val_check_interval")
    kept = batches if limit is None or limit == 1.0 else (min(batches, limit) if isinstance(limit, int)
                                                          else int(batches * limit))
    if isinstance(interval, int) and interval > kept and trainer.get("check_val_every_n_epoch") is not None:
        raise ConfigError(f"trainer.val_check_interval={interval} is more than the {kept} training batches of an epoch, "
                          f"so no validation would run within one: set it to {kept} or less, or validate every "
                          f"{interval} steps across epochs with trainer.check_val_every_n_epoch=null")
    if resumed is not None:
        done = int(resumed.get("global_step") or 0)
        epochs = (((resumed.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {})
        epochs_done = int(((epochs.get("current") or {}).get("completed")) or 0)
        if max_steps not in (None, -1) and done >= max_steps:
            raise ConfigError(f"resume={ckpt_path} is at step {done}, and trainer.max_steps={max_steps}: there is "
                              "nothing left to train; raise trainer.max_steps to train on (or test the checkpoint "
                              f"with python -m mmtx.eval ckpt={ckpt_path})")
        if max_steps in (None, -1) and max_epochs not in (None, -1) and epochs_done >= max_epochs:
            raise ConfigError(f"resume={ckpt_path} has completed {epochs_done} epochs, and trainer.max_epochs="
                              f"{max_epochs}: there is nothing left to train; raise trainer.max_epochs to train on (or "
                              f"test the checkpoint with python -m mmtx.eval ckpt={ckpt_path})")


def trained_nothing(trainer: L.Trainer, resumed: dict[str, Any] | None) -> BaseException | None:
    """The error of a fit that ended without an optimizer step, which `check_steps` could not foresee (a callback
    that stopped it, a time limit reached during start-up): such a run is not "finished"."""
    start = int((resumed or {}).get("global_step") or 0)
    if trainer.global_step > start:
        return None
    return DataError(f"training ended at step {trainer.global_step} without taking an optimizer step (a time limit "
                     "reached first, a callback that stopped it): its weights are untrained, so it reports no "
                     "result; check trainer.max_time and the warnings above")


def duration_seconds(duration: Any) -> float | None:
    """Lightning's max_time (DD:HH:MM:SS, or a dict of days/hours/minutes/seconds) in seconds; None if unreadable."""
    try:
        if isinstance(duration, str):
            days, hours, minutes, seconds = (float(x) for x in duration.split(":"))
            return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        if isinstance(duration, (dict, DictConfig)):
            import datetime

            return datetime.timedelta(**{k: float(v) for k, v in dict(duration).items()}).total_seconds()
    except (ValueError, TypeError):
        return None
    return None
