"""Co-training (mmtx.config.members): several tasks on one backbone in one run. The schedules' proportions and
resumability, one tensor set for the backbone, per-member metrics and checkpoints, exact mid-epoch resume,
and the errors for members that cannot share the run."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, cotrain_small_run, make_image_folder, read_metrics

from mmtx import build, compose
from mmtx.checkpoints.io import load_checkpoint
from mmtx.config.members import normalised_score, resolve_cotrain
from mmtx.data.base import EpochShuffle, index_loader
from mmtx.data.cotrain import ScheduleLoader, member_sequence
from mmtx.errors import ConfigError
from mmtx.files import read_tsv
from mmtx.train import train

# -- schedules ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, weights, expected", [
    ("weighted", [1.0, 3.0], [0.25, 0.75]),
    ("weighted", [383.0, 37.0, 1170.0], [383 / 1590, 37 / 1590, 1170 / 1590]),
    ("uniform", [1.0, 3.0, 6.0], [1 / 3, 1 / 3, 1 / 3]),
])
def test_random_schedules_visit_members_in_their_proportions(schedule, weights, expected):
    draws = torch.cat([member_sequence(schedule, weights, 5_000, seed=0, epoch=e) for e in range(4)])
    share = torch.bincount(draws, minlength=len(weights)).double() / len(draws)
    assert torch.allclose(share, torch.tensor(expected, dtype=torch.float64), atol=0.01), share


def test_schedules_are_seeded_by_seed_and_epoch_and_round_robin_takes_turns():
    a = member_sequence("weighted", [1.0, 1.0], 100, seed=3, epoch=0)
    assert torch.equal(a, member_sequence("weighted", [1.0, 1.0], 100, seed=3, epoch=0))
    assert not torch.equal(a, member_sequence("weighted", [1.0, 1.0], 100, seed=3, epoch=1))
    assert not torch.equal(a, member_sequence("weighted", [1.0, 1.0], 100, seed=4, epoch=0))
    turns = torch.cat([member_sequence("round_robin", [1.0] * 3, 5, seed=0, epoch=e) for e in range(3)])
    assert turns.tolist() == [i % 3 for i in range(15)]  # the turns go on across epochs


class _Owner:
    trainer = None


def _loaders(sizes: dict[str, int], batch_size: int = 4) -> dict:
    return {name: index_loader("train", n, batch_size, EpochShuffle(n, seed=i), train=True, seed=i)
            for i, (name, n) in enumerate(sizes.items())}


def _flat(batch) -> tuple:
    if "members" in batch:
        return tuple((name, tuple(b["index"].tolist())) for name, b in batch["members"].items())
    return batch["member"], tuple(batch["index"].tolist())


@pytest.mark.parametrize("schedule", ["weighted", "uniform", "round_robin", "accumulate"])
def test_the_schedule_loader_resumes_mid_epoch_on_the_same_members_and_batches(schedule):
    sizes = {"a": 40, "b": 12}  # 10 and 3 batches of 4: b runs out and starts its next epoch inside one of a's
    straight = ScheduleLoader(_Owner(), _loaders(sizes), schedule, {}, seed=7)
    epochs = [[_flat(b) for b in straight]]
    straight.load_state_dict({"epoch": 1, "batches": 0})  # no trainer here: the next epoch, as a resume would
    epochs.append([_flat(b) for b in straight])
    assert len(straight) == (10 if schedule == "accumulate" else 13) == len(epochs[0])
    for epoch, cut in [(0, 5), (1, 2), (1, 11)]:
        if cut >= len(straight):
            continue
        resumed = ScheduleLoader(_Owner(), _loaders(sizes), schedule, {}, seed=7)
        resumed.load_state_dict({"epoch": epoch, "batches": cut})
        assert [_flat(b) for b in resumed] == epochs[epoch][cut:]
    if schedule != "accumulate":  # a member's first 3 batches are its first epoch: all 12 samples, once each
        b_batches = [idx for name, idx in epochs[0] + epochs[1] if name == "b"]
        assert sorted(i for idx in b_batches[:3] for i in idx) == list(range(12))


def test_under_ddp_each_rank_takes_its_own_batches_of_every_member():
    sizes = {"a": 16, "b": 16}  # 4 batches each: 2 a rank, taken in turns (a, b, a, b): one epoch of each
    seen = []
    for rank in (0, 1):
        loader = ScheduleLoader(_Owner(), _loaders(sizes), "round_robin", {}, seed=0)
        loader.rank, loader.world = rank, 2
        loader.per_epoch = {name: len(l) // 2 for name, l in loader.loaders.items()}
        loader.length = sum(loader.per_epoch.values())
        seen.append([_flat(b) for b in loader])
    assert [m for m, _ in seen[0]] == [m for m, _ in seen[1]]  # the same member at every step on both ranks
    for member in sizes:
        rank0 = {i for m, idx in seen[0] if m == member for i in idx}
        rank1 = {i for m, idx in seen[1] if m == member for i in idx}
        assert not rank0 & rank1 and len(rank0 | rank1) == 16  # disjoint samples, together the whole split


def test_normalised_score_is_one_at_the_reference_and_higher_is_better():
    assert normalised_score(0.98, "max", 0.98) == 1.0 and normalised_score(0.02, "min", 0.02) == 1.0
    assert normalised_score(0.99, "max", 0.98) > 1.0 and normalised_score(0.01, "min", 0.02) > 1.0
    assert normalised_score(0.5, "max", 0.98) < 1.0 and normalised_score(0.04, "min", 0.02) < 1.0


# -- runs -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """A data root with a miniature CIFAR-10 and Tiny Shakespeare (the image and text members)."""
    root = tmp_path_factory.mktemp("cotrain_root")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(3, 1), size=32)
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    return root


def image_and_text(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    """cotrain_multimodal without its audio member, tiny, on the miniature data."""
    args = [a for a in cotrain_small_run("cotrain_multimodal", tmp_path, root) if not a.startswith("members.audio")]
    return ["~members.audio", *args, "backbone.dropout=0.1", "cotrain.max_steps=null", "cotrain.schedule=round_robin",
            *extra]


@pytest.fixture(scope="module")
def cotrained(mixed_root, tmp_path_factory) -> dict:
    """One short co-training run of an image classifier and a language model (validated every 4 steps)."""
    tmp_path = tmp_path_factory.mktemp("cotrained")
    args = image_and_text(tmp_path, mixed_root, "trainer.max_steps=8", "trainer.max_epochs=-1",
                          "+trainer.val_check_interval=4", "trainer.limit_val_batches=2")
    return train(compose("cotrain_multimodal", args), run_dir=tmp_path / "run")


def test_a_cotraining_run_shares_one_backbone_and_reports_every_member(cotrained):
    summary, run = cotrained, Path(cotrained["run_dir"])
    assert summary["status"] == "finished" and summary["global_step"] == 8
    assert summary["monitor"] == "val/score" and summary["best_checkpoint"]
    assert {"image/test/acc", "text/test/loss"} <= set(summary)
    logged = set().union(*(row.keys() for row in read_metrics(run)))
    assert {"image/val/acc", "text/val/loss", "val/score", "image/train/loss", "text/train/loss"} <= logged
    ckpt = load_checkpoint(summary["best_checkpoint"])
    assert set(ckpt["mmtx_members"]) == {"image", "text"} and "mmtx_vocab" in ckpt["mmtx_members"]["text"]
    assert set(ckpt["mmtx_config"]["member_configs"]) == {"image", "text"}
    assert any(k.startswith("backbone.") for k in ckpt["state_dict"])
    assert not any(".backbone." in k for k in ckpt["state_dict"])  # one tensor set, in no part
    assert (run / "text" / "tokenizer.json").is_file() and (run / "image" / "val_confusion.tsv").is_file()


def test_eval_generate_and_predict_use_one_member_of_a_cotrained_checkpoint(cotrained, mixed_root, tmp_path):
    from mmtx.eval import main as evaluate
    from mmtx.generate import main as generate
    from mmtx.predict import main as predict

    ckpt = cotrained["best_checkpoint"]
    image = evaluate([f"ckpt={ckpt}", "member=image"])
    assert set(image) == {"test/acc", "test/loss"}
    assert image["test/acc"] == pytest.approx(cotrained["image/test/acc"])  # the run's own test of that member
    text = evaluate([f"ckpt={ckpt}", "member=text"])
    assert text["test/loss"] == pytest.approx(cotrained["text/test/loss"], rel=1e-5)
    [sample] = generate([f"ckpt={ckpt}", "member=text", "prompt=First", "max_new_tokens=12", "device=cpu"])
    assert sample.startswith("First") and len(sample) > len("First")
    rows = predict([f"ckpt={ckpt}", "member=image", f"inputs={mixed_root / 'cifar10' / 'test' / 'c3'}", "device=cpu"])
    assert len(rows) == 2 and rows[1][1] in {f"c{i}" for i in range(10)}
    pick = "is a co-training run: pick one of its members with member=NAME (members: image, text)"
    for missing, words in [(None, pick), ("audio", "has no member 'audio'")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            evaluate([f"ckpt={ckpt}", *([f"member={missing}"] if missing else [])])
    with pytest.raises(ConfigError, match="is a co-training run"):
        predict([f"ckpt={ckpt}", f"inputs={mixed_root / 'cifar10' / 'test' / 'c3'}"])


def test_every_member_s_gradient_reaches_the_one_backbone(mixed_root, tmp_path):
    cfg = resolve_cotrain(compose("cotrain_multimodal", image_and_text(tmp_path, mixed_root)))
    model, datamodule = build(cfg)
    assert set(model.tasks) == {"image", "text"}
    for name in ("image", "text"):
        loader = datamodule.members[name].train_dataloader()
        batch = datamodule.on_after_batch_transfer({**next(iter(loader)), "member": name})
        model.zero_grad()
        out = model(batch)[name]
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        other = next(n for n in model.tasks if n != name)
        assert all(p.grad is None for p in model.tasks[other].parameters())


def test_a_cotraining_run_resumes_mid_epoch_exactly(mixed_root, tmp_path):
    base = image_and_text(tmp_path, mixed_root, "trainer.max_steps=10", "trainer.max_epochs=-1",
                          "trainer.limit_val_batches=0", "test_after_fit=false",
                          "callbacks.last_checkpoint.every_n_steps=4", "cotrain.schedule=uniform")
    straight = train(compose("cotrain_multimodal", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=4"]
    cut = train(compose("cotrain_multimodal", [*base, *stop]), run_dir=tmp_path / "cut")
    assert cut["global_step"] == 4
    resumed = train(compose("cotrain_multimodal", [*base, f"resume={cut['last_checkpoint']}"]),
                    run_dir=tmp_path / "resumed")
    assert resumed["global_step"] == 10
    a, b = (load_checkpoint(s["last_checkpoint"])["state_dict"] for s in (straight, resumed))
    for key in a:  # the same members, batches, crops and dropout: bit-identical weights
        assert torch.equal(a[key], b[key]), key


# -- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("members.audio.task=audio_fsd", ["members.audio.task='audio_fsd' is not a task", "audio_fsdd", "vit_cifar"]),
    ("members.audio.task=cotrain_fsdd", ["itself a co-training task"]),
    ("members.audio.overrides=['backbone.depth=6']", ["member 'audio'", "backbone.depth=6", "run's backbone.depth"]),
    ("members.asr.tokenizer_from=speech", ["members.asr.tokenizer_from='speech' names no other member"]),
    ("+members.asr.tokenizer.n_mels=64", ["tokenizers differ in tokenizer.n_mels"]),
    ("cotrain.best=everything", ["cotrain.best='everything' must be `mean` or a member: audio, asr"]),
    ("+members.audio.sample_weight=-1", ["members.audio.sample_weight must be a number > 0"]),
    ("+members.audio.data.batch_size=0", ["members.audio (task audio_fsdd): data.batch_size"]),
])
def test_members_that_cannot_share_the_run_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        resolve_cotrain(compose("cotrain_fsdd", [override]))
    for word in words:
        assert word in str(err.value)


def test_a_member_s_data_reaches_it_from_the_command_line():
    cfg = resolve_cotrain(compose("cotrain_fsdd", ["members.audio.overrides=['data.batch_size=32']",
                                                   "+members.asr.data.eval_batch_size=50"]))
    assert cfg.member_configs.audio.data.batch_size == 32 and cfg.member_configs.asr.data.eval_batch_size == 50
    assert cfg.member_configs.asr.data.batch_size == 64  # its own task's
    assert cfg.member_configs.audio.backbone == cfg.backbone  # the run's backbone, shared


@pytest.mark.parametrize("strategy,mlp", [("ddp", "dense"), ("fsdp", "dense"), ("ddp", "moe"), ("fsdp", "moe")])
def test_two_process_cotraining_trains_the_same_member_on_both_ranks(strategy, mlp, mixed_root, tmp_path):
    """Also with a mixture of experts in the shared backbone (backbone.mlp=moe): DDP replicates every expert,
    FSDP shards the expert tensors as any other; each member logs its own expert load."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    run = tmp_path / strategy
    fsdp = ["trainer.strategy._target_=conftest.cpu_fsdp"] if strategy == "fsdp" else []  # FSDP on CPU processes
    moe = ["backbone.mlp=moe", "backbone.moe.num_experts=4"] if mlp == "moe" else []
    args = image_and_text(tmp_path, mixed_root, f"trainer={strategy}", *fsdp, *moe, "trainer.devices=2", "trainer.accelerator=cpu",
                          "trainer.precision=32-true", "trainer.max_steps=6", "trainer.max_epochs=-1",
                          "trainer.limit_val_batches=1", "test_after_fit=false", f"hydra.run.dir={run}",
                          "+callbacks.record._target_=conftest.RecordMembers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "mmtx.train", "task=cotrain_multimodal", *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (json.loads((run / f"members_rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == 6 and [m for m, _ in rank0] == [m for m, _ in rank1]  # the same member at every step
    assert {m for m, _ in rank0} == {"image", "text"}
    assert all(a != b for (_, a), (_, b) in zip(rank0, rank1))  # each rank its own batch of that member
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    norms = [float(r["train/grad_norm"]) for r in read_metrics(run) if r.get("train/grad_norm")]
    assert len(norms) == 6 and all(0 < n < float("inf") for n in norms)  # clipped by norm (FSDP: all shards)
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]  # one plain checkpoint, either way
    assert state["backbone.blocks.0.attn.qkv.weight"].shape == (96, 32) and any(k.startswith("tasks.text.") for k in state)
    # The final step (mid-epoch) is validated, and the language model's samples are drawn from whole weights
    # (under FSDP its embedding and head are flat shards outside a step).
    samples = read_tsv(run / "text" / "samples.tsv")  # a sample's newlines are inside its quoted field
    assert len(samples) == 2 and samples[1][0] == "6" and len(samples[1]) == 3
    if mlp == "moe":
        assert state["backbone.blocks.1.mlp.experts.fc1.weight"].shape == (4, 128, 32)  # whole, gathered from shards
        rows = read_metrics(run)
        for member in ("image", "text"):  # each member's routing: the loads of its tokens sum to one
            last = [r for r in rows if r.get(f"{member}/val/moe/block1/load0")][-1]
            loads = [float(last[f"{member}/val/moe/block1/load{e}"]) for e in range(4)]
            assert sum(loads) == pytest.approx(1.0, abs=1e-5)
            assert any(r.get(f"{member}/train/moe/block1/load0") for r in rows)


def test_the_multirun_summary_table_lists_every_member(tmp_path):
    from mmtx.config.sweep import write_sweep_summary

    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- task=cotrain_fsdd\n- optim.lr={lr}\n")
        summary = {"monitor": "val/score", "best_score": 1.01, "global_step": 10, "run_dir": str(tmp_path / job),
                   "audio/test/acc": 0.5, "asr/test/wer": 0.25, "asr/test/cer": 0.125}
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    rows = list(csv.DictReader(open(write_sweep_summary(tmp_path)), delimiter="\t"))
    assert [r["overrides"] for r in rows] == ["task=cotrain_fsdd optim.lr=0.001", "task=cotrain_fsdd optim.lr=0.0003"]
    assert [(r["best val/score"], r["audio/test/acc"], r["asr/test/wer"], r["asr/test/cer"]) for r in rows] == \
        [("1.01", "0.5", "0.25", "0.125")] * 2


def test_the_end_of_run_summary_prints_every_member(cotrained, capsys):
    from mmtx.training.summary import print_summary

    print_summary(cotrained)
    printed = capsys.readouterr().out
    assert re.search(r"image/test/acc:\s+\d\.\d{4}", printed) and re.search(r"text/test/loss:\s+\d\.\d{4}", printed)


def test_a_streamed_member_cotrains_and_resumes_exactly(mixed_root, tmp_path):
    """The image member streamed from shards (litdata's loader, its own epochs seeded): 10 steps straight equal
    4 + 6 resumed, across several of the member's epochs."""
    pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")
    from mmtx.prepare import main

    shards = tmp_path / "shards"
    main(["data=imagefolder", f"data.source.path={mixed_root / 'cifar10'}", f"out={shards}", "num_workers=1"])
    streamed = f"'data=streaming','data.path={shards}','data.num_workers=0',"
    base = [a.replace("members.image.overrides=[", f"members.image.overrides=[{streamed}")
            for a in image_and_text(tmp_path, mixed_root, "trainer.max_steps=10", "trainer.max_epochs=-1",
                                    "trainer.limit_val_batches=0", "test_after_fit=false",
                                    "callbacks.last_checkpoint.every_n_steps=4", "cotrain.schedule=uniform")]
    assert any(a.startswith("members.image.overrides=['data=streaming'") for a in base)
    straight = train(compose("cotrain_multimodal", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=4"]
    cut = train(compose("cotrain_multimodal", [*base, *stop]), run_dir=tmp_path / "cut")
    resumed = train(compose("cotrain_multimodal", [*base, f"resume={cut['last_checkpoint']}"]),
                    run_dir=tmp_path / "resumed")
    assert cut["global_step"] == 4 and resumed["global_step"] == 10
    a, b = (load_checkpoint(s["last_checkpoint"])["state_dict"] for s in (straight, resumed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
