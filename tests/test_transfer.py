"""Transfer with `init_from` (mmtx.training.transfer): weights matched by name and shape across task families, the
table of what was loaded, skipped and new, freezing, layer-wise learning-rate decay, and the errors."""

from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, small_run
from mmtx import build, compose
from mmtx.batch import AudioBatch
from mmtx.checkpoints.io import load_checkpoint
from mmtx.errors import ConfigError
from mmtx.training.optim import param_groups
from mmtx.train import train
from mmtx.training.transfer import freeze, init_from
from test_audio import make_tones


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transfer_root")
    make_tones(root / "fsdd" / "recordings", per_class=(8, 3))
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    return root


@pytest.fixture(scope="module")
def audio_ckpt(root, tmp_path_factory) -> str:
    """A few steps of audio_fsdd (the tiny backbone): the checkpoint transfer starts from."""
    tmp = tmp_path_factory.mktemp("audio_run")
    summary = train(compose("audio_fsdd", [*small_run(tmp, root, "audio"), "trainer.max_steps=4",
                                           "test_after_fit=false"]), run_dir=tmp / "run")
    return summary["last_checkpoint"]


def test_a_classifier_s_backbone_and_tokenizer_start_an_encoder_decoder(root, audio_ckpt, tmp_path):
    args = [*small_run(tmp_path, root, "audio2text"), "trainer.max_steps=2", "test_after_fit=false",
            f"init_from={audio_ckpt}"]
    summary = train(compose("asr_fsdd", args), run_dir=tmp_path / "asr")
    assert summary["status"] == "finished"
    rows = [line.split("\t") for line in (tmp_path / "asr" / "init_from.tsv").read_text().splitlines()[1:]]
    status = {name: kind for kind, name, *_ in rows}
    assert status["backbone.blocks.0.attn.qkv.weight"] == "loaded"
    assert status["tasks.main.tokenizer.stem.conv1.weight"] == "loaded"
    assert status["tasks.main.decoder.stack.blocks.0.cross_attn.q.weight"] == "new"
    assert status["tasks.main.head.proj.weight"] == "unused"  # the classifier's head has no place here


def test_a_model_initialised_from_a_checkpoint_gives_its_outputs(root, audio_ckpt, tmp_path):
    source = load_checkpoint(audio_ckpt)
    cfg = compose("audio_fsdd", small_run(tmp_path, root, "audio"))
    fresh, dm = build(cfg)
    result = init_from(fresh, audio_ckpt)
    assert not result["skipped"] and not result["new"]
    trained, _ = build(cfg)
    trained.load_state_dict(source["state_dict"])
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    assert isinstance(batch, AudioBatch)
    fresh.eval(), trained.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch), trained(batch))


def test_a_language_model_s_backbone_starts_a_classifier_and_shapes_that_differ_are_skipped(root, tmp_path):
    lm = train(compose("gpt_shakespeare_cpu", [*small_run(tmp_path, root, "text"), "trainer.max_steps=2",
                                               "test_after_fit=false", "data.block_size=16"]), run_dir=tmp_path / "lm")
    cfg = compose("audio_fsdd", [*small_run(tmp_path, root, "audio"), "backbone.mlp_ratio=2"])
    model, _ = build(cfg)
    result = init_from(model, lm["last_checkpoint"])
    loaded, new = set(result["loaded"]), set(result["new"])
    assert "backbone.blocks.0.attn.qkv.weight" in loaded  # no bias in nanoGPT's layout: the biases are new
    assert "backbone.blocks.0.attn.qkv.bias" in new
    assert ("backbone.blocks.0.mlp.fc1.weight", (128, 32), (64, 32)) in result["skipped"]
    assert "tasks.main.tokenizer.embed.weight" in result["unused"]


def test_init_from_errors(root, audio_ckpt, tmp_path):
    wide = compose("gpt_shakespeare_cpu", [*small_run(tmp_path, root, "text"), "backbone.dim=48", "backbone.depth=1"])
    model, _ = build(wide)  # another width, another family: not one weight in common
    with pytest.raises(ConfigError, match="has no tensor that matches this model by name and shape"):
        init_from(model, audio_ckpt)
    with pytest.raises(ConfigError, match="finetune.member=x: init_from checkpoint .* is of a single-task run"):
        init_from(model, audio_ckpt, member="x")
    with pytest.raises(ConfigError, match="init_from=.* and resume=auto are both set"):
        train(compose("audio_fsdd", [*small_run(tmp_path, root, "audio"), f"init_from={audio_ckpt}", "resume=auto"]))
    with pytest.raises(ConfigError, match="'decoder' is not a part; the parts are backbone, tokenizer, head"):
        freeze(model, ["decoder"])


def test_a_frozen_backbone_does_not_move_and_its_head_does(root, audio_ckpt, tmp_path):
    args = [*small_run(tmp_path, root, "audio"), "trainer.max_steps=3", "test_after_fit=false",
            f"init_from={audio_ckpt}", "finetune.freeze=[backbone,tokenizer]", "callbacks.last_checkpoint.every_n_steps=1"]
    summary = train(compose("audio_fsdd", args), run_dir=tmp_path / "probe")
    before, after = load_checkpoint(audio_ckpt)["state_dict"], load_checkpoint(summary["last_checkpoint"])["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("backbone.") or ".tokenizer." in k)
    assert not torch.equal(before["tasks.main.head.proj.weight"], after["tasks.main.head.proj.weight"])


def test_layer_decay_and_the_learning_rate_of_new_parameters(root, tmp_path):
    model, _ = build(compose("audio_fsdd", small_run(tmp_path, root, "audio")))  # depth 2
    groups = param_groups(model, 0.05, lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g.get("lr", 1.0) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["tasks.main.head.proj.weight"])] == 1.0
    assert lr_of[id(named["backbone.blocks.1.attn.qkv.weight"])] == 0.5
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.25
    assert lr_of[id(named["tasks.main.tokenizer.stem.conv1.weight"])] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)
    groups = param_groups(model, 0.05, lr=1.0, new_lr=3.0, new={"tasks.main.head.proj.weight"})
    lr_of = {id(p): g.get("lr", 1.0) for g in groups for p in g["params"]}
    assert lr_of[id(named["tasks.main.head.proj.weight"])] == 3.0 and lr_of[id(named["backbone.norm.weight"])] == 1.0
