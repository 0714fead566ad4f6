"""Odd inputs (docs/reliability.md): text whose size memory must not follow, images over Pillow's pixel limit,
audio holding NaN, and names with tabs and newlines in the tables mmtx writes."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import REPO, TINY_TEXT, cli, folder_run, make_image_folder, small_run
from mmtx import compose
from mmtx.errors import DataError
from mmtx.files import read_tsv
from mmtx.train import train


# -- 6. memory in proportion to the data ----------------------------------------------------------------------

PEAK = """
import resource, sys
from mmtx.data.text import TextDataModule
from mmtx.data.text_sources import TextFiles
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dm = TextDataModule(TextFiles(sys.argv[1]), cache_dir=sys.argv[2], vocab={"kind": "char"}, block_size=8,
                    device_resident=False)
dm.prepare_data()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_tokenizing_a_long_one_line_text_takes_memory_in_proportion_to_it(tmp_path):
    words = TINY_TEXT.split()
    line = " ".join(words[i % len(words)] for i in range(600_000))[:3_000_000]  # 3 MB, no newline
    (tmp_path / "line.txt").write_text(line)
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "line.txt"), str(tmp_path / "cache")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = int(out.stdout.split()[-1])
    assert grown < 150e6, f"tokenizing 3 MB of text grew the process by {grown / 1e6:.0f} MB"  # 1.87 GB before


def test_encoding_in_pieces_gives_the_ids_of_encoding_the_whole_text(tmp_path):
    from mmtx.data.text import encoding_pieces
    from mmtx.tokenizers.text import build_vocab

    text = TINY_TEXT * 40 + " ".join(TINY_TEXT.split()) * 10  # lines, then one long line
    vocab = build_vocab("bpe", text, vocab_size=300, special_tokens=["<|endoftext|>"])
    pieces = list(encoding_pieces([text[i:i + 7000] for i in range(0, len(text), 7000)], size=4096))
    assert len(pieces) > 5 and "".join(pieces) == text
    assert np.concatenate([vocab.encode_array(p) for p in pieces]).tolist() == vocab.encode(text)
    run = "x" * 50_000  # no place to cut: cut anyway (the ids differ near the cut), the text still whole
    assert vocab.decode(np.concatenate([vocab.encode_array(p) for p in encoding_pieces([run], size=4096)])) == run
    chars = build_vocab("char", text)
    assert chars.encode_array(text).tolist() == chars.encode(text)
    with pytest.raises(Exception, match=r"never saw in training: \['é'\]"):
        chars.encode_array("héllo")


def test_a_corpus_too_large_for_memory_is_memory_mapped_naming_its_size(tmp_path, monkeypatch, caplog):
    from mmtx.data.text import TextDataModule
    from mmtx.data.text_sources import TextFiles

    (tmp_path / "corpus.txt").write_text(TINY_TEXT * 10)
    monkeypatch.setattr("mmtx.data.memory.available_memory", lambda: 100_000)
    dm = TextDataModule(TextFiles(str(tmp_path / "corpus.txt")), cache_dir=str(tmp_path / "cache"),
                        vocab={"kind": "char"}, block_size=8)
    tokens = len(TINY_TEXT * 10)  # both splits
    with caplog.at_level("INFO"):
        dm.setup()
    assert f"the {tokens:,} tokens of" in caplog.text
    assert (f"take {tokens * 8 / 1000:.1f} kB held in memory as int64, more than 80% of the 100.0 kB of memory "
            "available (data.resident_max_gb=null): reading their windows from the memory-mapped token files") in caplog.text
    assert not dm.device_resident and len(dm.splits["train"]["ids"]) == int(tokens * 0.9)


def test_image_and_audio_splits_too_large_for_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    from mmtx.data.audio_sources import AudioFolder
    from mmtx.data.image_sources import ImageFolder

    images = ImageFolder(make_image_folder(tmp_path / "images"))
    clips = AudioFolder(str(tone_folder(tmp_path / "tones")), sample_rate=8000)
    monkeypatch.setattr("mmtx.data.memory.available_memory", lambda: 10_000)
    monkeypatch.setattr("mmtx.data.image_sources.decode_images", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(DataError, match=r"images/train \(36 images of 16x16, decoded and stacked\) takes 55.3 kB of "
                                        r"memory, more than this machine can spare \(10.0 kB available\); set "
                                        r"data.source.image_size"):
        images.decode("train")
    with pytest.raises(DataError, match=r"tones \[train\] \(12 clips, 0.0 hours at 8000 Hz, decoded\) takes 576.0 kB "
                                        r"of memory, .* lower data.source.max_seconds or data.source.sample_rate"):
        clips.decode("train")


# -- 8. unreadable files are skipped and counted everywhere ----------------------------------------------------

def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A small PNG file whose header declares width x height pixels (over Pillow's decompression-bomb limit)."""
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_an_image_over_the_pixel_limit_is_skipped_in_training_and_predict(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "images")
    bomb = bomb_png(folder / "train" / "cat" / "huge.png")
    summary = train(compose("vit_cifar", [*folder_run(tmp_path, folder), "trainer.max_steps=1",
                                          "trainer.limit_val_batches=1", "test_after_fit=false"]),
                    run_dir=tmp_path / "run")
    assert summary["status"] == "finished"
    assert re.search(rf"skipped 1 unreadable file\(s\) in .*train, e.g. {re.escape(str(bomb))} \(.*exceeds limit of "
                     r"178956970 pixels.*over twice PIL.Image.MAX_IMAGE_PIXELS = 89,478,485 pixels", caplog.text), \
        caplog.text[-3000:]
    from mmtx.predict import main as predict

    rows = predict([f"ckpt={summary['last_checkpoint']}", f"inputs={folder / 'train' / 'cat'}", "device=cpu"])
    assert str(bomb) not in [r[0] for r in rows] and len(rows) == 1 + 12
    assert f"skipping {bomb}: not a readable image" in caplog.text


# -- 9. non-finite inputs are named, not averaged in --------------------------------------------------------------

def tone_folder(root: Path) -> Path:
    """Two classes of one-second 8 kHz tones (low, high), six clips each, as WAV files."""
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 8000
    for label, freq in (("low", 220.0), ("high", 1760.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            wave = 0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) + rng.normal(0, 0.01, t.size)
            sf.write(root / label / f"{i}.wav", wave.astype(np.float32), 8000, subtype="FLOAT")
    return root


def test_audio_holding_nan_is_a_bad_file_in_training_predict_and_generate(tmp_path, caplog):
    from mmtx.data.audio_sources import AudioDecoder
    from mmtx.predict import main as predict

    folder = tone_folder(tmp_path / "tones")
    wave = np.full(8000, 0.1, dtype=np.float32)
    wave[100:110] = np.nan
    nan_file = folder / "low" / "nan.wav"
    sf.write(nan_file, wave, 8000, subtype="FLOAT")
    summary = train(compose("audio_fsdd", [*small_run(tmp_path, modality="audio"), "data=audio_folder",
                                           f"data.source.path={folder}", "data.source.sample_rate=8000",
                                           "data.val_fraction=0.25", "data.batch_size=4", "trainer.max_steps=2",
                                           "trainer.limit_val_batches=1", "test_after_fit=false"]),
                    run_dir=tmp_path / "run")
    assert summary["status"] == "finished"
    assert re.search(r"skipped 1 unreadable or empty file\(s\), e.g. .*nan.wav \(it holds 10 non-finite samples "
                     r"\(NaN or infinity\)\)", caplog.text), caplog.text[-3000:]
    assert "non-finite step" not in caplog.text and "skipped_steps" not in caplog.text
    rows = predict([f"ckpt={summary['last_checkpoint']}", f"inputs={folder / 'low'}", "device=cpu"])
    assert len(rows) == 1 + 6 and str(nan_file) not in [r[0] for r in rows]
    assert all(np.isfinite(float(r[2])) for r in rows[1:])
    assert f"skipping {nan_file}: not a readable audio file (it holds 10 non-finite samples" in caplog.text
    with pytest.raises(DataError, match=rf"cannot read audio file {re.escape(str(nan_file))}: it holds 10 non-finite"):
        AudioDecoder(8000, on_bad_file="error").decode(nan_file, str(nan_file))  # what mmtx.generate reads audio with


# -- 12. tables stay tables -----------------------------------------------------------------------------------

def test_names_with_a_tab_a_newline_and_non_ascii_stay_one_field_of_the_tsv(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("cat\tdog", "ship\nboat", "öäü"))
    summary = train(compose("vit_cifar", [*folder_run(tmp_path, folder), "trainer.max_steps=1",
                                          "trainer.limit_val_batches=1", "test_after_fit=false"]),
                    run_dir=tmp_path / "run")
    odd = tmp_path / "inputs"
    odd.mkdir()
    names = ["a\tb.png", "c\nd.png", "é \"quoted\" ü.png"]
    for name in names:
        Image.new("RGB", (16, 16), (90, 90, 90)).save(odd / name)
    out = tmp_path / "labels.tsv"
    proc = cli("mmtx.predict", f"ckpt={summary['last_checkpoint']}", f"inputs={odd}", f"output={out}", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *rows = read_tsv(out)
    assert header == ["path", "label", "probability", "top_3"] and all(len(r) == 4 for r in rows)
    assert sorted(r[0] for r in rows) == sorted(str(odd / n) for n in names)
    assert {r[1] for r in rows} <= {"cat\tdog", "ship\nboat", "öäü"}
    confusion = read_tsv(tmp_path / "run" / "val_confusion.tsv")
    assert confusion[0] == ["true \\ predicted", "cat\tdog", "ship\nboat", "öäü"] and all(len(r) == 4 for r in confusion)
