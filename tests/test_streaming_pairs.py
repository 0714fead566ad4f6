"""Translation pairs bigger than memory: `python -m mmtx.prepare data=multi30k ...` tokenizes the pairs once into
shards with their vocabularies, and `data=streaming_pairs` batches them into the pairs the in-memory path gives."""

from __future__ import annotations

import pytest
import torch

from conftest import make_parallel, small_run
from mmtx import compose
from mmtx.errors import ConfigError
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
    from mmtx.wiring import build_data

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


def test_speech_pairs_are_not_prepared_yet(tmp_path):
    from mmtx.prepare import main
    from test_audio import make_tones

    make_tones(tmp_path / "fsdd" / "recordings", per_class=(4, 5))

    with pytest.raises(ConfigError, match="speech-to-text pairs cannot be prepared for streaming yet"):
        main(["task=asr_fsdd", f"data.root={tmp_path}", f"out={tmp_path / 'x'}"])
