"""End-to-end runs: the CLI, checkpoints, resume (also after a kill), evaluation, multirun, loggers."""

import csv
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, folder_run
from mmtx import compose
from mmtx.checkpoints.io import load_checkpoint
from mmtx.eval import evaluate
from mmtx.train import train


def cli(module: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow  # learns to a threshold
def test_cli_train_then_eval(image_folder, tmp_path):
    proc = cli("mmtx.train", "task=vit_cifar", *folder_run(tmp_path, image_folder), "trainer.max_epochs=4",
               "optim.lr=3e-3")
    runs = list((tmp_path / "outputs" / "vit_cifar").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    assert "mmtx run summary" in proc.stdout and str(best[0]) in proc.stdout

    rows = list(csv.DictReader(open(run / "metrics" / "version_0" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/loss", "val/loss", "val/acc", "test/acc", "lr-AdamW/decay"} <= keys
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert max(val_acc) > 0.6  # three colour classes: learnable in a few epochs

    proc = cli("mmtx.eval", f"ckpt={best[0]}")
    acc = float(next(line for line in proc.stdout.splitlines() if line.startswith("test/acc")).split()[-1])
    assert acc > 0.6
    # a checkpoint carries its config: evaluate at another resolution (positions recomputed)
    metrics = evaluate(str(best[0]), ["data.source.image_size=24", "trainer.accelerator=cpu"])
    assert metrics["test/acc"] > 0.6  # the classes differ by colour, which the resolution does not change


def test_multirun_sweep_gives_each_job_its_own_directory(image_folder, tmp_path):
    cli("mmtx.train", "-m", "task=vit_cifar", *folder_run(tmp_path, image_folder), "trainer.max_steps=2",
        "trainer.limit_val_batches=1", "test_after_fit=false", "optim.lr=1e-3,3e-4")
    sweep = next((tmp_path / "outputs" / "vit_cifar" / "multirun").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert "optim.lr=0.0003" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert all((sweep / j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


def test_unknown_task_and_misspelled_key_on_the_cli():
    proc = cli("mmtx.train", "task=vit_cifarr", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "task=vit_cifarr: 'vit_cifarr' is not a choice of the config group task; pick one of conf/task/: " in proc.stderr
    proc = cli("mmtx.train", "task=vit_cifar", "optim.lrr=1", check=False)
    assert proc.returncode != 0 and "optim.lrr" in proc.stderr


def test_resume_continues_at_the_right_step(image_folder, tmp_path):
    base = [*folder_run(tmp_path, image_folder), "test_after_fit=false"]
    first = train(compose("vit_cifar", [*base, "trainer.max_steps=6"]), run_dir=tmp_path / "outputs/vit_cifar/a")
    assert first["global_step"] == 6
    last = torch.load(first["last_checkpoint"], map_location="cpu", weights_only=False)
    assert last["global_step"] == 6 and "RNGState" in last["callbacks"]

    second = train(compose("vit_cifar", [*base, "trainer.max_steps=10", "resume=auto"]),
                   run_dir=tmp_path / "outputs/vit_cifar/b")
    assert second["resumed_from"] == first["last_checkpoint"]
    assert second["global_step"] == 10
    rows = list(csv.DictReader(open(tmp_path / "outputs/vit_cifar/b/metrics/version_0/metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps[0] >= 6  # no step before the checkpoint was trained again


def test_resume_restores_weights_optimizer_and_schedule(image_folder, tmp_path):
    """6 + 3 steps resumed equals 9 steps straight through (29 training images, 3 batches an epoch)."""
    base = [*folder_run(tmp_path, image_folder), "test_after_fit=false", "trainer.limit_val_batches=0",
            "data.augment.crop_padding=0", "data.augment.hflip=false", "callbacks.last_checkpoint.every_n_steps=3",
            "trainer.max_steps=9", "trainer.deterministic=true"]
    straight = train(compose("vit_cifar", base), run_dir=tmp_path / "straight")
    a = load_checkpoint(straight["last_checkpoint"])
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=6"]
    cut = train(compose("vit_cifar", [*base, *stop]), run_dir=tmp_path / "cut")
    assert cut["global_step"] == 6
    resumed = train(compose("vit_cifar", [*base, f"resume={cut['last_checkpoint']}"]), run_dir=tmp_path / "resumed")
    b = load_checkpoint(resumed["last_checkpoint"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 9
    assert a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"] == 9


def test_killed_run_resumes_from_its_last_checkpoint(image_folder, tmp_path):
    args = [*folder_run(tmp_path, image_folder), "trainer.max_steps=400", "trainer.limit_val_batches=1",
            "callbacks.last_checkpoint.every_n_steps=3", "test_after_fit=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mmtx.train", "task=vit_cifar", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    task_dir = tmp_path / "outputs" / "vit_cifar"
    deadline = time.time() + 120
    while time.time() < deadline and not list(task_dir.glob("*/checkpoints/last.ckpt")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = next(task_dir.glob("*/checkpoints/last.ckpt"))
    saved = load_checkpoint(last)["global_step"]  # readable: written atomically
    assert 0 < saved < 400

    resumed = train(compose("vit_cifar", [*args, "trainer.max_steps=" + str(saved + 3), "resume=auto"]),
                    run_dir=task_dir / "resumed")
    assert resumed["resumed_from"] == str(last)
    assert resumed["global_step"] == saved + 3


def test_resume_auto_without_a_previous_run(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "resume=auto"])
    with pytest.raises(FileNotFoundError, match="no previous run of task 'vit_cifar'"):
        train(cfg, run_dir=tmp_path / "run")


def test_resume_from_a_corrupt_or_missing_checkpoint(image_folder, tmp_path):
    bad = tmp_path / "outputs" / "vit_cifar" / "old" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    for resume in ("auto", str(bad)):
        cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), f"resume={resume}"])
        with pytest.raises(ValueError, match=f"checkpoint {bad} is corrupt"):
            train(cfg, run_dir=tmp_path / "run")
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), f"resume={tmp_path / 'none.ckpt'}"])
    with pytest.raises(FileNotFoundError, match="none.ckpt does not exist"):
        train(cfg, run_dir=tmp_path / "run")


def test_eval_rejects_foreign_checkpoints_and_bad_overrides(image_folder, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="no mmtx run configuration"):
        evaluate(str(foreign))
    summary = train(compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1", "test_after_fit=false"]),
                    run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="data.batch_sizee is not a key of the run"):
        evaluate(summary["last_checkpoint"], ["data.batch_sizee=3"])


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "none"])
def test_other_loggers(logger, image_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), f"logger={logger}", "trainer.max_steps=2",
                                "test_after_fit=false", "trainer.limit_val_batches=1"])
    train(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics").exists() is False  # the csv default is replaced
    if logger == "none":
        # no logger's files; the final step's validation writes its confusion matrix as a run file, as any validation does
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml", "run_info.json",
                                                                        "summary.json", "train.log", "val_confusion.tsv"]
    elif logger == "tensorboard":
        assert list((tmp_path / "run" / "tensorboard").glob("**/events.out.tfevents.*"))
    else:
        offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
        assert offline, "W&B should run offline without an API key"
        assert list(offline[0].glob("*.wandb"))


def test_a_resumed_run_continues_its_wandb_run(image_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    common = [*folder_run(tmp_path, image_folder), "logger=wandb", "test_after_fit=false", "trainer.limit_val_batches=1"]
    first = train(compose("vit_cifar", [*common, "trainer.max_epochs=1"]), run_dir=tmp_path / "first")
    ckpt = torch.load(first["last_checkpoint"], weights_only=True)
    run_id = ckpt["mmtx_wandb_id"]
    assert run_id and [p.name.rsplit("-", 1)[-1] for p in (tmp_path / "first" / "wandb").glob("offline-run-*")] == [run_id]
    train(compose("vit_cifar", [*common, "trainer.max_epochs=2", f"resume={first['last_checkpoint']}"]),
          run_dir=tmp_path / "second")
    assert [p.name.rsplit("-", 1)[-1] for p in (tmp_path / "second" / "wandb").glob("offline-run-*")] == [run_id]


def _pixels(source) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(source).convert("RGB")).astype(int)


def test_dashboards_show_the_validation_images_and_the_confusion_matrix(image_folder, tmp_path, monkeypatch):
    """logger=[csv,wandb,tensorboard] runs all three; what each dashboard shows is the input's pixels (W&B: each
    image exactly; TensorBoard's captioned grid: the inputs' own colours), and the confusion-matrix figure's
    cells are coloured by the counts in val_confusion.tsv."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "logger=[csv,wandb,tensorboard]",
                                "trainer.max_epochs=2", "test_after_fit=false", "family.media_samples=4",
                                "callbacks.throughput.window=2"])
    train(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").is_file()
    inputs = {p: _pixels(p) for p in (image_folder / "train").rglob("*.png")}

    run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert list(run.glob("*.wandb"))
    logged = sorted((run / "files" / "media" / "images").glob("val_samples_*.png"))
    assert len(logged) == 8  # 4 labelled images at each of 2 validations
    for png in logged:  # each is one of the inputs, pixel for pixel (not a float image truncated to black)
        source = min(inputs, key=lambda p: np.abs(inputs[p] - _pixels(png)).max())
        assert np.abs(inputs[source] - _pixels(png)).max() <= 1, png.name
    shown = {min(inputs, key=lambda p: np.abs(inputs[p] - _pixels(png)).max()).parent.name for png in logged}
    assert len(shown) >= 2  # stratified: more than one class

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "version_0"),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    grid = _pixels(io.BytesIO(events.Images("val_samples")[-1].encoded_image_string)).reshape(-1, 3)
    drawn = grid[(grid < 250).any(1)]  # not the white background
    colours = {tuple(c) for image in inputs.values() for c in image.reshape(-1, 3)}
    assert len(drawn) > 10_000 and np.mean([tuple(c) in colours for c in drawn]) > 0.9

    from matplotlib import colormaps

    matrix = [[int(v) for v in row[1:]] for row in csv.reader(
        (tmp_path / "run" / "val_confusion.tsv").read_text().splitlines()[1:], delimiter="\t")]
    figure = _pixels(io.BytesIO(events.Images("val_confusion")[-1].encoded_image_string)).reshape(-1, 3)

    def cells_of(value: float) -> float:
        colour = np.array([round(x * 255) for x in colormaps["viridis"](value)[:3]])
        return (np.abs(figure - colour).max(1) <= 2).sum()

    counts = [v for row in matrix for v in row]
    per_cell = cells_of(1.0) / counts.count(max(counts))  # the pixels of one cell (the largest count's colour)
    assert abs(cells_of(0.0) / per_cell - counts.count(min(counts))) < 0.3  # as many cells of the least count

    scalars = events.Tags()["scalars"]
    assert "train/grad_norm" in scalars and "train/samples_per_sec" in scalars and "train/loss" in scalars
    assert "final/best_val/acc" in scalars  # beside the config in the hparams view
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_test_ckpt_last_tests_the_weights_training_ended_with(image_folder, tmp_path):
    """test_ckpt=last: the final test scores the last weights (what last.ckpt holds), not the best checkpoint."""
    cfg = compose("vit_cifar_cpu", [*folder_run(tmp_path, image_folder), "trainer.max_epochs=3", "test_ckpt=last",
                                    "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min"])
    summary = train(cfg, run_dir=tmp_path / "run")  # the "best" checkpoint is the first epoch's
    assert summary["tested"] == "last" and "epoch000" in summary["best_checkpoint"]
    assert abs(evaluate(summary["last_checkpoint"])["test/loss"] - summary["test/loss"]) < 1e-5
    assert abs(evaluate(summary["best_checkpoint"])["test/loss"] - summary["test/loss"]) > 1e-4


def test_an_unknown_test_ckpt_is_named():
    from mmtx.errors import ConfigError
    from mmtx.config.validate import validate

    with pytest.raises(ConfigError, match=r"test_ckpt='final' is not valid: test_ckpt must be 'best' or 'last'"):
        validate(compose("vit_cifar_cpu", ["test_ckpt=final"]))


def test_a_run_stopped_by_max_steps_mid_epoch_validates_its_final_weights(image_folder, tmp_path):
    """Lightning validates at epoch ends, not when max_steps ends training part-way through an epoch: the final
    weights must still be validated, so the best checkpoint (which the test scores) can be them."""
    cfg = compose("vit_cifar_cpu", [*folder_run(tmp_path, image_folder), "trainer.max_steps=5", "trainer.max_epochs=10",
                                    "callbacks.checkpoint.monitor=step", "callbacks.checkpoint.mode=max",
                                    "test_after_fit=false"])
    summary = train(cfg, run_dir=tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run/metrics/version_0/metrics.csv")))
    validated = sorted(int(r["step"]) for r in rows if r.get("val/acc"))
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("train/loss")})
    assert summary["global_step"] == 5 and epochs == [0, 1]  # 3 batches an epoch: step 5 is mid-epoch
    assert validated == [2, 4]  # the end of epoch 0 (step 3) and the final step, 5 (logged 0-based)
    assert "step0000005" in summary["best_checkpoint"]
