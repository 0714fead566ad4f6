"""Translation: parallel text sources and their bad inputs, the seq2seq data module, metrics, the task end to end."""

import dataclasses
import gzip
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, make_parallel, read_metrics, small_run
from mmtx import compose
from mmtx.batch import IGNORE_INDEX, TokenBatch
from mmtx.data.seq2seq import Seq2SeqDataModule
from mmtx.data.seq2seq_sources import ParallelText
from mmtx.eval import evaluate
from mmtx.generate import main as generate
from mmtx.tasks.seq2seq import text_metric
from mmtx.train import train

BPE = {"kind": "bpe", "vocab_size": 300, "special_tokens": []}


def write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def datamodule(tmp_path, source, **kw):
    kw = {"tgt_vocab": BPE, "batch_size": 4, "eval_batch_size": 8, **kw}
    dm = Seq2SeqDataModule(source, cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup()
    return dm


# -- sources and their bad inputs ---------------------------------------------------------------------


def test_parallel_files_and_tsv_read_the_same_pairs(tmp_path):
    write(tmp_path / "a.en.gz", "One two.\nThree.\n", gz=True)
    write(tmp_path / "a.de", "Eins zwei.\nDrei.\n")
    write(tmp_path / "a.tsv", "One two.\tEins zwei.\nThree.\tDrei.\n")
    files = ParallelText({"train": {"src": "a.en.gz", "tgt": "a.de"}, "test": "a.tsv"}, root=str(tmp_path))
    assert files.decode("train") == files.decode("test") == {
        "src": ["One two.", "Three."], "tgt": ["Eins zwei.", "Drei."], "names": []}


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    write(tmp_path / "x.en", "a\nb\nc\n")
    write(tmp_path / "x.de", "a\nb\n")
    source = ParallelText({"train": {"src": "x.en", "tgt": "x.de"}}, root=str(tmp_path))
    with pytest.raises(ValueError, match=r"x\.en has 3 lines but .*x\.de has 2"):
        source.decode("train")


def test_empty_lines_are_skipped_and_counted(tmp_path, caplog):
    write(tmp_path / "x.en", "a\n\nc\nd\n   \n")
    write(tmp_path / "x.de", "A\nB\n\nD\nE\n")
    source = ParallelText({"train": {"src": "x.en", "tgt": "x.de"}}, root=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        pairs = source.decode("train")
    assert pairs["src"] == ["a", "d"] and pairs["tgt"] == ["A", "D"]
    assert "skipped 3 pair(s) with an empty side (lines 2, 3, 5)" in caplog.text


def test_bad_tsv_line_and_missing_file_are_named(tmp_path):
    write(tmp_path / "bad.tsv", "a\tA\nno tab here\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2 has 1 tab-separated fields"):
        ParallelText({"train": "bad.tsv"}, root=str(tmp_path)).decode("train")
    with pytest.raises(FileNotFoundError, match=r"data\.source\.files\.train\.tgt: no file at"):
        ParallelText({"train": {"src": "bad.tsv", "tgt": "nope.de"}}, root=str(tmp_path))
    with pytest.raises(ValueError, match="needs a train split"):
        ParallelText({"test": "bad.tsv"}, root=str(tmp_path))


def test_invalid_utf8_names_file_and_offset(tmp_path):
    (tmp_path / "x.en").write_bytes(b"ok\nbad \xff\n")
    write(tmp_path / "x.de", "ok\nbad\n")
    with pytest.raises(ValueError, match=r"x\.en is not UTF-8: invalid byte 0xff at byte offset 7"):
        ParallelText({"train": {"src": "x.en", "tgt": "x.de"}}, root=str(tmp_path)).decode("train")


def test_hf_translation_reads_a_translation_column_or_language_columns(tmp_path, monkeypatch):
    """Through `datasets`' local JSON loader (no network): WMT-style dicts and per-language columns."""
    import json

    from mmtx.data.seq2seq_sources import HFTranslation

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rows = [{"translation": {"en": "One.", "de": "Eins."}}, {"translation": {"en": "", "de": "Leer."}},
            {"translation": {"en": "Two.", "de": "Zwei."}}]
    write(tmp_path / "wmt.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "cols.jsonl", "".join(json.dumps(r["translation"]) + "\n" for r in rows))
    for name in ("wmt", "cols"):
        source = HFTranslation("json", "en", "de", data_files={"train": str(tmp_path / f"{name}.jsonl")},
                               split_names={"train": "train"})
        assert source.decode("train") == {"src": ["One.", "Two."], "tgt": ["Eins.", "Zwei."], "names": []}
    with pytest.raises(ValueError, match="has no language \\['fr'\\]"):
        HFTranslation("json", "fr", "de", data_files={"train": str(tmp_path / "wmt.jsonl")},
                      split_names={"train": "train"}).decode("train")


# -- the data module -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_parallel(tmp_path_factory.mktemp("data") / "multi30k")


def corpus_source(corpus):
    return ParallelText({split: {"src": str(corpus / f"{name}.en.gz"), "tgt": str(corpus / f"{name}.de.gz")}
                         for split, name in (("train", "train"), ("val", "val"), ("test", "test_2016_flickr"))})


def test_batches_carry_padded_sources_and_shifted_targets(corpus, tmp_path):
    dm = datamodule(tmp_path, corpus_source(corpus))
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    ids = dm.special
    src, mask, tgt_in, tgt_out = batch.source.tokens, batch.source.mask, batch.target.tokens, batch.target.targets
    assert src.shape == mask.shape and tgt_in.shape == tgt_out.shape
    for i, (source, reference) in enumerate(zip(batch.sources, batch.refs)):
        assert dm.src_vocab.decode(src[i][mask[i]].tolist()) == source  # the mask covers exactly the source
        n = int((tgt_out[i] != IGNORE_INDEX).sum())  # target + EOS
        assert tgt_in[i, 0] == ids["bos_id"] and tgt_out[i, n - 1] == ids["eos_id"]
        assert torch.equal(tgt_in[i, 1:n], tgt_out[i, :n - 1])  # teacher forcing: shifted by one
        assert (tgt_in[i, n:] == ids["pad_id"]).all()
        assert dm.tgt_vocab.decode(tgt_out[i, :n - 1].tolist()) == reference
    assert dm.src_vocab is dm.tgt_vocab  # shared by default


def test_long_pairs_are_cut_and_counted(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        dm = datamodule(tmp_path, corpus_source(corpus), max_src_len=4, max_tgt_len=5)
    assert "cut" in caplog.text and "data.max_src_len=4" in caplog.text
    assert int(dm.splits["train"]["src_lengths"].max()) == 4 and int(dm.splits["train"]["tgt_lengths"].max()) == 4
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())))
    assert batch.target.tokens.shape[1] <= 5


def test_separate_vocabularies_and_cached_tokenizers(corpus, tmp_path):
    dm = datamodule(tmp_path, corpus_source(corpus), shared_vocab=False, src_vocab={**BPE, "vocab_size": 280})
    assert dm.src_vocab is not dm.tgt_vocab and len(dm.src_vocab) != len(dm.tgt_vocab)
    assert dm.tgt_vocab.decode(dm.tgt_vocab.encode("Fünf Äpfel")) == "Fünf Äpfel"  # byte-level: any text
    folders = sorted(p for p in (tmp_path / "cache").glob("*-vocab-*") if p.is_dir())
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"src_tokenizer.json", "tgt_tokenizer.json",
                                                                              "checksums.json"}
    again = datamodule(tmp_path, corpus_source(corpus), shared_vocab=False, src_vocab={**BPE, "vocab_size": 280})
    assert again.tgt_vocab.to_json() == dm.tgt_vocab.to_json()
    assert sorted(p for p in (tmp_path / "cache").glob("*-vocab-*") if p.is_dir()) == folders  # reused, not retrained


def test_source_padding_changes_nothing_in_the_model(corpus, tmp_path):
    """Through the whole encoder-decoder: the source tokens under the mask decide everything."""
    from mmtx.config.wiring import build_model

    cfg = compose("translate_multi30k_cpu", [*small_run(tmp_path, corpus.parent, "text2text"), "backbone.dropout=0",
                                             "tokenizer.dropout=0", "backbone.attn_dropout=0"])
    dm = datamodule(tmp_path, corpus_source(corpus))
    model = build_model(cfg, dm.runtime_kwargs()).eval()
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    source = batch.source
    assert not source.mask.all()
    changed = dataclasses.replace(batch, source=TokenBatch(source.tokens.masked_fill(~source.mask, 7), source.mask))
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(changed))
    part = model.task
    assert part.decode(model.backbone, batch.source, beam_size=2) == part.decode(model.backbone, changed.source, beam_size=2)


# -- metrics -------------------------------------------------------------------------------------------


def score(name, hyps, refs, split=1):
    """A text metric updated batch by batch (`split` batches), as validation updates it."""
    metric = text_metric(name)
    step = -(-len(hyps) // split)
    for i in range(0, len(hyps), step):
        metric.update(hyps[i:i + step], [[r] for r in refs[i:i + step]] if name == "bleu" else refs[i:i + step])
    return float(metric.compute()) * (100 if name == "bleu" else 1)


def test_bleu_and_error_rates_on_known_strings():
    assert score("bleu", ["Ein Hund läuft."], ["Ein Hund läuft."]) == pytest.approx(100.0)
    assert score("bleu", ["völlig anders"], ["Ein Hund läuft durch den Park."]) == pytest.approx(0.0)
    # sacreBLEU's own value for a partial match (1-4-gram precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty)
    assert score("bleu", ["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-4)
    assert score("bleu", ["Ein Hund"], ["ein hund"]) < 100  # case-sensitive
    assert score("wer", ["seven", "for"], ["seven", "four"]) == pytest.approx(0.5)
    assert score("cer", ["seven", "for"], ["seven", "four"]) == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        text_metric("rouge")


def test_corpus_bleu_over_batches_is_sacrebleus_corpus_score():
    """The metric sums n-gram counts over batches (and ranks): the same figure as sacreBLEU on the whole corpus."""
    from sacrebleu.metrics import BLEU

    refs = ["Ein Hund läuft durch den Park.", "Zwei Männer sitzen auf einer Bank.", "Eine Frau liest ein Buch.",
            "Kinder spielen im Schnee.", "Ein Mann fährt Fahrrad auf der Straße."]
    hyps = ["Ein Hund rennt durch den Park.", "Zwei Männer sitzen auf der Bank.", "Eine Frau liest.",
            "Kinder spielen im Schnee.", "Ein Mann fährt auf der Straße Rad."]
    expected = BLEU().corpus_score(hyps, [refs]).score
    assert 0 < expected < 100
    assert score("bleu", hyps, refs, split=3) == pytest.approx(expected, abs=1e-4)


# -- the task end to end ----------------------------------------------------------------------------------


def test_translate_task_trains_evaluates_and_translates(corpus, tmp_path):
    overrides = [*small_run(tmp_path, corpus.parent, "text2text"), "trainer.max_epochs=2",
                 "family.val_decode_batches=1", "family.log_examples=3", "callbacks.throughput.window=2"]
    summary = train(compose("translate_multi30k", overrides), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    rates = [float(r["train/tgt_tokens_per_sec"]) for r in read_metrics(run) if r.get("train/tgt_tokens_per_sec")]
    assert rates and all(r > 0 for r in rates)
    val = (run / "val_examples.tsv").read_text().splitlines()
    assert val[0] == "step\tsource\treference\thypothesis" and len(val) == 1 + 2 * 3  # 3 rows per validation
    test = (run / "test_examples.tsv").read_text().splitlines()
    assert len(test) == 1 + 12  # every test sentence
    assert "test/bleu" in summary and summary["monitor"] == "val/bleu"
    assert (run / "tgt_tokenizer.json").is_file()

    ckpt = summary["last_checkpoint"]
    metrics = evaluate(ckpt, ["trainer.accelerator=cpu"])
    assert set(metrics) == {"test/loss", "test/bleu"}
    assert len((run / "eval" / "test_examples.tsv").read_text().splitlines()) == 1 + 12

    source, _, hypothesis = (run / "eval" / "test_examples.tsv").read_text().splitlines()[1].split("\t")[1:]
    assert generate([f"ckpt={ckpt}", f"text={source}", "beam_size=2"]) == [hypothesis]  # what the test decoded
    lines = tmp_path / "in.en"
    lines.write_text("One two.\n\nThree four five.\n")
    assert len(generate([f"ckpt={ckpt}", f"text_file={lines}"])) == 3  # a blank line stays a blank line
    with pytest.raises(ValueError, match="reads text, but audio= was given"):
        generate([f"ckpt={ckpt}", f"audio={lines}"])


@pytest.mark.slow  # learns to a threshold
def test_tiny_translation_is_learned(tmp_path):
    """Word-for-word number translation: a small model gets most of the test set right (BLEU well above 0)."""
    corpus = make_parallel(tmp_path / "data" / "multi30k", (("train", 400), ("val", 20), ("test_2016_flickr", 20)))
    overrides = [*small_run(tmp_path, corpus.parent, "text2text"), "backbone.dim=64", "backbone.num_heads=4",
                 "family.decoder.depth=2", "trainer.max_epochs=15", "data.batch_size=16", "optim.lr=3e-3",
                 "optim.warmup_steps=20", "family.val_decode_batches=0", "callbacks.checkpoint.monitor=val/loss",
                 "callbacks.checkpoint.mode=min", "tokenizer.dropout=0", "backbone.dropout=0", "seed=1"]
    summary = train(compose("translate_multi30k", overrides), run_dir=tmp_path / "run")
    assert summary["test/bleu"] > 50, summary


def test_generate_in_a_fresh_process(corpus, tmp_path):
    overrides = [*small_run(tmp_path, corpus.parent, "text2text"), "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "test_after_fit=false"]
    summary = train(compose("translate_multi30k", overrides), run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), summary
    out = subprocess.run([sys.executable, "-m", "mmtx.generate", f"ckpt={ckpt}", "text=Two three.", "max_len=5"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").is_dir(), reason="../shared/data/multi30k is absent")
def test_multi30k_is_found_with_the_data_root_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTX_DATA_DIR", str(SHARED_DATA))
    cfg = compose("translate_multi30k", [f"paths.cache_dir={tmp_path}"])
    from mmtx.config.wiring import build_data

    dm = build_data(cfg)
    assert {k: len(v["tgt_lengths"]) for k, v in dm.splits.items()} == {"train": 29000, "val": 1014, "test": 1000}
    assert len(dm.tgt_vocab) == 8000 and dm.special == {"pad_id": 0, "bos_id": 1, "eos_id": 2, "prefix_ids": []}
    assert dm.texts["test"]["src"][0] and dm.texts["test"]["tgt"][0]

