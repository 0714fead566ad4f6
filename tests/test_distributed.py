"""Two-process DDP on the CPU (gloo), launched by Lightning from the command line, alone and inside a
Hydra multirun; run information; the sweep summary."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_image_folder

TIMEOUT = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp_images"), per_class=(16, 4))


def deterministic_run(tmp_path, images, batch_size):
    """A tiny vit_cifar run on the image folder with nothing random but the sample order."""
    return [
        "task=vit_cifar", "data=imagefolder", f"data.source.path={images}", "data.val_fraction=0.25",
        "backbone.depth=2", "backbone.dim=32", "backbone.num_heads=2", "backbone.drop_path=0", "tokenizer.patch_size=4",
        f"data.batch_size={batch_size}", "data.eval_batch_size=8", "data.augment.crop_padding=0",
        "data.augment.hflip=false", "data.augment.randaugment=null", "data.mixup=0", "data.cutmix=0",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", f"paths.output_root={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}", "+callbacks.record._target_=conftest.RecordSamplerIndices",
    ]


def cli(args, cwd, launcher=()):
    """`python [-m launcher ...] -m mmtx.train ARGS` in a fresh process (the test callbacks importable)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, *launcher, "-m", "mmtx.train", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(run_dir):
    with open(next(run_dir.glob("metrics/*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, images):
    one, two = tmp_path / "one", tmp_path / "two"
    cli([*deterministic_run(tmp_path, images, 16), "trainer=cpu", f"hydra.run.dir={one}"], tmp_path)
    cli([*deterministic_run(tmp_path, images, 8), "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={two}"], tmp_path)

    rank0, rank1 = (set(json.loads((two / f"indices_rank{r}.json").read_text())) for r in (0, 1))
    assert rank0 and rank1 and not rank0 & rank1  # each rank its own shard
    assert sorted(rank0 | rank1) == sorted(json.loads((one / "indices_rank0.json").read_text()))

    checkpoints = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # one best, one last: written once
    assert not list(two.glob("**/.*.tmp"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["global_step"] == json.loads((one / "summary.json").read_text())["global_step"] == 2 * 2

    loss_one = [float(r["train/loss"]) for r in metrics(one) if r.get("train/loss")]
    loss_two = [float(r["train/loss"]) for r in metrics(two) if r.get("train/loss")]
    # rank 0 logs its own half-batch loss; the updates (averaged gradients) are the same, so the
    # end-of-run validation loss (reduced over ranks) matches the one-process run.
    assert len(loss_one) == len(loss_two) == 4
    val_one = [float(r["val/loss"]) for r in metrics(one) if r.get("val/loss")][-1]
    val_two = [float(r["val/loss"]) for r in metrics(two) if r.get("val/loss")][-1]
    assert val_two == pytest.approx(val_one, rel=0.05)

    info = json.loads((two / "run_info.json").read_text())
    assert info["seed"] == 42 and info["mmtx_version"] and "git_commit" in info and "trainer=ddp" in info["command"]
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "cpu" in info
    checkpoint = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert checkpoint["mmtx_run_info"]["git_commit"] == info["git_commit"]


def test_ddp_inside_a_hydra_multirun(tmp_path, images):
    sweep = tmp_path / "sweep"
    out = cli(["-m", *deterministic_run(tmp_path, images, 8), "trainer=ddp", "trainer.devices=2",
               "trainer.max_epochs=1", "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], out.stdout[-2000:]
    for job in jobs:  # both ranks of a job worked in the job's folder
        assert {f"indices_rank{r}.json" for r in (0, 1)} <= {p.name for p in (sweep / job).iterdir()}
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))
    rows = list(csv.DictReader(open(sweep / "summary.tsv"), delimiter="\t"))
    assert [r["overrides"].split()[-1] for r in rows] == ["optim.lr=0.001", "optim.lr=0.0003"]
    assert all(r["best val/acc"] and r["test/acc"] for r in rows)


def test_optuna_sweep_of_two_trials_maximises_the_monitored_metric(tmp_path, images):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra is not installed")
    sweep = tmp_path / "sweep"
    args = [a for a in deterministic_run(tmp_path, images, 8) if not a.startswith("+callbacks")]
    cli(["-m", *args, "trainer=cpu", "trainer.max_epochs=1", "sweep=optuna", "hydra.sweeper.n_trials=2",
         f"hydra.sweep.dir={sweep}"], tmp_path)
    from omegaconf import OmegaConf

    result = OmegaConf.load(sweep / "optimization_results.yaml")
    rows = list(csv.DictReader(open(sweep / "summary.tsv"), delimiter="\t"))
    assert len(rows) == 2 and all("optim.lr=" in r["overrides"] for r in rows)
    assert result.best_value == pytest.approx(max(float(r["best val/acc"]) for r in rows))  # maximised: val/acc
    assert set(result.best_params) == {"optim.lr", "optim.weight_decay"}


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra is not installed")
    out = cli(["task=vit_cifar", "launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
               "--cfg", "all", "--resolve"], tmp_path)
    from omegaconf import OmegaConf

    launcher = OmegaConf.create(out.stdout).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


def test_each_job_of_a_multirun_is_its_own_wandb_run(tmp_path, images):
    sweep = tmp_path / "sweep"
    args = [a for a in deterministic_run(tmp_path, images, 8) if not a.startswith("+callbacks")]
    cli(["-m", *args, "trainer=cpu", "trainer.max_epochs=1", "logger=wandb", "optim.lr=1e-3,3e-4",
         f"hydra.sweep.dir={sweep}"], tmp_path)
    runs = [list((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name.split("-")[-1] != runs[1][0].name.split("-")[-1]
    for job in ("0", "1"):  # the job's images, with labels, went to its own run
        assert list((sweep / job / "wandb").glob("offline-run-*/files/media/images/val_samples_*.png"))


def test_ranks_started_by_torchrun(tmp_path, images):
    run = tmp_path / "run"
    cli([*deterministic_run(tmp_path, images, 8), "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
         f"hydra.run.dir={run}"], tmp_path, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    rank0, rank1 = (set(json.loads((run / f"indices_rank{r}.json").read_text())) for r in (0, 1))
    assert rank0 and rank1 and not rank0 & rank1
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2


def test_fsdp_config_builds_lightnings_strategy_with_one_unit_per_block():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from mmtx import compose
    from mmtx.nn.block import Block

    cfg = compose("vit_cifar", ["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}  # recomputed blocks


def test_masked_pretraining_runs_on_two_processes(tmp_path, images):
    """MAE on two DDP ranks: each rank masks its own half of the batch; the reconstruction loss is reduced over
    the ranks for validation."""
    run = tmp_path / "mae"
    args = [a for a in deterministic_run(tmp_path, images, 8) if not a.startswith(("task=", "+callbacks.record"))]
    cli(["task=mae_cifar_cpu", *args, "family.decoder.dim=16", "family.decoder.num_heads=2", "trainer=ddp",
         "trainer.devices=2", "trainer.max_epochs=1", f"hydra.run.dir={run}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 2 and summary["test/loss"] > 0
