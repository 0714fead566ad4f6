"""mmtx.predict: images and audio clips labelled by a trained classifier, bad files named and skipped."""

import logging

import pytest

from conftest import cli, folder_run, make_image_folder, small_run
from mmtx import compose
from mmtx.errors import CheckpointError
from mmtx.predict import main as predict
from mmtx.train import train
from test_audio import make_tones


def test_predict_labels_images_and_skips_a_bad_file(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "images")
    summary = train(compose("vit_cifar", [*folder_run(tmp_path, folder), "trainer.max_steps=30", "optim.lr=3e-3",
                                          "test_after_fit=false"]), run_dir=tmp_path / "run")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("cat", "ship"):
        (inputs / f"{name}.png").write_bytes((folder / "test" / name / "000.png").read_bytes())
    (inputs / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="mmtx.predict"):
        rows = predict([f"ckpt={summary['last_checkpoint']}", f"inputs={inputs}", "top_k=2", "batch_size=2"])
    assert rows[0] == ["path", "label", "probability", "top_2"]
    labelled = {row[0].rsplit("/", 1)[-1]: row for row in rows[1:]}
    assert set(labelled) == {"cat.png", "ship.png"}  # the broken file is skipped ...
    assert "broken.jpg" in caplog.text  # ... and named
    for name, (_, label, prob, top) in labelled.items():
        assert label == name.split(".")[0]  # a learnable folder: each class has its own colour
        first, second = top.split(",")
        assert first == f"{label}:{prob}" and float(prob) >= float(second.split(":")[1])
    with pytest.raises(FileNotFoundError, match="nothing to label"):
        predict([f"ckpt={summary['last_checkpoint']}", f"inputs={tmp_path}/none/*.png"])
    out = tmp_path / "labels.tsv"
    predict([f"ckpt={summary['last_checkpoint']}", f"inputs={inputs}/*.png", f"output={out}"])
    assert len(out.read_text().splitlines()) == 3


def test_predict_labels_audio_clips(tmp_path):
    make_tones(tmp_path / "fsdd" / "recordings", per_class=(10, 3))
    summary = train(compose("audio_fsdd", [*small_run(tmp_path, tmp_path, "audio"), "trainer.max_epochs=6",
                                           "optim.lr=3e-3", "test_after_fit=false"]), run_dir=tmp_path / "run")
    clips = tmp_path / "fsdd" / "recordings"
    (clips / "9_bad_0.wav").write_bytes(b"RIFF....WAVE")
    rows = predict([f"ckpt={summary['last_checkpoint']}", f"inputs={clips}/*_spk_0.wav,{clips}/9_bad_0.wav"])
    assert [row[0].rsplit("/", 1)[-1] for row in rows[1:]] == ["0_spk_0.wav", "1_spk_0.wav"]
    assert [row[1] for row in rows[1:]] == ["0", "1"]


def test_predict_refuses_what_it_cannot_label(tmp_path):
    from conftest import TINY_TEXT

    corpus = tmp_path / "input.txt"
    corpus.write_text(TINY_TEXT)
    summary = train(compose("gpt_shakespeare", [*small_run(tmp_path, modality="text"), "data=text_files",
                                                f"data.source.files={corpus}", "trainer.max_steps=1",
                                                "test_after_fit=false"]), run_dir=tmp_path / "run")
    with pytest.raises(CheckpointError, match="not a classifier"):
        predict([f"ckpt={summary['last_checkpoint']}", f"inputs={corpus}"])
    proc = cli("mmtx.predict", f"ckpt={summary['last_checkpoint']}", f"inputs={corpus}")
    assert proc.returncode == 1 and "mmtx.predict: error:" in proc.stderr and "Traceback" not in proc.stderr
