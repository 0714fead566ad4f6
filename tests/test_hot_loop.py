"""Checkpoints out of the training loop's hot path: last.ckpt after validations and by wall time (looked at on log
steps), not at every epoch end; the throughput windows leave out the time spent writing checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import sys

import pytest
import torch

from conftest import REPO
from mmtx.training.callbacks import LastCheckpoint, Throughput


def _trainer(**kwargs):
    defaults = dict(global_step=0, log_every_n_steps=2, world_size=1, sanity_checking=False, fast_dev_run=False,
                    state=SimpleNamespace(fn="fit"), loggers=[],
                    strategy=SimpleNamespace(checkpoint_io=SimpleNamespace(seconds=0.0)))
    return SimpleNamespace(**{**defaults, **kwargs})


def test_last_checkpoint_by_wall_time_on_log_steps_and_after_validation(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("mmtx.training.callbacks.time.monotonic", lambda: clock[0])
    callback = LastCheckpoint(every_n_steps=None, every_n_minutes=1.0, on_validation=True)
    saved = []

    def save(trainer, pl_module):
        saved.append(trainer.global_step)
        callback._saved_at = clock[0]

    monkeypatch.setattr(callback, "_save", save)
    trainer = _trainer()
    callback.on_train_start(trainer, None)
    for step in range(1, 16):  # 13 s a step: a minute has passed at step 5, looked at on step 6 (a log step)
        clock[0] += 13.0
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert saved == [6, 12]
    callback.on_validation_end(trainer, None)
    assert saved == [6, 12, 15]
    trainer.sanity_checking = True
    callback.on_validation_end(trainer, None)
    assert saved == [6, 12, 15]  # not for the sanity check
    assert "on_train_epoch_end" not in LastCheckpoint.__dict__  # an epoch end alone saves nothing


def test_the_throughput_windows_leave_out_checkpoint_writes(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("mmtx.training.callbacks.time.perf_counter", lambda: clock[0])
    logged = []
    trainer = _trainer(loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))])
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = [0] * 8  # 8 samples a step
    meter = Throughput(window=4)
    meter.on_train_start(trainer, module)
    meter.on_train_batch_end(trainer, module, None, batch, 0)  # starts the clock
    for step in range(1, 5):  # 4 steps of 1 s each, and a 6 s checkpoint write in the middle
        clock[0] += 1.0
        if step == 2:
            clock[0] += 6.0
            trainer.strategy.checkpoint_io.seconds += 6.0
        trainer.global_step = step
        meter.on_train_batch_end(trainer, module, None, batch, step)
    assert logged and logged[-1]["train/samples_per_sec"] == pytest.approx(8.0)  # 32 samples in 4 s, not 10 s


def test_no_device_read_on_a_step_that_does_not_log(tmp_path):
    """scripts/count_syncs.py on a tiny language model: its training steps read nothing from the device (a sync on
    a GPU) except on log steps, the non-finite guard's decision included (fused AdamW takes it as `found_inf`), and
    a log step reads its values (train/loss, train/grad_norm, the guard's counters) in one transfer."""
    sys.path.insert(0, str(REPO / "scripts"))
    from count_syncs import count

    recorder = count("gpt_shakespeare_cpu", steps=12, log_every=4, overrides=[], work=tmp_path)
    kinds = [recorder.kind(entry) for entry in recorder.steps]
    assert kinds.count("plain") == 9 and kinds.count("log") == 2 and kinds[-1] == "validate"  # steps 4, 8; 12
    plain = {site: n for entry in recorder.steps if recorder.kind(entry) == "plain" for site, n in entry["reads"].items()}
    assert plain == {}, plain
    logs = [entry["reads"] for entry in recorder.steps if recorder.kind(entry) == "log"]
    assert all(sum(reads.values()) == 1 and "tolist" in next(iter(reads)) for reads in logs), logs  # one batched read
    assert sum(recorder.steps[-1]["reads"].values()) > 0  # it counts: a validation reads its metrics
