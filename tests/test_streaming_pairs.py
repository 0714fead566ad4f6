"""Translation pairs bigger than memory: `python -m mmtx.prepare data=multi30k ...` tokenizes the pairs once into
shards with their vocabularies, and `data=streaming_pairs` batches them into the pairs the in-memory path gives."""

from __future__ import annotations

import pytest
import torch

from conftest import make_parallel, small_run
from mmtx import compose
from mmtx.train import train

pytest.importorskip("litdata", reason="the streaming extra (pip install 'mmtx[streaming]') is not installed")

TASK = "translate_multi30k_cpu"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from mmtx.prepare import main

    root = tmp_path_factory.mktemp("pairs")
    make_parallel(root / "multi30k")
    args = [f"task={TASK}", f"data.root={root}", "tokenizer.vocab.vocab_size=300", f"paths.cache_dir={root / 'cache'}"]
    meta = main([*args, f"out={root / 'shards'}"])
    return root, root / "shards", meta, args


def tiny(tmp_path, *extra):
    """small_run for a translation task; a streamed run takes its lengths and vocabulary from the folder."""
    keep = [o for o in small_run(tmp_path, None, "text2text") if not o.startswith("data.max_")]
    return [*keep, *extra]


def test_streamed_pairs_are_the_cached_pairs(pairs, tmp_path):
    from mmtx.data.streaming import StreamingPairs
    from mmtx.config.wiring import build_data

    root, shards, meta, _ = pairs
    assert meta["modality"] == "pairs" and meta["samples"] == {"train": 80, "val": 12, "test": 12}
    cached = build_data(compose(TASK, [*tiny(tmp_path), f"data.root={root}", f"paths.cache_dir={root / 'cache'}"]))
    streamed = StreamingPairs(str(shards), batch_size=8, num_workers=0)
    assert streamed.runtime_kwargs()["family"]["vocab"].to_json() == cached.runtime_kwargs()["family"]["vocab"].to_json()
    cpu = torch.device("cpu")

    def seen(dm, split):
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        found = []
        for raw in loader:
            batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(raw, cpu))
            for i in range(len(batch.target.tokens)):
                src = batch.source.tokens[i][batch.source.mask[i]].tolist()
                tgt = batch.target.targets[i][batch.target.targets[i] >= 0].tolist()
                found.append((tuple(src), tuple(tgt), batch.refs[i] if batch.refs else None))
        return sorted(found)

    assert seen(streamed, "train") == seen(cached, "train")  # the same ids: source, and target + EOS
    assert seen(streamed, "val") == seen(cached, "val")  # and the same references
    again = __import__("mmtx.prepare", fromlist=["main"]).main([*pairs[3], f"out={shards}"])
    assert again == meta  # prepared once


def test_a_streamed_translation_run_trains_and_scores_bleu(pairs, tmp_path):
    _, shards, _, _ = pairs
    summary = train(compose(TASK, tiny(tmp_path, "data=streaming_pairs", f"data.path={shards}", "data.num_workers=1",
                                       "trainer.max_steps=4", "trainer.limit_val_batches=1")),
                    run_dir=tmp_path / "run")
    assert summary["global_step"] == 4
    assert "val/bleu" in (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").read_text()
    from mmtx.eval import evaluate

    scores = evaluate(summary["last_checkpoint"], ["trainer.limit_test_batches=1"])  # its vocabularies, the folder's pairs
    assert "test/bleu" in scores


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """FSDD-like tones as words (task asr_fsdd), prepared once into shards."""
    from mmtx.prepare import main
    from test_audio import make_tones

    root = tmp_path_factory.mktemp("speech")
    make_tones(root / "fsdd" / "recordings", per_class=(6, 3))
    args = ["task=asr_fsdd", f"data.root={root}", "data.source.test_pattern='_[0-2]\\.wav$'",
            f"paths.cache_dir={root / 'cache'}"]
    meta = main([*args, f"out={root / 'shards'}"])
    return root, root / "shards", meta, args


def test_streamed_speech_pairs_are_the_cached_pairs(speech, tmp_path):
    """Clips decoded by the workers, transcripts tokenized once: the same audio (float16 as cached), target ids,
    references and held-out validation clips as the in-memory path's."""
    from mmtx.data.streaming import StreamingPairs
    from mmtx.config.wiring import build_data

    root, shards, meta, args = speech
    assert meta["src_kind"] == "audio" and meta["sample_rate"] == 8000
    assert meta["samples"] == {"train": 11, "val": 1, "test": 6}  # 12 training clips, 10% held out
    assert sorted(p.name for p in shards.iterdir()) == ["mmtx.json", "test", "tgt_tokenizer.json", "train", "val"]
    cached = build_data(compose("asr_fsdd", [*small_run(tmp_path, None, "audio2text"), *args[1:]]))
    streamed = StreamingPairs(str(shards), batch_size=4, num_workers=1)
    runtime = streamed.runtime_kwargs()
    assert runtime["tokenizer"] == {"sample_rate": 8000}
    assert runtime["family"]["vocab"].to_json() == cached.runtime_kwargs()["family"]["vocab"].to_json()
    cpu = torch.device("cpu")

    def seen(dm, split):
        loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
        found = []
        for raw in loader:
            batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(raw, cpu))
            for i in range(len(batch.target.tokens)):
                clip = batch.source.audio[i, :batch.source.lengths[i]]
                tgt = batch.target.targets[i][batch.target.targets[i] >= 0].tolist()
                found.append((batch.sources[i] if batch.sources else None, tuple(tgt), clip.numpy().tobytes(),
                              batch.refs[i] if batch.refs else None))
        return sorted(found)

    train = seen(streamed, "train")
    assert len(train) == 8  # drop_last: two whole batches of 4
    split = cached.splits["train"]
    every = cached.gather("train", split, torch.arange(len(split["rows"])), cpu)  # all 11, as one batch
    cached_train = {(tuple(t[t >= 0].tolist()), every.source.audio[i, :n].numpy().tobytes())
                    for i, (t, n) in enumerate(zip(every.target.targets, every.source.lengths))}
    assert {t[1:3] for t in train} <= cached_train  # the same clips (float16 samples) and target ids
    assert seen(streamed, "val") == seen(cached, "val")  # the same held-out clip, its name and reference
    assert seen(streamed, "test") == seen(cached, "test")
    assert __import__("mmtx.prepare", fromlist=["main"]).main([*args, f"out={shards}"]) == meta  # prepared once


def test_speech_too_large_to_hold_is_prepared_in_the_cache_and_streamed(speech, tmp_path, caplog):
    from mmtx.data.streaming import StreamingPairs
    from mmtx.config.wiring import build_data

    root, _, _, args = speech
    with caplog.at_level("INFO", logger="mmtx.data.streaming"):
        streamed = build_data(compose("asr_fsdd", [*small_run(tmp_path, None, "audio2text"), *args[1:-1],
                                                   f"paths.cache_dir={tmp_path / 'cache'}",
                                                   "data.resident_max_gb=0.00001"]))
    assert isinstance(streamed, StreamingPairs) and streamed.num_samples("train") == 11
    assert "more than data.resident_max_gb=1e-05: streaming it from shards prepared in" in caplog.text


def test_a_streamed_speech_run_trains_scores_wer_and_evaluates(speech, tmp_path):
    from mmtx.eval import evaluate

    _, shards, _, _ = speech
    keep = [o for o in small_run(tmp_path, None, "audio2text") if not o.startswith("data.source.")]  # prepared
    summary = train(compose("asr_fsdd", [*keep, "data=streaming_pairs",
                                         f"data.path={shards}", "data.num_workers=1", "data.batch_size=4",
                                         "trainer.max_steps=3", "trainer.limit_val_batches=1"]),
                    run_dir=tmp_path / "run")
    assert summary["global_step"] == 3 and "test/wer" in summary
    assert "val/wer" in (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").read_text()
    assert torch.load(summary["last_checkpoint"], weights_only=False)["mmtx_members"]["main"]["mmtx_sample_rate"] == 8000
    scores = evaluate(summary["last_checkpoint"], ["trainer.limit_test_batches=1"])  # the folder's test clips
    assert "test/cer" in scores


def test_a_manifest_streams_and_its_bad_clips_are_skipped_or_named(tmp_path, caplog):
    """data=speech_manifest: a line whose file is missing is left out when preparing (counted); a file that is not
    audio is kept as bytes, and the loader workers skip it or name it (data.on_bad_file)."""
    import logging

    from mmtx.data.streaming import StreamingPairs
    from mmtx.errors import DataError
    from mmtx.prepare import main
    from test_asr import make_manifest

    manifest = make_manifest(tmp_path, ["clips/a.wav\tone", "clips/gone.wav\ttwo", "clips/b.wav\tthree",
                                        "clips/bad.wav\tfour", "clips/c.wav\tfive"])
    (tmp_path / "clips" / "bad.wav").write_bytes(b"RIFF, but not audio")
    with caplog.at_level(logging.WARNING):
        meta = main(["task=asr_fsdd", "data=speech_manifest", f"data.source.files.train={manifest}",
                     f"data.source.files.test={manifest}", "data.source.sample_rate=8000", "data.val_fraction=0",
                     f"paths.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'shards'}"])
    assert "skipped 1 line(s) whose audio file is missing" in caplog.text
    assert meta["samples"] == {"train": 4, "test": 4} and meta["sample_rate"] == 8000

    skip = StreamingPairs(str(tmp_path / "shards"), batch_size=4, num_workers=0, on_bad_file="skip")
    batches = [skip.on_after_batch_transfer(b) for b in skip.val_dataloader()]  # validation: the test split
    assert sorted(r for b in batches for r in b.refs) == ["five", "one", "three"]  # bad.wav left out of its batch
    assert "bad.wav" in caplog.text
    error = StreamingPairs(str(tmp_path / "shards"), batch_size=4, num_workers=0, on_bad_file="error")
    with pytest.raises(DataError, match=r"bad\.wav.*data\.on_bad_file"):
        list(error.val_dataloader())
