"""What a user reads: every entry point's --help (fast, with usage, examples and the tasks), a run's output in a
pipe (a line after each validation, none of Lightning's start-up lines, the test figures once), the same
lines in <run>/train.log, and the bar's smoothed loss."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, REPO, cli, folder_run
from mmtx.training.progress import SmoothedLoss

PROGRAMS = ["train", "eval", "generate", "predict", "export", "prepare"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_is_fast_and_starts_with_usage(program):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"mmtx.{program}", "--help"], cwd=REPO, capture_output=True,
                          text=True, env=ENV, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m mmtx.{program}"), proc.stdout[:300]
    assert seconds < 10, seconds  # about 0.2 s: nothing heavy is imported (a loaded CI machine gets slack)
    assert "$CONFIG" not in proc.stdout
    if program != "train":  # the first of its own keys: the checkpoint, or (prepare) the folder it writes
        assert f"keys (conf/{program}.yaml):\n  {'out' if program == 'prepare' else 'ckpt'}:" in proc.stdout


def test_train_help_lists_the_tasks_with_one_line_each_and_points_to_cfg_job():
    from mmtx.files import config_dir
    from mmtx.config.help import train_help

    text = train_help()
    tasks = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml") if not p.stem.startswith("_"))
    listed = [line.split()[0] for line in text.split("tasks (")[1].split("\n\n")[0].splitlines()[1:]]
    assert listed == tasks and "  _fsdd" not in text
    for line in text.split("tasks (")[1].split("\n\n")[0].splitlines()[1:]:
        assert len(line.split(None, 1)[1]) > 20 and len(line) <= 110, line
    assert "examples:" in text and "--cfg job" in text and config_dir()
    for example in [ln.split("#")[0].split() for ln in text.splitlines() if ln.startswith("  python -m mmtx.train")]:
        from mmtx.train import _compose_groups
        from mmtx.config.apps import check_keys

        args = [a for a in example[3:] if "=" in a and not a.startswith("-")]
        check_keys([a.split(",")[0] for a in args], _compose_groups)  # every example names real keys


def test_a_piped_run_shows_each_validation_once_and_train_log_holds_it(image_folder, tmp_path):
    proc = cli("mmtx.train", "task=vit_cifar", *folder_run(tmp_path, image_folder), "trainer.max_epochs=2",
               "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    validations = [ln for ln in proc.stdout.splitlines() if ln.startswith("validation at step")]
    assert len(validations) == 2 and "val/acc" in validations[0] and "val/loss" in validations[0]
    for noise in ("GPU available", "TPU available", "Seed set to", "Test metric", "Restoring states"):
        assert noise not in out, noise
    assert proc.stdout.count("test/acc") == 1  # the summary's, not also Lightning's table
    log = (tmp_path / "run" / "train.log").read_text()
    assert "mmtx run summary" in log and validations[-1] in log and f"run folder: {tmp_path / 'run'}" in log
    assert [ln for ln in log.splitlines() if ln.startswith("step ")] == \
        [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")] != []


def test_the_bars_loss_is_a_running_mean_read_without_waiting():
    loss = SmoothedLoss(every_seconds=0.0)
    for value in (4.0, 2.0, 3.0):
        loss.update({"loss": torch.tensor(value)})
    assert loss.value == pytest.approx(3.0)  # exact mean over the first 1 / weight steps
    for _ in range(200):
        loss.update(torch.tensor(1.0))
    assert loss.value == pytest.approx(1.0, abs=1e-3)
    slow = SmoothedLoss(every_seconds=3600)
    slow.update(torch.tensor(5.0))
    assert slow.value == 5.0
    slow.update(torch.tensor(1.0))
    assert slow.value == 5.0  # read back at most every every_seconds
