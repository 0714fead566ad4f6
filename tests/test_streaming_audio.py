"""Audio bigger than memory: `python -m mmtx.prepare data=audio_folder ...` writes clips into shards as their files'
bytes, and `data=streaming_audio` decodes, resamples and crops them in loader workers into the batches the cached
path gives."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch

from conftest import small_run
from mmtx import compose
from mmtx.errors import ConfigError
from mmtx.train import train
from test_audio import make_tones

pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")

FSDD_LIKE = ["data=fsdd", "data.source.sample_rate=8000", "data.source.max_seconds=0.5", "data.val_fraction=0"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A FSDD-like folder of tones (two classes; takes 0-4 the test split), one clip stereo at 16 kHz (mixed down
    and resampled by the workers), one longer than max_seconds (cropped), and its shards."""
    from mmtx.prepare import main

    root = tmp_path_factory.mktemp("audio")
    folder = make_tones(root / "fsdd" / "recordings", per_class=(8, 5))
    wave, _ = sf.read(folder / "0_spk_7.wav", dtype="float32")
    sf.write(folder / "0_spk_7.wav", torch.tensor(wave).repeat_interleave(2)[:, None].repeat(1, 2).numpy(), 16000)
    sf.write(folder / "1_spk_9.wav", torch.zeros(8000).numpy(), 8000)  # 1 s: cropped to 0.5
    meta = main([*FSDD_LIKE, f"data.root={root}", f"out={root / 'shards'}", "num_workers=1"])
    return root, root / "shards", meta


def test_streamed_clips_are_the_cached_clips(clips, tmp_path):
    from mmtx.data.streaming import StreamingAudio
    from mmtx.config.wiring import build_data

    root, shards, meta = clips
    assert meta["modality"] == "audio" and meta["samples"] == {"train": 16, "test": 10}
    assert meta["sample_rate"] == 8000 and meta["max_seconds"] == 0.5 and meta["classes"] == ["0", "1"]
    cached = build_data(compose("audio_fsdd", [*small_run(tmp_path, root, "audio"), *FSDD_LIKE]))
    streamed = StreamingAudio(str(shards), batch_size=8, num_workers=0)  # 16 = 2 full batches: none dropped
    assert streamed.runtime_kwargs() == cached.runtime_kwargs()
    cpu = torch.device("cpu")

    def clips_of(dm, split):
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        found = []
        for raw in loader:
            batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(raw, cpu))
            found += [(int(label), audio[:n].numpy().tobytes())
                      for audio, n, label in zip(batch.audio, batch.lengths.tolist(), batch.label)]
        return sorted(found)

    assert clips_of(streamed, "train") == clips_of(cached, "train")  # the same samples, to the bit (float16)
    assert clips_of(streamed, "val") == clips_of(cached, "val")
    batch = streamed.on_after_batch_transfer(next(iter(streamed.train_dataloader())))
    assert batch.audio.dtype == torch.float32 and batch.audio.shape[1] == batch.lengths.max() <= 4000


def test_clips_too_large_to_hold_are_prepared_in_the_cache_and_streamed(clips, tmp_path, caplog):
    from mmtx.data.audio_sources import decoded_bytes
    from mmtx.data.streaming import StreamingAudio
    from mmtx.config.wiring import build_data

    root, _, _ = clips
    args = [*small_run(tmp_path, root, "audio"), *FSDD_LIKE]
    held = build_data(compose("audio_fsdd", args))
    assert not isinstance(held, StreamingAudio)
    need = decoded_bytes((f for f, _ in held.source._list()["train"]), 8000, 0.5)
    assert need == 2 * int(held.splits["train"]["lengths"].sum())  # from the headers: the cache's float16 bytes
    with caplog.at_level("INFO", logger="mmtx.data.streaming"):
        streamed = build_data(compose("audio_fsdd", [*args, "data.resident_max_gb=0.00001"]))
    assert isinstance(streamed, StreamingAudio) and streamed.num_samples("train") == 16
    assert streamed.runtime_kwargs() == held.runtime_kwargs()
    assert "more than data.resident_max_gb=1e-05: streaming it from shards prepared in" in caplog.text
    assert list((tmp_path / "cache").glob("audio-*-shards/mmtx.json"))


def test_a_streamed_audio_run_trains(clips, tmp_path):
    _, shards, _ = clips
    tiny = [o for o in small_run(tmp_path, None, "audio") if not o.startswith("data.source.")]
    summary = train(compose("audio_fsdd", [*tiny, "data=streaming_audio",
                                           f"data.path={shards}", "data.num_workers=1", "data.batch_size=4",
                                           "trainer.max_steps=3", "test_after_fit=false"]), run_dir=tmp_path / "run")
    assert summary["global_step"] == 3


def test_an_unreadable_clip_is_skipped_or_named(clips, tmp_path, caplog):
    from mmtx.data.streaming import StreamingAudio
    from mmtx.errors import DataError
    from mmtx.prepare import main

    root, _, _ = clips
    broken = tmp_path / "broken"
    make_tones(broken / "fsdd" / "recordings", per_class=(4, 5))
    (broken / "fsdd" / "recordings" / "1_spk_6.wav").write_bytes(b"RIFF not really")
    main([*FSDD_LIKE, f"data.root={broken}", f"out={tmp_path / 'shards'}", "num_workers=1"])
    with caplog.at_level("WARNING"):
        seen = sum(len(b["labels"]) for b in StreamingAudio(str(tmp_path / "shards"), batch_size=2,
                                                             num_workers=0).train_dataloader())
    assert seen == 7 and "skipped an unreadable clip" in caplog.text and "1_spk_6.wav" in caplog.text
    with pytest.raises(DataError, match=r"cannot read audio file .*1_spk_6.wav.*data.on_bad_file=skip"):
        for _ in StreamingAudio(str(tmp_path / "shards"), batch_size=2, num_workers=0,
                                on_bad_file="error").train_dataloader():
            pass
    with pytest.raises(ConfigError, match=r"holds audio data; data=streaming streams image \(data=streaming_audio "
                                          r"streams audio\)"):
        from mmtx.data.streaming import StreamingImages

        StreamingImages(str(tmp_path / "shards")).setup()
