"""Text bigger than memory: `python -m mmtx.prepare` tokenizes text files once into token files (uint16/uint32),
and `data=streaming_text` trains from their memory map with the windows, order and exact resume of the cached path;
text whose ids would not fit `data.resident_max_gb` is memory-mapped on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_TEXT, small_run
from mmtx import compose
from mmtx.checkpoints.io import load_checkpoint
from mmtx.errors import ConfigError, DataError, MissingError
from mmtx.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files (read in sorted order, a newline between them) and the folder prepared from them."""
    from mmtx.prepare import main

    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text(TINY_TEXT)
    (root / "b.txt").write_text(TINY_TEXT.upper())
    meta = main(["task=gpt_shakespeare_cpu", "data=text_files", f"data.source.files={root}/*.txt",
                 f"paths.cache_dir={root / 'cache'}", f"out={root / 'tokens'}"])
    return root, root / "tokens", meta


def text_run(tmp_path, root, *extra):
    return [*small_run(tmp_path, modality="text"), "data=text_files", f"data.source.files={root}/*.txt", *extra]


def stream_run(tmp_path, tokens, *extra):
    return [*small_run(tmp_path, modality="text"), "data=streaming_text", f"data.path={tokens}", *extra]


def test_prepare_writes_token_files_once(corpus, caplog):
    from mmtx.prepare import main

    root, tokens, meta = corpus
    chars = 2 * len(TINY_TEXT) + 1
    assert meta["modality"] == "text" and meta["dtype"] == "uint16"
    assert sum(meta["tokens"].values()) == chars  # a character vocabulary: a token a character
    assert json.loads((tokens / "mmtx.json").read_text()) == meta
    train_ids = np.fromfile(tokens / "train.bin", dtype=np.uint16)
    assert train_ids.size == meta["tokens"]["train"] and {"tokenizer.json", "checksums.json"} <= set(os.listdir(tokens))
    before = {p.name: p.stat().st_mtime_ns for p in tokens.iterdir()}
    with caplog.at_level("INFO"):
        again = main(["task=gpt_shakespeare_cpu", "data=text_files", f"data.source.files={root}/*.txt",
                      f"paths.cache_dir={root / 'cache'}", f"out={tokens}"])
    assert again == meta and "already prepared" in caplog.text
    assert before == {p.name: p.stat().st_mtime_ns for p in tokens.iterdir()}  # nothing rewritten


def test_the_streamed_windows_are_the_cached_windows(corpus, tmp_path):
    """The same token ids, and under the same seed the same batches in the same order, from the prepared folder's
    memory map as from the cache the training run builds itself."""
    from mmtx.config.wiring import build_data

    root, tokens, _ = corpus
    cached = build_data(compose("gpt_shakespeare_cpu", text_run(tmp_path, root)))
    streamed = build_data(compose("gpt_shakespeare_cpu", stream_run(tmp_path, tokens)))
    assert not streamed.device_resident and isinstance(streamed.splits["train"]["ids"], np.memmap)
    assert cached.vocab.to_json() == streamed.vocab.to_json()
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(streamed.splits[split]["ids"]), cached.splits[split]["ids"].numpy())
    device = torch.device("cpu")
    for a, b in zip(cached.train_dataloader(), streamed.train_dataloader()):
        torch.manual_seed(0)
        x = cached.on_after_batch_transfer(cached.transfer_batch_to_device(a, device))
        torch.manual_seed(0)
        y = streamed.on_after_batch_transfer(streamed.transfer_batch_to_device(b, device))
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)


def test_a_streamed_text_run_resumes_mid_epoch_exactly(corpus, tmp_path):
    """4 + 4 steps resumed equals 8 steps straight through, the cut inside an epoch."""
    _, tokens, _ = corpus
    base = [*stream_run(tmp_path, tokens), "test_after_fit=false", "trainer.limit_val_batches=0",
            "trainer.max_steps=8", "trainer.deterministic=true", "callbacks.last_checkpoint.every_n_steps=4",
            "tokenizer.dropout=0", "backbone.dropout=0"]
    straight = train(compose("gpt_shakespeare_cpu", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=4"]
    cut = train(compose("gpt_shakespeare_cpu", [*base, *stop]), run_dir=tmp_path / "cut")
    assert cut["global_step"] == 4
    resumed = train(compose("gpt_shakespeare_cpu", [*base, f"resume={cut['last_checkpoint']}"]),
                    run_dir=tmp_path / "resumed")
    a, b = load_checkpoint(straight["last_checkpoint"]), load_checkpoint(resumed["last_checkpoint"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_text_too_large_to_hold_is_memory_mapped(corpus, tmp_path, caplog):
    from mmtx.config.wiring import build_data

    root, _, _ = corpus
    with caplog.at_level("INFO"):
        data = build_data(compose("gpt_shakespeare_cpu", text_run(tmp_path, root, "data.resident_max_gb=1e-6")))
    assert not data.device_resident and isinstance(data.splits["train"]["ids"], np.memmap)
    assert "more than data.resident_max_gb=1e-06: reading their windows from the memory-mapped token files" in caplog.text
    held = build_data(compose("gpt_shakespeare_cpu", text_run(tmp_path, root)))
    assert held.device_resident and held.splits["train"]["ids"].dtype == torch.int64
    with pytest.raises(ConfigError, match="data.resident_max_gb=-1 must be a positive number of GB"):
        build_data(compose("gpt_shakespeare_cpu", text_run(tmp_path, root, "data.resident_max_gb=-1")))


def test_a_damaged_or_missing_folder_is_named(corpus, tmp_path):
    import shutil

    from mmtx.data.token_files import StreamingText

    _, tokens, _ = corpus
    with pytest.raises(MissingError, match=r"is not prepared text \(no mmtx.json\): prepare it once with python -m "
                                           r"mmtx.prepare data=text_files"):
        StreamingText(str(tmp_path)).setup()
    damaged = tmp_path / "damaged"
    shutil.copytree(tokens, damaged)
    with open(damaged / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"damaged: train.bin holds 100 bytes where \d+ were written; prepare it again"):
        StreamingText(str(damaged)).setup()
    (damaged / "mmtx.json").write_text(json.dumps({"modality": "image"}))
    with pytest.raises(ConfigError, match="holds image data; data=streaming_text streams text"):
        StreamingText(str(damaged)).setup()
    with pytest.raises(ConfigError, match="memory-mapped from a disk"):
        StreamingText("s3://bucket/owt")
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.2, but .* was prepared with val_fraction=0.1: prepare "
                                          r"it again with data.val_fraction=0.2"):
        StreamingText(str(tokens), val_fraction=0.2).setup()
    same = StreamingText(str(tokens), val_fraction=0.1, block_size=16)
    same.setup()
    assert same.num_samples("train") > 0


def test_prepare_rebuilds_a_damaged_folder_and_refuses_another_texts(corpus, tmp_path):
    import shutil

    from mmtx.prepare import main

    root, tokens, meta = corpus
    copy = tmp_path / "tokens"
    shutil.copytree(tokens, copy)
    (copy / "val.bin").write_bytes(b"\0\0")
    args = ["task=gpt_shakespeare_cpu", "data=text_files", f"data.source.files={root}/*.txt",
            f"paths.cache_dir={root / 'cache'}", f"out={copy}"]
    assert main(args) == meta and (copy / "val.bin").stat().st_size == 2 * meta["tokens"]["val"]
    with pytest.raises(DataError, match="holds text prepared from other files or settings"):
        main([*args[:2], f"data.source.files={root}/a.txt", *args[3:]])
    with pytest.raises(ConfigError, match="reads text already prepared"):
        main(["task=gpt_shakespeare_cpu", "data=streaming_text", f"data.path={tokens}", f"out={tmp_path / 'x'}"])


def test_bpe_ids_go_through_the_tokenizers_threads_unchanged(tmp_path):
    """Encoding pieces together (encode_batch, the tokenizer's threads) gives the ids of encoding the text whole."""
    from mmtx.tokenizers.text import build_vocab

    from mmtx.data.text import encoding_pieces

    text = TINY_TEXT * 20
    vocab = build_vocab("bpe", text, vocab_size=300)
    pieces = list(encoding_pieces([text], size=512))
    assert len(pieces) > 10
    joined = np.concatenate(vocab.encode_arrays(pieces))
    assert joined.tolist() == vocab.encode(text)


def test_two_ddp_ranks_read_their_own_windows_of_streamed_text(corpus, tmp_path):
    """Two processes (gloo) on a prepared folder: each rank its own windows, together every window once."""
    _, tokens, _ = corpus
    run = tmp_path / "ddp"
    args = ["task=gpt_shakespeare_cpu", "data=streaming_text", f"data.path={tokens}", "data.block_size=16",
            "data.batch_size=8", "backbone.depth=1", "backbone.dim=32", "backbone.num_heads=2", "trainer=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_epochs=1",
            "trainer.limit_val_batches=0", "test_after_fit=false", "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=null", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
            "+callbacks.record._target_=conftest.RecordSamplerIndices"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "mmtx.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((run / f"indices_rank{r}.json").read_text()) for r in (0, 1))
    windows = (json.loads((tokens / "mmtx.json").read_text())["tokens"]["train"] - 1) // 16
    assert len(rank0) == len(rank1) == -(-windows // 2)  # an odd count is made even by repeating one window
    assert len(set(rank0) & set(rank1)) <= windows % 2 and set(rank0) | set(rank1) == set(range(windows))


def test_the_budget_counts_the_gpu_and_the_processes_that_hold_a_copy(corpus, tmp_path, monkeypatch, caplog):
    """On a GPU the resident ids live there: at most half its free memory (here 1 kB: memory-mapped instead); and
    each of a machine's DDP processes holds its own copy in memory."""
    from mmtx.data.memory import resident_budget
    from mmtx.config.wiring import build_data, resident_placement

    root, _, _ = corpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (1000, 80_000))
    with caplog.at_level("INFO"):
        data = build_data(compose("gpt_shakespeare_cpu", text_run(tmp_path, root, "trainer.accelerator=auto")))
    assert not data.device_resident and "of GPU memory free (data.resident_max_gb=null)" in caplog.text
    assert resident_placement(compose("gpt_shakespeare_cpu", ["trainer.accelerator=cpu"])) == (False, 1)
    assert resident_placement(compose("gpt_shakespeare_cpu", ["trainer=ddp", "trainer.devices=4"]))[1] == 4
    monkeypatch.setattr("mmtx.data.memory.available_memory", lambda: 8e9)
    budget, why = resident_budget(None, gpu=False, processes=4)
    assert budget == 0.8 * 8e9 / 4 and "shared by 4 processes" in why
    assert resident_budget(2.5, gpu=True, processes=4)[0] == 2.5e9  # a budget set by hand is the budget
