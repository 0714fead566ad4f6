"""Export (mmtx.export): a checkpoint's model as model.safetensors + config.yaml + mmtx.json, read back by
init_from, eval, generate and predict with the checkpoint's outputs; an edited folder is named on load."""

import json
from pathlib import Path

import pytest
import torch

from mmtx import build, compose
from mmtx.checkpoints.io import find_resume, load_checkpoint
from mmtx.errors import CheckpointError, ConfigError
from mmtx.export import main as export
from mmtx.train import train
from mmtx.training.transfer import init_from
from test_cotrain import image_and_text, mixed_root  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def run(mixed_root, tmp_path_factory) -> dict:  # noqa: F811
    """Four steps of an image classifier and a language model co-trained (both kinds of part, tied embeddings)."""
    tmp = tmp_path_factory.mktemp("export_run")
    args = image_and_text(tmp, mixed_root, "trainer.max_steps=4", "trainer.max_epochs=-1", "test_after_fit=false")
    summary = train(compose("cotrain_multimodal", args), run_dir=tmp / "run")
    return {"ckpt": summary["last_checkpoint"], "args": args, "tmp": tmp}


@pytest.fixture(scope="module")
def exported(run) -> Path:
    return export([f"ckpt={run['ckpt']}", f"out={run['tmp'] / 'exported'}"])


def test_the_folder_holds_the_weights_and_configuration_without_the_training_state(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "mmtx.json", "model.safetensors"]
    ckpt = load_checkpoint(run["ckpt"])
    back = load_checkpoint(exported)
    assert back.keys() >= {"state_dict", "mmtx_config", "mmtx_members", "mmtx_run_info"}
    assert not back.keys() & {"optimizer_states", "lr_schedulers", "loops", "callbacks"}
    assert "mmtx_train_loss_window" not in json.dumps(back["mmtx_members"])  # training state stays behind
    assert back["mmtx_config"] == ckpt["mmtx_config"]
    assert back["state_dict"].keys() == ckpt["state_dict"].keys()
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(back["state_dict"][name], tensor), name
    assert (exported / "model.safetensors").stat().st_size < Path(run["ckpt"]).stat().st_size  # no optimizer moments


def test_eval_generate_predict_and_init_from_read_the_folder_as_the_checkpoint(run, exported, mixed_root):  # noqa: F811
    from mmtx.eval import main as evaluate
    from mmtx.generate import main as generate
    from mmtx.predict import main as predict

    ckpt = run["ckpt"]
    for member in ("image", "text"):
        assert evaluate([f"ckpt={exported}", f"member={member}"]) == evaluate([f"ckpt={ckpt}", f"member={member}"])
    greedy = ["member=text", "prompt=First", "max_new_tokens=12", "temperature=0", "device=cpu"]
    assert generate([f"ckpt={exported}", *greedy]) == generate([f"ckpt={ckpt}", *greedy])
    images = [f"inputs={mixed_root / 'cifar10' / 'test'}", "member=image", "device=cpu"]
    assert predict([f"ckpt={exported}", *images]) == predict([f"ckpt={ckpt}", *images])

    model, _ = build(compose("cotrain_multimodal", run["args"]))
    result = init_from(model, exported)
    assert not result["new"] and not result["skipped"]
    reference, _ = build(compose("cotrain_multimodal", run["args"]))
    reference.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_an_edited_folder_and_misuses_are_named(run, exported, tmp_path):
    from safetensors.torch import load_file, save_file

    edited = export([f"ckpt={run['ckpt']}", f"out={tmp_path / 'edited'}"])
    tensors = load_file(str(edited / "model.safetensors"))
    dropped = "backbone.blocks.0.attn.qkv.weight"
    del tensors[dropped]
    save_file(tensors, str(edited / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing {dropped}.*export the checkpoint again"):
        load_checkpoint(edited)
    (edited / "mmtx.json").unlink()
    with pytest.raises(CheckpointError, match="is a folder without mmtx.json"):
        load_checkpoint(edited)

    with pytest.raises(ConfigError, match="exists: pass overwrite=true"):
        export([f"ckpt={run['ckpt']}", f"out={exported}"])
    assert export([f"ckpt={run['ckpt']}", f"out={exported}", "overwrite=true"]) == exported
    assert load_checkpoint(exported)["mmtx_export"]
    with pytest.raises(ConfigError, match="format=.tflite. is not valid: format must be .safetensors. or .hf. or .onnx."):
        export([f"ckpt={run['ckpt']}", f"out={tmp_path / 'x'}", "format=tflite"])
    with pytest.raises(ConfigError, match="member=image: format=safetensors writes every member"):
        export([f"ckpt={run['ckpt']}", f"out={tmp_path / 'x'}", "member=image"])
    with pytest.raises(CheckpointError, match=f"is an exported model .* init_from={exported}"):
        find_resume(str(exported), tmp_path, "cotrain_multimodal")


# -- format=onnx: classifiers, checked in onnxruntime ------------------------------------------------------


def onnx_labels(folder: Path, images: list[Path]) -> list[str]:
    """Labels from model.onnx alone, the images prepared as its preprocess.json says."""
    import numpy as np
    import onnxruntime
    from PIL import Image

    pre = json.loads((folder / "preprocess.json").read_text())
    h, w = pre["image_size"]
    mean, std = np.array(pre["mean"])[:, None, None], np.array(pre["std"])[:, None, None]
    batch = np.stack([(np.asarray(Image.open(p).convert("RGB").resize((w, h)), dtype=np.float32).transpose(2, 0, 1)
                       / 255 - mean) / std for p in images]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": batch})[0]
    return [pre["classes"][i] for i in logits.argmax(-1)]


def test_onnx_export_of_a_member_classifier_labels_as_mmtx_predict_does(run, mixed_root, tmp_path):  # noqa: F811
    pytest.importorskip("onnxruntime")
    from mmtx.predict import main as predict

    out = export([f"ckpt={run['ckpt']}", "format=onnx", "member=image", f"out={tmp_path / 'onnx'}"])
    assert sorted(p.name for p in out.iterdir()) == ["mmtx.json", "model.onnx", "preprocess.json"]
    check = json.loads((out / "preprocess.json").read_text())["onnx_check"]
    assert check["max_abs_delta"] <= 1e-4
    images = sorted((mixed_root / "cifar10" / "test").glob("*/*.png"))
    rows = predict([f"ckpt={run['ckpt']}", "member=image", f"inputs={mixed_root / 'cifar10' / 'test'}", "device=cpu"])
    expected = {row[0]: row[1] for row in rows[1:]}
    assert onnx_labels(out, images) == [expected[str(p)] for p in images]

    with pytest.raises(ConfigError, match="format=onnx exports image and audio classifiers: .* not a classifier"):
        export([f"ckpt={run['ckpt']}", "format=onnx", "member=text", f"out={tmp_path / 'text'}"])
    with pytest.raises(ConfigError, match="pick one of its members with member=NAME"):
        export([f"ckpt={run['ckpt']}", "format=onnx", f"out={tmp_path / 'none'}"])
    assert not (tmp_path / "text").exists() and not (tmp_path / "none").exists()


def test_onnx_export_of_an_audio_classifier_takes_any_length(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from conftest import small_run
    from test_audio import make_tones

    make_tones(tmp_path / "fsdd" / "recordings", per_class=(10, 5))
    args = [*small_run(tmp_path, tmp_path, "audio"), "trainer.max_steps=4", "trainer.max_epochs=-1",
            "test_after_fit=false"]
    summary = train(compose("audio_fsdd", args), run_dir=tmp_path / "run")
    out = export([f"ckpt={summary['last_checkpoint']}", "format=onnx"])
    assert out == Path(summary["run_dir"]) / "export" / "last-onnx"
    from mmtx.batch import AudioBatch
    from mmtx.checkpoints.loader import load_classifier

    model, _ = load_classifier(summary["last_checkpoint"], "cpu")
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["input"] == "audio" and pre["sample_rate"] == 8000 and pre["classes"] == model.task.class_names
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    audio = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)) * 0.1
    lengths = torch.tensor([5000, 3000, 1200])  # lengths and a size the export never saw
    audio[1, 3000:] = 0
    audio[2, 1200:] = 0
    with torch.no_grad():
        want = model.task(model.backbone, AudioBatch(audio, lengths))
    got = session.run(["logits"], {"audio": audio.numpy(), "lengths": lengths.numpy()})[0]
    assert (torch.from_numpy(got) - want).abs().max().item() <= 1e-4
