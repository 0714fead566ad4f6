"""What a run shows: the run folder and config tree at start, plain progress lines when stdout is not a
terminal, the CPU time projection, a progress bar with a real rate and epoch total, and no noise."""

import re
from types import SimpleNamespace

from conftest import cli, folder_run
from mmtx.training.progress import ProgressBar, ProgressLog, _RateColumn, _TimeColumn, format_duration, total_epochs


def test_a_piped_run_prints_its_folder_config_progress_lines_and_no_noise(image_folder, tmp_path):
    run = tmp_path / "run"
    args = [a for a in folder_run(tmp_path, image_folder) if not a.startswith("trainer.enable_progress_bar")]
    proc = cli("mmtx.train", "task=vit_cifar", *args, "trainer.max_steps=7", "test_after_fit=false",
               f"hydra.run.dir={run}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert proc.stdout.startswith(f"run folder: {run}")
    assert "backbone (Backbone)" in proc.stdout and "dim=32" in proc.stdout  # the resolved config, compactly
    # stdout is a pipe: no bar, a plain line per trainer.log_every_n_steps (1 here) steps
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/7" for i in range(1, 8)], lines
    assert all(re.search(r"train/loss \d+\.\d{4}  \d+\.\d\d (steps/s|s/step)  ETA \d", line) for line in lines)
    # on a CPU, after 5 steps: the measured step time, the whole run's projection, the CPU-sized task
    assert re.search(r"a training step takes \d+\.\d\d s; the run's 7 steps would take \d+ s .*"
                     r"task=vit_cifar_cpu is its version sized for a CPU", out)
    for noise in ("💡", "litlogger", "LeafSpec", "v_num", "FLOPs", "Epoch 0/-2", "Trainer already configured"):
        assert noise not in out, noise


def test_progress_bar_epoch_total_rate_and_no_v_num():
    trainer = SimpleNamespace(num_training_batches=10, accumulate_grad_batches=1, max_steps=25, max_epochs=-1)
    assert total_epochs(trainer) == 3  # bounded by steps: 25 steps of 10 a epoch
    trainer.max_epochs = 2
    assert total_epochs(trainer) == 2
    trainer.max_steps, trainer.max_epochs = -1, None
    assert total_epochs(trainer) is None
    bar = ProgressBar()
    trainer = SimpleNamespace(num_training_batches=10, accumulate_grad_batches=1, max_steps=25, max_epochs=-1)
    bar._trainer = trainer
    assert bar._get_train_description(1).strip() == "Epoch 1/2"

    slow = SimpleNamespace(finished=False, elapsed=60.0, completed=3, total=10)  # 20 s a step
    assert str(_RateColumn("white").render(slow)) == "20.0s/it"
    assert str(_TimeColumn("white").render(slow)) == "0:01:00 • 0:02:20"
    fast = SimpleNamespace(finished=False, elapsed=2.0, completed=10, total=100)
    assert str(_RateColumn("white").render(fast)) == "5.00it/s"
    assert str(_RateColumn("white").render(SimpleNamespace(finished=False, elapsed=0.0, completed=0, total=5))) == "-- it/s"


def test_progress_log_and_durations():
    assert ProgressLog(every_n_steps=0).every_n_steps == 1
    assert [format_duration(s) for s in (12, 245, 3 * 3600 + 7 * 60, 2 * 86400 + 5 * 3600)] == \
        ["12 s", "4 min 05 s", "3 h 07 min", "2 d 05 h"]
