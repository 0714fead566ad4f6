"""Audio: decoding and its bad inputs, the mel frontend, padding invariance, the FSDD task."""

import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from conftest import fsdd_slice, small_run
from mmtx import compose
from mmtx.backbone import Backbone
from mmtx.data import AudioDataModule
from mmtx.data.audio_sources import AudioDecoder, AudioFolder
from mmtx.tasks.classification import ClassifierHead
from mmtx.tokenizers.audio import MelTokenizer, log_mel_normalise
from mmtx.train import train
from mmtx.batch import AudioBatch

RATE = 8000


def tone(freq: float, seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def make_tones(root, per_class=(8, 3), rate=RATE):
    """A FSDD-like folder: {label}_{speaker}_{take}.wav, two pitches; takes 0..k-1 are the test set."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_test, n_train = per_class[1], per_class[0]
    for label, freq in (("0", 440.0), ("1", 1500.0)):
        for take in range(n_test + n_train):
            seconds = rng.uniform(0.25, 0.6)
            sf.write(root / f"{label}_spk_{take}.wav", tone(freq * rng.uniform(0.95, 1.05), seconds, rate), rate)
    return root


def fsdd_like(path, **kw):
    return AudioFolder(str(path), sample_rate=RATE, label_pattern=r"^(?P<label>\d+)_",
                       test_pattern=rf"_[0-{2}]\.wav$", **kw)


def test_mel_frontend_matches_torchaudio_on_a_sine():
    tok = MelTokenizer(dim=16, sample_rate=RATE, spec_augment=None).eval()
    wave = torch.from_numpy(tone(1000.0, 0.5))[None]  # (1, 4000)
    frames, mask = tok.frames(wave, torch.tensor([4000]))
    reference = torchaudio.transforms.MelSpectrogram(RATE, n_fft=200, hop_length=80, n_mels=40, center=False)(wave)
    assert frames.shape == (1, (4000 - 200) // 80 + 1, 40) and mask.all()
    torch.testing.assert_close(frames, log_mel_normalise(reference).transpose(1, 2))
    # the energy sits in the band holding 1 kHz
    mel_freqs = torchaudio.functional.melscale_fbanks(101, 0.0, RATE / 2, 40, RATE).argmax(0) * (RATE / 2) / 100
    assert abs(float(mel_freqs[frames[0].mean(0).argmax()]) - 1000.0) < 120


def test_scaled_defaults():
    assert MelTokenizer(16, sample_rate=16000).n_mels == 80
    tok = MelTokenizer(16, sample_rate=8000)
    assert (tok.n_mels, tok.n_fft, tok.hop) == (40, 200, 80)


@pytest.mark.parametrize("stem,stack", [("stack", 1), ("stack", 3), ("conv", 1)])
def test_padding_invariance(stem, stack):
    torch.manual_seed(0)
    tok = MelTokenizer(32, sample_rate=RATE, stem=stem, stack=stack, spec_augment=None)
    backbone, head = Backbone(32, 2, 4), ClassifierHead(32, 5, pool="mean")
    torch.nn.ModuleList([tok, backbone, head]).eval()

    def logits(audio, lengths):
        tokens = tok(AudioBatch(audio, lengths))
        return head(backbone(tokens), tokens.mask)

    short, long = torch.randn(1, 2345), torch.randn(1, 5000)
    batch = torch.zeros(2, 5000)
    batch[0, :2345], batch[1] = short[0], long[0]
    together = logits(batch, torch.tensor([2345, 5000]))
    torch.testing.assert_close(together[0], logits(short, torch.tensor([2345]))[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1], logits(long, torch.tensor([5000]))[0], atol=1e-5, rtol=1e-4)


def test_spec_augment_only_in_training():
    tok = MelTokenizer(16, sample_rate=RATE, spec_augment={"freq_mask": 10, "time_mask": 10, "num_masks": 2})
    audio = torch.randn(4, 4000)
    tok.eval()
    torch.testing.assert_close(tok.frames(audio, None)[0], tok.frames(audio, None)[0])
    tok.train()
    torch.manual_seed(0)
    assert not torch.allclose(tok.frames(audio, None)[0], tok.eval().frames(audio, None)[0])


def test_decoder_resamples_mixes_down_and_crops(tmp_path, caplog):
    sf.write(tmp_path / "hi.wav", tone(440, 0.5, rate=16000, channels=2), 16000)
    decoder = AudioDecoder(RATE, max_seconds=0.3)
    wave = decoder.decode(tmp_path / "hi.wav", "hi.wav")
    assert wave.shape == (int(0.3 * RATE),)  # resampled to 8 kHz, then cropped to 0.3 s
    expected = torchaudio.functional.resample(torch.from_numpy(tone(440, 0.5, rate=16000)), 16000, RATE)
    torch.testing.assert_close(wave, expected[: wave.numel()], atol=1e-4, rtol=0)  # 16-bit PCM on disk
    with caplog.at_level(logging.INFO):
        decoder.report("here")
    assert "resampled 1 clip(s) from 16000 Hz" in caplog.text and "mixed 1 multi-channel" in caplog.text
    assert "cropped 1 clip(s)" in caplog.text


def test_bad_audio_files_are_skipped_and_counted(tmp_path, caplog):
    folder = make_tones(tmp_path / "clips", per_class=(3, 3))
    (folder / "0_spk_90.wav").write_bytes(b"")  # empty
    good = (folder / "0_spk_3.wav").read_bytes()
    (folder / "1_spk_91.wav").write_bytes(good[:30])  # truncated header
    (folder / "1_spk_92.wav").write_bytes(b"RIFF....WAVEfmt garbage garbage")
    sf.write(folder / "0_spk_93.wav", np.zeros(0, np.float32), RATE)  # a valid file of zero samples
    with caplog.at_level(logging.WARNING):
        dm = AudioDataModule(fsdd_like(folder), cache_dir=str(tmp_path / "cache"))
        dm.setup()
    assert len(dm.splits["train"]["labels"]) == 6  # the four bad files are gone
    assert "skipped 4 unreadable or empty file(s)" in caplog.text
    with pytest.raises(ValueError, match=r"cannot read audio file .*0_spk_90\.wav"):
        fsdd_like(folder, on_bad_file="error").decode("train")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio folder .* does not exist"):
        AudioFolder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no audio files"):
        AudioFolder(str(tmp_path / "empty")).splits()
    sf.write(tmp_path / "empty" / "x.wav", tone(440, 0.1), RATE)
    with pytest.raises(ValueError, match="not in a class sub-folder"):
        AudioFolder(str(tmp_path / "empty")).splits()
    with pytest.raises(ValueError, match="does not match data.source.label_pattern"):
        AudioFolder(str(tmp_path / "empty"), label_pattern=r"^(?P<label>\d)_").splits()


def test_class_subfolders_and_batches(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for name, freq in (("high", 2000.0), ("low", 300.0)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                sf.write(tmp_path / split / name / f"{i}.flac", tone(freq, 0.2 + 0.1 * i), RATE)
    dm = AudioDataModule(AudioFolder(str(tmp_path), sample_rate=RATE), cache_dir=str(tmp_path / "cache"),
                         batch_size=4)
    dm.setup()
    assert dm.classes == ["high", "low"] and len(dm.splits["test"]["labels"]) == 4
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    lengths = batch.lengths
    assert batch.audio.shape == (4, int(lengths.max()))
    for i, n in enumerate(lengths.tolist()):
        assert batch.audio[i, n:].abs().sum() == 0  # zero padding past each clip
        assert batch.audio[i, :n].abs().sum() > 0


@pytest.mark.slow  # learns to a threshold
def test_audio_task_learns_synthetic_tones(tmp_path):
    make_tones(tmp_path / "fsdd" / "recordings", per_class=(10, 3))
    cfg = compose("audio_fsdd", [*small_run(tmp_path, tmp_path, "audio"), "trainer.max_epochs=8",
                                 "optim.lr=3e-3", "data.source.test_pattern='_[0-2]\\.wav$'"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["test/acc"] >= 0.8
    table = (tmp_path / "run" / "test_confusion.tsv").read_text().splitlines()
    assert table[0].split("\t")[1:] == ["0", "1"] and sum(int(v) for r in table[1:] for v in r.split("\t")[1:]) == 6


def test_shared_fsdd_slice(tmp_path):
    fsdd_slice(tmp_path, takes=(0, 1, 5, 6, 7))
    cfg = compose("audio_fsdd", [*small_run(tmp_path, tmp_path, "audio"), "trainer.max_epochs=1"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["global_step"] == 30 // 8  # 30 training clips, batches of 8
    assert math.isfinite(summary["test/loss"])


def test_length_grouped_batches():
    from mmtx.data.base import EpochShuffle

    lengths = torch.randint(100, 10000, (1000,))
    sampler = EpochShuffle(1000, seed=0, lengths=lengths, batch_size=16)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every sample once
    batches = [torch.tensor(order[i:i + 16]) for i in range(0, 992, 16)]
    spread = torch.stack([lengths[b].max() - lengths[b].min() for b in batches]).float().mean()
    random_spread = torch.stack([lengths[b].max() - lengths[b].min()
                                 for b in torch.randperm(1000)[:992].split(16)]).float().mean()
    assert spread < 0.5 * random_spread  # much less padding than random batches
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(1000))
