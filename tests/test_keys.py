"""No key is silently ignored: an override that names nothing the run uses (also with `+`) is one line naming
the closest keys; Lightning's `ckpt_path` points to `resume`; a value set for the run is not replaced by a
derived one; `resume=auto` in a sweep resumes only the same job; a limited evaluation is a fair subset."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import cli, folder_run
from mmtx import compose
from mmtx.config.apps import check_keys
from mmtx.data.base import subset_order
from mmtx.errors import ConfigError
from mmtx.files import read_tsv
from mmtx.train import _compose_groups, train


@pytest.mark.parametrize("arg, message", [
    ("optim.lrr=1", r"optim.lrr: not a key of the run; did you mean optim.lr"),
    ("+trainer.max_stepz=3", r"\+trainer.max_stepz: not a key of the run and lightning.Trainer takes no max_stepz; "
                             r"did you mean trainer.max_steps"),
    ("+data.source.foo=1", r"mmtx.data.image_sources.cifar10 takes no foo"),
    ("+optim.lr=3", r"\+optim.lr: optim.lr is already a key of the run .*set it without the \+: optim.lr="),
    ("seeed=3", r"seeed: not a key of the run; did you mean seed\?"),
    ("+ckpt_path=/tmp/x.ckpt", r"ckpt_path: mmtx calls Lightning's ckpt_path `resume`: resume=PATH/last.ckpt"),
    ("ckpt_path=/tmp/x.ckpt", r"init_from=PATH starts a new run"),
])
def test_an_unknown_key_is_named_with_the_closest(arg, message):
    with pytest.raises(ConfigError, match=message):
        check_keys(["task=vit_cifar_cpu", arg], _compose_groups)


@pytest.mark.parametrize("arg", [
    "+trainer.profiler=simple",              # a keyword lightning.Trainer takes
    "+callbacks.mine._target_=x.Mine",       # a new callback
    "++anything.at.all=1",                   # Hydra's force-add: the user's word for it
    "backbone=small", "optim.lr=1e-3,3e-4",  # a group choice, a sweep
    "family.sample_tokens=8",                # a key of the chosen task's family
])
def test_known_keys_and_additions_pass(arg):
    check_keys(["task=gpt_shakespeare_cpu", arg], _compose_groups)


def test_the_command_line_says_it_in_one_line():
    proc = cli("mmtx.train", "task=vit_cifar_cpu", "trainer.max_stepz=3")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith("mmtx.train: error: trainer.max_stepz: not a key of the run")
    assert "Traceback" not in proc.stderr
    proc = cli("mmtx.predict", "ckpt=x.ckpt", "inputs=y", "topk=3")
    assert proc.returncode == 1 and "topk: not a key of this program; did you mean top_k?" in proc.stderr
    proc = cli("mmtx.eval", "ckpt_path=x.ckpt")
    assert proc.returncode == 1 and "this program takes the checkpoint as ckpt=PATH" in proc.stderr


def test_the_runs_own_max_steps_wins_over_the_cotrain_sum():
    from mmtx.config.members import with_total_steps

    class Data:
        own_steps = {"image": 100.0, "audio": 50.0}

    cfg = OmegaConf.create({"members": {"image": {}, "audio": {}}, "cotrain": {"max_steps": "sum"},
                            "trainer": {"max_steps": 12, "max_epochs": 3}})
    assert with_total_steps(cfg, Data()).trainer.max_steps == 12
    cfg.trainer.max_steps = -1
    assert with_total_steps(cfg, Data()).trainer.max_steps == 150


def test_every_prefix_of_a_limited_evaluation_has_every_class():
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)  # stored in class order
    order = subset_order(len(labels), labels, seed=0)
    assert sorted(order) == list(range(60))  # the whole split, each sample once
    assert set(labels[order[:3]].tolist()) == {0, 1, 2}
    assert labels[order[:30]].bincount().tolist() == [10, 10, 10]  # round robin while every class lasts
    assert order == subset_order(len(labels), labels, seed=0) != subset_order(len(labels), labels, seed=1)


def test_limit_test_batches_scores_every_class(image_folder, tmp_path):
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1", "data.eval_batch_size=3",
                                "trainer.limit_test_batches=1", "trainer.limit_val_batches=1"])
    train(cfg, run_dir=tmp_path / "run")
    header, *rows = read_tsv(tmp_path / "run" / "test_confusion.tsv")
    assert [sum(int(v) for v in row[1:]) for row in rows] == [1, 1, 1]  # one test image of each of 3 classes


def test_resume_auto_in_a_sweep_resumes_the_same_job(image_folder, tmp_path):
    args = ["-m", "task=vit_cifar", *folder_run(tmp_path, image_folder), "trainer.limit_val_batches=1",
            "test_after_fit=false", "optim.lr=1e-3,3e-4"]
    first = cli("mmtx.train", *args, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    # the second launch: job 1 (lr 3e-4) was the newest run; job 0 must still resume lr 1e-3's run
    second = cli("mmtx.train", *args, "trainer.max_epochs=2", "resume=auto")
    assert second.returncode == 0, second.stderr[-2000:]
    sweeps = sorted((tmp_path / "outputs" / "vit_cifar" / "multirun").iterdir())
    said = second.stdout + second.stderr
    for job in ("0", "1"):
        assert f"resuming from {sweeps[0] / job / 'checkpoints' / 'last.ckpt'}" in said, said[-3000:]
    other = cli("mmtx.train", *args[:-1], "optim.lr=5e-4", "trainer.max_epochs=2", "resume=auto")
    assert other.returncode == 1 and "where this job has 0.0005); a job resumes only its own run" in other.stderr


def test_a_validation_interval_longer_than_the_epoch_is_named(image_folder, tmp_path):
    """Lightning's own refusal is a traceback from inside configure_optimizers; mmtx's names the key and the fix."""
    cfg = compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=4",
                                "trainer.val_check_interval=50"])
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval=50 is more than the \d+ training batches of an "
                                          r"epoch.*trainer.check_val_every_n_epoch=null"):
        train(cfg, run_dir=tmp_path / "run")
