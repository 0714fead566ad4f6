"""Speech to text: manifests and their bad inputs, FSDD digits as words, the asr_fsdd task end to end."""

import logging
import math

import pytest
import soundfile as sf
import torch

from conftest import fsdd_slice, small_run
from mmtx import compose
from mmtx.batch import IGNORE_INDEX
from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.seq2seq_sources import DIGIT_WORDS, AudioTranscripts, SpeechManifest
from mmtx.generate import main as generate
from mmtx.train import train
from test_audio import RATE, make_tones, tone

CHAR = {"kind": "char"}


def make_manifest(folder, lines):
    """Three clips and a manifest `train.tsv` with `lines` (format strings of {a}, {b}, {c})."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for name, freq in (("a", 440.0), ("b", 880.0), ("c", 1200.0)):
        sf.write(folder / "clips" / f"{name}.wav", tone(freq, 0.3), RATE)
    (folder / "train.tsv").write_text("".join(line + "\n" for line in lines))
    return folder / "train.tsv"


def test_manifest_reads_clips_and_transcripts(tmp_path):
    manifest = make_manifest(tmp_path, ["clips/a.wav\thello there", "", f"{tmp_path}/clips/b.wav\tgood bye"])
    data = SpeechManifest({"train": str(manifest)}, sample_rate=RATE).decode("train")
    assert data["tgt"] == ["hello there", "good bye"]
    assert data["src"]["lengths"].tolist() == [int(0.3 * RATE)] * 2
    assert [n.endswith(("a.wav", "b.wav")) for n in data["names"]] == [True, True]


def test_missing_audio_is_skipped_and_counted_or_named(tmp_path, caplog):
    manifest = make_manifest(tmp_path, ["clips/a.wav\tone", "clips/gone.wav\ttwo", "clips/c.wav\t"])
    with caplog.at_level(logging.WARNING):
        data = SpeechManifest({"train": str(manifest)}, sample_rate=RATE).decode("train")
    assert data["tgt"] == ["one"]
    assert "skipped 1 line(s) whose audio file is missing" in caplog.text and "gone.wav (train.tsv:2)" in caplog.text
    assert "skipped 1 line(s) with an empty transcript" in caplog.text
    strict = SpeechManifest({"train": str(manifest)}, sample_rate=RATE, on_bad_file="error")
    with pytest.raises(FileNotFoundError, match=r"train\.tsv:2: audio file .*gone\.wav does not exist"):
        strict.decode("train")


def test_manifest_format_errors(tmp_path):
    manifest = make_manifest(tmp_path, ["clips/a.wav hello"])
    with pytest.raises(ValueError, match=r"train\.tsv:1 is not audio_path<TAB>transcript"):
        SpeechManifest({"train": str(manifest)}, sample_rate=RATE).decode("train")
    with pytest.raises(FileNotFoundError, match=r"data\.source\.files\.train: no file at"):
        SpeechManifest({"train": "nowhere.tsv"}, root=str(tmp_path))


def test_fsdd_labels_become_words_and_batches_carry_audio(tmp_path):
    make_tones(tmp_path / "rec", per_class=(6, 2))
    source = AudioTranscripts(DIGIT_WORDS, path=str(tmp_path / "rec"), sample_rate=RATE,
                              label_pattern=r"^(?P<label>\d+)_", test_pattern=r"_[0-1]\.wav$")
    assert sorted(set(source.decode("test")["tgt"])) == ["one", "zero"]
    dm = Seq2SeqDataModule(source, cache_dir=str(tmp_path / "cache"), tgt_vocab=CHAR, val_fraction=0.25,
                           batch_size=4, eval_batch_size=8)
    dm.setup()
    assert dm.src_vocab is None and set(dm.tgt_vocab.encode("onezero")) <= set(range(len(dm.tgt_vocab)))
    assert {k: len(v["tgt_lengths"]) for k, v in dm.splits.items()} == {"train": 9, "val": 3, "test": 4}
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    lengths, targets = batch.source.lengths, batch.target.targets
    assert batch.source.audio.shape[0] == 3 and lengths.tolist() == sorted(lengths.tolist(), reverse=True)
    for i, ref in enumerate(batch.refs):
        n = int((targets[i] != IGNORE_INDEX).sum())
        assert dm.tgt_vocab.decode(targets[i, :n - 1].tolist()) == ref
        assert batch.sources[i].endswith(".wav")
    assert dm.runtime_kwargs()["tokenizer"] == {"sample_rate": RATE}


@pytest.mark.slow  # learns to a threshold
def test_asr_task_learns_tones_and_transcribes_files(tmp_path):
    folder = make_tones(tmp_path / "fsdd" / "recordings", per_class=(10, 3))
    cfg = compose("asr_fsdd", [*small_run(tmp_path, tmp_path, "audio2text"), "trainer.max_epochs=12",
                               "optim.lr=3e-3", "data.source.test_pattern='_[0-2]\\.wav$'", "family.log_examples=2"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["monitor"] == "val/wer" and summary["test/wer"] <= 0.34 and summary["test/cer"] < 0.5, summary
    rows = (tmp_path / "run" / "test_examples.tsv").read_text().splitlines()
    assert len(rows) == 1 + 6 and {r.split("\t")[2] for r in rows[1:]} == {"zero", "one"}

    clips = sorted(str(p) for p in folder.glob("*_spk_[0-2].wav"))
    outs = generate([f"ckpt={summary['last_checkpoint']}", f"audio={folder}/*_spk_[0-2].wav"])
    assert len(outs) == len(clips) == 6
    one = generate([f"ckpt={summary['last_checkpoint']}", f"audio={clips[0]}", "beam_size=2"])
    assert len(one) == 1
    with pytest.raises(ValueError, match="reads audio, but text= was given"):
        generate([f"ckpt={summary['last_checkpoint']}", "text=hello"])
    with pytest.raises(FileNotFoundError, match="no audio file at"):
        generate([f"ckpt={summary['last_checkpoint']}", f"audio={tmp_path}/none.wav"])


def test_shared_fsdd_slice_as_words(tmp_path):
    fsdd_slice(tmp_path, takes=(0, 5, 6, 7))
    cfg = compose("asr_fsdd", [*small_run(tmp_path, tmp_path, "audio2text"), "trainer.max_epochs=1"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert math.isfinite(summary["test/loss"]) and 0.0 <= summary["test/cer"]
    refs = {r.split("\t")[2] for r in (tmp_path / "run" / "test_examples.tsv").read_text().splitlines()[1:]}
    assert refs == set(DIGIT_WORDS.values())
    assert torch.load(summary["last_checkpoint"], weights_only=False)["mmtx_members"]["main"]["mmtx_sample_rate"] == 8000
