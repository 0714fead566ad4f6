"""What a run says when it ends: its summary (status, figures, checkpoints) printed, written to summary.json and
given to the loggers, however fit ended."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import lightning as L

from mmtx.errors import NonFiniteError, StorageError, user_error
from mmtx.files import atomic_write_text
from mmtx.training.progress import echo

log = logging.getLogger("mmtx.train")


def is_test_metric(key: str) -> bool:
    """`test/acc` of a single-task run, `{member}/test/acc` of a co-training run's member."""
    return key.startswith("test/") or "/test/" in key


def summarise(trainer: L.Trainer, run_dir: Path, ckpt_path: str | None, test_metrics: dict[str, float],
              failure: BaseException | None, signum: int | None = None) -> dict[str, Any]:
    """The run's summary: status (finished, diverged, interrupted, failed: with the signal or the error), best
    score and checkpoints, the step reached, the checkpoint resumed from, the test figures."""
    best = trainer.checkpoint_callback
    if failure is None:
        status = "finished"
    elif isinstance(failure, NonFiniteError):
        status = "diverged"
    elif isinstance(failure, (KeyboardInterrupt, SystemExit)) or signum is not None:
        status = "interrupted"
    else:
        status = "failed"
    extra: dict[str, Any] = {}
    if signum is not None:
        extra["signal"] = signal.Signals(signum).name
    elif failure is not None and status != "interrupted":
        found = user_error(failure)
        extra["error"] = str(found) if found is not None else f"{type(failure).__name__}: {failure}"
    return {
        "status": status,
        **extra,
        "run_dir": str(run_dir),
        "monitor": best.monitor if best is not None else None,
        "best_score": finite(best.best_model_score) if best is not None else None,
        "best_checkpoint": (best.best_model_path if best is not None else "") or None,
        "last_checkpoint": last_checkpoint(run_dir),
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
        **{k: finite(v) for k, v in test_metrics.items()},
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """`<run dir>/summary.json`; when the disk refuses it, a warning (the summary was printed already)."""
    try:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    except StorageError as err:
        log.warning("the run summary was not written: %s", err)


def finite(value: Any) -> float | None:
    """A figure for summary.json: a float, or None (JSON null) when missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def log_final_metrics(trainer: L.Trainer, hparams: dict[str, Any], summary: dict[str, Any]) -> None:
    """TensorBoard's hparams view: the run's configuration beside its final figures (`final/best_<monitor>`,
    `final/test/...`), so that the runs of a sweep compare in one table. (W&B has the config and the
    summary metrics already.)"""
    metrics = {f"final/{k}": v for k, v in summary.items() if is_test_metric(k) and v is not None}
    if summary["best_score"] is not None:
        metrics[f"final/best_{summary['monitor']}"] = summary["best_score"]
    if not metrics:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(hparams, metrics=metrics)
            logger.finalize("success" if summary["status"] == "finished" else summary["status"])


def finish_wandb(trainer: L.Trainer) -> None:
    """End this run's W&B run: the next job of a multirun starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()


def last_checkpoint(run_dir: Path) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def print_summary(summary: dict[str, Any]) -> None:
    lines = [f"run directory:   {summary['run_dir']}", f"training time:   {summary['fit_seconds']:.1f} s "
             f"({summary['global_step']} steps)"]
    if summary["status"] in ("interrupted", "failed"):
        by = f" by {summary['signal']}" if summary.get("signal") else ""
        lines.append(f"status:          {summary['status']} at step {summary['global_step']}{by} "
                     f"(continue with resume={summary['last_checkpoint'] or 'auto'})")
    elif summary["status"] == "diverged":
        lines.append(f"status:          diverged at step {summary['global_step']} (see the error below)")
    if summary["best_score"] is not None:
        lines.append(f"best {summary['monitor']}: {summary['best_score']:.4f}")
    if summary.get("tested") == "last":
        lines.append("tested:          the weights training ended with (test_ckpt=last)")
    for key, value in summary.items():
        if is_test_metric(key):
            shown = "-" if value is None else f"{value:.4f}"
            lines.append(f"{key}:{' ' * max(1, 15 - len(key))}{shown}")
    lines.append(f"best checkpoint: {summary['best_checkpoint'] or '-'}")
    lines.append(f"last checkpoint: {summary['last_checkpoint'] or '-'}")
    echo("\n".join(["", "mmtx run summary", *("  " + line for line in lines)]))
