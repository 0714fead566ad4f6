"""The Python API: `mmtx.load` gives back each task family's model, whose predict/generate return exactly what
the command lines print; `MmtxModule.load_from_checkpoint` works as Lightning users expect; bad files and
co-training checkpoints without a member are the same one-line errors as mmtx.eval's."""

from __future__ import annotations

import pytest
import torch

import mmtx
from conftest import TINY_TEXT, cli, folder_run, make_image_folder, make_parallel, small_run
from mmtx import compose
from mmtx.errors import CheckpointError, ConfigError
from mmtx.files import read_tsv
from mmtx.module import MmtxModule
from mmtx.train import train
from test_generate_options import lm_run


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    folder = make_image_folder(tmp / "images")
    summary = train(compose("vit_cifar", [*folder_run(tmp, folder), "trainer.max_steps=3", "test_after_fit=false"]),
                    run_dir=tmp / "run")
    return summary["last_checkpoint"], folder


def test_a_classifier_loads_and_predicts_as_the_command_line(classifier, tmp_path):
    ckpt, folder = classifier
    model = mmtx.load(ckpt, device="cpu")
    assert model.kind == "classification" and model.classes == ["cat", "dog", "ship"]
    assert not model.module.training and model.device.type == "cpu"
    rows = model.predict(folder / "test", top_k=2)
    out = tmp_path / "labels.tsv"
    proc = cli("mmtx.predict", f"ckpt={ckpt}", f"inputs={folder / 'test'}", "top_k=2", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows == read_tsv(out) and len(rows) == 13
    logits = model.module.task.predict(model.module.backbone, _images(folder, model))
    assert logits.shape == (2, 3)


def _images(folder, model):
    from mmtx.data.modalities import modality_of

    paths = sorted((folder / "test" / "cat").glob("*.png"))[:2]
    return modality_of(model.part.tokenizer).read_files(paths, model.part.tokenizer, model.config, "error")[1]


def test_a_language_model_generates_as_the_command_line(tmp_path):
    summary = lm_run(tmp_path, TINY_TEXT)
    model = mmtx.load(summary["last_checkpoint"], device="cpu")
    assert model.kind == "language_model" and model.classes is None and model.vocab.decode(model.vocab.encode("All")) == "All"
    texts = model.generate("First", max_new_tokens=12, num_samples=2, seed=3)
    proc = cli("mmtx.generate", f"ckpt={summary['last_checkpoint']}", "prompt=First", "max_new_tokens=12",
               "num_samples=2", "seed=3", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "".join(text + "\n" if i == 0 else f"\n---\n{text}\n" for i, text in enumerate(texts))
    with pytest.raises(ConfigError, match="beam_size=2 does not apply"):
        model.generate(beam_size=2)
    with pytest.raises(ConfigError, match="is a language model: predict labels images and audio"):
        model.predict("x.png")


def test_an_encoder_decoder_translates_as_the_command_line(tmp_path):
    data = make_parallel(tmp_path / "par")
    args = [*small_run(tmp_path, modality="text2text"), "data=parallel_text", "trainer.max_steps=2",
            "test_after_fit=false", "family.val_decode_batches=1"]
    args += [f"data.source.files.{split}.{side}={data}/{split}.{lang}.gz"
             for split in ("train", "val") for side, lang in (("src", "en"), ("tgt", "de"))]
    summary = train(compose("translate_multi30k", args), run_dir=tmp_path / "run")
    model = mmtx.load(summary["last_checkpoint"], device="cpu")
    assert model.kind == "seq2seq"
    sentences = ["A dog runs.", "Two men are talking."]
    hyps = model.generate(text=sentences, beam_size=2)
    text_file = tmp_path / "in.txt"
    text_file.write_text("\n".join(sentences) + "\n")
    proc = cli("mmtx.generate", f"ckpt={summary['last_checkpoint']}", f"text_file={text_file}", "beam_size=2",
               "device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == hyps and len(hyps) == 2


def test_lightning_load_from_checkpoint_and_exports(classifier, tmp_path):
    ckpt, folder = classifier
    module = MmtxModule.load_from_checkpoint(ckpt)
    loaded = mmtx.load(ckpt, device="cpu").module
    assert isinstance(module, MmtxModule) and not module.training
    for (name, a), b in zip(module.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    from mmtx.export import main as export

    out = export([f"ckpt={ckpt}", f"out={tmp_path / 'export'}"])
    assert mmtx.load(out, device="cpu").predict(folder / "test") == mmtx.load(ckpt, device="cpu").predict(folder / "test")


def test_bad_files_are_the_errors_eval_gives(tmp_path):
    from mmtx.eval import evaluate

    not_mmtx = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, not_mmtx)
    for path in (not_mmtx, tmp_path / "missing.ckpt"):
        with pytest.raises(Exception) as from_eval:
            evaluate(str(path))
        with pytest.raises(type(from_eval.value)) as from_load:
            mmtx.load(path)
        assert str(from_load.value) == str(from_eval.value)
    assert isinstance(from_load.value, FileNotFoundError)
    with pytest.raises(CheckpointError, match="has no mmtx run configuration"):
        mmtx.load(not_mmtx)
    cotrained = tmp_path / "cotrained.ckpt"
    torch.save({"mmtx_config": {}, "state_dict": {}, "mmtx_members": {"image": {}, "audio": {}}}, cotrained)
    with pytest.raises(ConfigError) as from_eval:
        evaluate(str(cotrained))
    with pytest.raises(ConfigError, match=r"is a co-training run: pick one of its members with member=NAME "
                                          r"\(members: image, audio\)") as from_load:
        mmtx.load(cotrained)
    assert str(from_load.value) == str(from_eval.value)


def test_a_checkpoint_written_before_the_package_layout_still_loads(classifier, tmp_path):
    """Checkpoints store their run configuration, whose `_target_`s named modules at the package root before they
    moved into folders by role (mmtx.callbacks -> mmtx.training.callbacks, mmtx.data.sources ->
    mmtx.data.image_sources): loading renames them. A single-task run's part entries (classes, input size, the
    train/loss window) were at the checkpoint's top level, where they are now under mmtx_members["main"] as for
    several members: loading and resuming move them there."""
    from mmtx.checkpoints.io import MOVED, current_targets, with_members
    from mmtx.eval import evaluate

    ckpt, _ = classifier
    checkpoint = torch.load(ckpt, weights_only=True)
    config = checkpoint["mmtx_config"]
    assert config["data"]["source"]["_target_"] == "mmtx.data.image_sources.image_folder"
    new_to_old = {new: old for old, new in MOVED.items()}
    renamed = []

    def back(node):  # as a checkpoint of the old layout stored it
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                new = next((n for n in new_to_old if value.startswith(n)), None)
                if new:
                    node[key] = new_to_old[new] + value[len(new):]
                    renamed.append(node[key])
            elif isinstance(value, dict):
                back(value)

    back(config)
    assert "mmtx.data.sources.image_folder" in renamed and "mmtx.callbacks.LastCheckpoint" in renamed
    assert set(checkpoint["mmtx_members"]) == {"main"}
    part_entries = checkpoint.pop("mmtx_members")["main"]
    assert {"mmtx_runtime", "mmtx_train_loss_window"} <= part_entries.keys()
    checkpoint.update(part_entries)  # the single-task layout before one layout for all
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    again = with_members(dict(checkpoint))
    assert again["mmtx_members"] == {"main": part_entries} and "mmtx_runtime" not in again
    assert again["mmtx_run_info"] == checkpoint["mmtx_run_info"]  # the run's own entries stay where they are
    assert current_targets({"a": [{"_target_": "mmtx.callbacks.EMA"}]}) == {"a": [{"_target_": "mmtx.training.callbacks.EMA"}]}
    assert mmtx.load(old, device="cpu").classes == ["cat", "dog", "ship"]
    assert "test/acc" in evaluate(str(old), [])
