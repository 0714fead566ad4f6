"""What a run shows while it runs: the run folder and configuration at start, a progress bar on a terminal or
plain log lines in a file or pipe, a projection of the whole run's time on a CPU, a model summary without
an empty FLOPs column, and none of Lightning's adverts or its own deprecation warnings.

`build_trainer` (mmtx.config.wiring) picks the bar or the log lines: `ProgressBar` when stdout is a terminal,
`ProgressLog` otherwise (nohup, SLURM, `tee`); `trainer.enable_progress_bar=false` turns both off.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomTimeColumn, ProcessingSpeedColumn
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mmtx.train")


def quiet_lightning() -> None:
    """Drop what Lightning prints that is not the user's business: its advertising tips (litlogger,
    litmodels) and the deprecation warnings it raises about its own use of torch (`LeafSpec`)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


class _NoTips(logging.Filter):
    # Start-up lines that say what the run header already says (or nothing a user acts on).
    NOISE = ("💡 Tip", "Trainer already configured with model summary callbacks", "GPU available:", "TPU available:",
             "HPU available:", "Seed set to", "Loading `train_dataloader` to estimate", "`Trainer(limit_",
             "`Trainer(val_check_interval", "LOCAL_RANK:", "Restoring states from the checkpoint path",
             "Loaded model weights from the checkpoint", "`Trainer.fit` stopped:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


CONSOLE = logging.getLogger("mmtx.console")  # what the terminal shows, for <run dir>/train.log
CONSOLE.propagate = False


def echo(line: str, to_stdout: bool = True) -> None:
    """A line of the run's own output (progress, validation results, the summary): printed, and written to
    <run dir>/train.log while `console_log` holds it open."""
    if to_stdout:
        print(line, flush=True)
    CONSOLE.info(line)


@contextlib.contextmanager
def console_log(run_dir: Path, rank: int = 0):
    """Append what `echo` shows to <run dir>/train.log (beside Hydra's log records there) while the run runs."""
    if rank != 0:
        yield
        return
    CONSOLE.setLevel(logging.INFO)
    handler = _RunLog(Path(run_dir) / "train.log", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    CONSOLE.addHandler(handler)
    try:
        yield
    finally:
        CONSOLE.removeHandler(handler)
        handler.close()


class _RunLog(logging.FileHandler):
    """train.log's copy of the terminal: a disk that refuses it (full, read-only) costs the copy, never the run,
    nor the one-line message that says what happened (logging would print a traceback of its own per line)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True

    def close(self) -> None:  # the last flush too: a full disk must not replace the run's own error with its own
        try:
            super().close()
        except OSError:
            self.failed = True


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 3 h 07 min, 2 d 05 h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def print_run_header(cfg: DictConfig, run_dir: Path) -> None:
    """The run folder and a compact tree of the resolved configuration: one branch per group (with the class
    it builds), its keys flattened to `key=value`. `config.yaml` in the run folder holds the same, in full."""
    from rich.console import Console
    from rich.tree import Tree

    console = Console(soft_wrap=False, highlight=False) if stdout_is_terminal() else Console(no_color=True, width=120)
    tree = Tree(f"[bold]run folder[/]: {run_dir}", guide_style="dim")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    scalars = {k: v for k, v in resolved.items() if not isinstance(v, dict)}
    if scalars:
        tree.add(_leaves(scalars))
    for key, value in resolved.items():
        if isinstance(value, dict) and key not in ("paths", "hydra"):
            target = str(value.get("_target_", "")).rsplit(".", 1)[-1]
            branch = tree.add(f"[bold]{key}[/]" + (f" ({target})" if target else ""))
            if key == "callbacks":
                for name, node in value.items():
                    if isinstance(node, dict):
                        branch.add(f"{name} ({str(node.get('_target_', '')).rsplit('.', 1)[-1]}) "
                                   f"{_leaves({k: v for k, v in node.items() if k != '_target_'})}")
            elif len(value) > 1 or not target:
                branch.add(_leaves({k: v for k, v in value.items() if k != "_target_"}))
    console.print(tree)
    if CONSOLE.handlers:  # <run dir>/train.log: the same header, as plain text
        record = Console(no_color=True, width=120, record=True, file=io.StringIO())
        record.print(tree)
        CONSOLE.info(record.export_text().rstrip())


def _leaves(node: dict[str, Any], prefix: str = "") -> str:
    """`a=1  b.c=2  d=[x, y]`: a nested dict's leaves on one (wrapped) line."""
    parts = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            parts.append(_leaves(value, f"{prefix}{key}."))
        else:
            shown = value if isinstance(value, str) and value.strip() else json.dumps(value, ensure_ascii=False)
            parts.append(f"{prefix}{key}={shown}")
    return "  ".join(p for p in parts if p)


def total_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps this run will take (max_steps or max_epochs, whichever comes first)."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no data length known
        return None
    return int(steps) if steps is not None and math.isfinite(steps) else None


def total_epochs(trainer: L.Trainer) -> int | None:
    """The epochs this run will take: max_epochs, or fewer when max_steps ends it first; None when unbounded."""
    batches = trainer.num_training_batches
    steps_per_epoch = batches / max(1, trainer.accumulate_grad_batches) if math.isfinite(batches) else None
    by_steps = math.ceil(trainer.max_steps / steps_per_epoch) if trainer.max_steps > 0 and steps_per_epoch else None
    by_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    bounds = [b for b in (by_steps, by_epochs) if b is not None]
    return min(bounds) if bounds else None


class ProgressBar(RichProgressBar):
    """Lightning's Rich bar, with a rate and an ETA that stay real at many seconds a step (the mean since the
    bar started, shown as s/it below one step a second), no `v_num`, and an epoch total that is right for
    runs bounded by steps."""

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        return [*columns[:-2], _TimeColumn(self.theme.time), _RateColumn(self.theme.processing_speed)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss = SmoothedLoss()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loss.update(outputs)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # From the first steps on, not only once the loggers first write; co-training keeps its members' own keys.
        if self._loss.value is not None and not any(k.endswith("/train/loss") for k in items):
            items["train/loss"] = self._loss.value
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = total_epochs(self.trainer)
        description = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs else "")
        return f"{description:{len(self.validation_description)}}"


class SmoothedLoss:
    """The training loss as the bar shows it: a running mean (an exponential one, weight 0.05, exact over the
    first 20 steps) kept on the device, and read back at most twice a second, by a copy that is not waited
    for (shown at the next read): the training step never waits for the host (the GPU-step rule)."""

    def __init__(self, every_seconds: float = 0.5, weight: float = 0.05) -> None:
        self.every_seconds, self.weight = every_seconds, weight
        self.value: float | None = None
        self._mean = None
        self._steps = 0
        self._read_at = float("-inf")  # the first step is read (time.monotonic() may be small: a machine just booted)
        self._pending = None  # (host tensor, CUDA event) of a copy in flight

    def update(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        self._steps += 1
        weight = max(self.weight, 1.0 / self._steps)
        self._mean = loss.clone() if self._mean is None else self._mean.lerp_(loss, weight)
        now = time.monotonic()
        if now - self._read_at < self.every_seconds:
            return
        self._read_at = now
        if not self._mean.is_cuda:
            self.value = float(self._mean)
            return
        if self._pending is not None and self._pending[1].query():
            self.value = float(self._pending[0])
        host = torch.empty((), dtype=torch.float32, pin_memory=True)
        host.copy_(self._mean, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)


def _mean_rate(task) -> float | None:
    elapsed = task.finished_time if task.finished else task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class _TimeColumn(CustomTimeColumn):  # elapsed • remaining, from the mean rate
    def render(self, task):
        from rich.text import Text

        elapsed = task.finished_time if task.finished else task.elapsed
        rate = _mean_rate(task)
        remaining = (task.total - task.completed) / rate if rate and task.total not in (None, float("inf")) else None
        shown = [("-:--:--" if t is None else str(timedelta(seconds=int(t)))) for t in (elapsed, remaining)]
        return Text(" • ".join(shown), style=self.style)


class _RateColumn(ProcessingSpeedColumn):  # the mean rate: it/s, or s/it when slow
    def render(self, task):
        from rich.text import Text

        rate = _mean_rate(task)
        if rate is None:
            return Text("-- it/s", style=self.style)
        return Text(f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.1f}s/it", style=self.style)


class ProgressLog(L.Callback):
    """Plain progress lines for output that is not a terminal (a file, a pipe, a batch job's log): every
    `every_n_steps` optimizer steps, and at least every `every_seconds`, one line with the step, the epoch,
    the last logged training loss, the rate and the ETA of the whole run."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 120.0, to_stdout: bool = True) -> None:
        self.to_stdout = to_stdout  # False: train.log only (the terminal has the bar)
        self.every_n_steps = max(1, int(every_n_steps))
        self.every_seconds = every_seconds
        self._start: tuple[float, int] | None = None
        self._last_print = 0.0
        self._total: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        self._last_print = time.perf_counter()
        self._total = total_steps(trainer)  # once: Lightning recomputes it on every call

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        step, now, total = trainer.global_step, time.perf_counter(), self._total
        due = step % self.every_n_steps == 0 or now - self._last_print >= self.every_seconds or step == total
        if not due or step == self._start[1]:
            return
        self._last_print = now
        rate = (step - self._start[1]) / (now - self._start[0])  # steps a second since the start, validations included
        parts = [f"step {step}" + (f"/{total}" if total else ""), f"epoch {trainer.current_epoch}"]
        for key, loss in trainer.callback_metrics.items():  # train/loss; co-training: {member}/train/loss each
            # read on log steps only (a device read): a line due by the clock alone goes without the loss
            if (key == "train/loss" or key.endswith("/train/loss")) and step % self.every_n_steps == 0:
                parts.append(f"{key} {float(loss):.4f}")
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
        if total:
            parts.append(f"ETA {format_duration((total - step) / rate)}")
        echo("  ".join(parts), self.to_stdout)


class ValidationLine(L.Callback):
    """One line after each validation, on a terminal and in a pipe or file alike: the step, the epoch and every
    validation metric (`val/...`; co-training: `<member>/val/...` and `val/score`), but a mixture of experts'
    per-expert loads (`val/moe/<layer>/load<e>`: the loggers have them)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if (k.startswith("val/") or "/val/" in k)
                   and not ("/moe/" in k and "/load" in k)}
        if metrics:
            shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()))
            echo(f"validation at step {trainer.global_step} (epoch {trainer.current_epoch}): {shown}")


class RunTimeEstimate(L.Callback):
    """On a CPU, after the first `after_steps` optimizer steps of a run (the first `skip` not timed: warm-up),
    one line with the measured step time and the projected time of all the run's steps, naming the task's
    CPU-sized version (`<task>_cpu`) when there is one. Not on accelerators."""

    def __init__(self, after_steps: int = 5, skip: int = 2) -> None:
        self.after_steps = max(1, int(after_steps))
        self.skip = max(0, min(int(skip), self.after_steps - 1))
        self._first_step: int | None = None
        self._t0: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step, self._t0 = trainer.global_step, None  # a resumed run starts later

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._first_step is None or not trainer.is_global_zero or trainer.strategy.root_device.type != "cpu":
            return
        done = trainer.global_step - self._first_step
        if done == self.skip and self._t0 is None:
            self._t0 = time.perf_counter()
        if done < self.after_steps or self._t0 is None:
            return
        step_time = (time.perf_counter() - self._t0) / (done - self.skip)
        self._first_step = None  # once
        total = total_steps(trainer)
        line = f"on this CPU a training step takes {step_time:.2f} s"
        if total:
            line += (f"; the run's {total:,} steps would take {format_duration(step_time * total)}"
                     " (training alone, without validation)")
        task = (getattr(pl_module, "run_config", None) or {}).get("task_name")
        if task and not task.endswith("_cpu") and cpu_task_exists(f"{task}_cpu"):
            line += f"; task={task}_cpu is its version sized for a CPU"
        log.info(line)


def cpu_task_exists(name: str) -> bool:
    from mmtx.files import config_dir

    return (Path(config_dir()) / "task" / f"{name}.yaml").is_file()


class ModelSummary(LightningModelSummary):
    """Lightning's model summary, less the FLOPs column and total when nothing was measured (Lightning counts
    FLOPs only with an `example_input_array`, which mmtx's typed batches do not provide: the column is all 0)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        if total_flops:
            return LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                                   total_training_modes, total_flops, **kwargs)
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        log.info("\n" + table.rsplit("\n", 1)[0])  # the last line is "0  Total Flops"
