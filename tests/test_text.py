"""Text: tokenizers, the token cache, the causal LM, KV-cache generation and bad inputs."""

import csv
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TEXT, small_run
from mmtx import compose
from mmtx.backbone import Backbone
from mmtx.data.text import TextDataModule
from mmtx.data.text_sources import TextFiles
from mmtx.generate import load_model
from mmtx.tasks.decoding import filter_logits, generate
from mmtx.tokenizers.text import Vocab, build_vocab
from mmtx.train import train

UNICODE = "Grüße, 世界! naïve café — emoji 😀\n\ttabs  and  spaces\r\n"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus" / "input.txt"
    path.parent.mkdir()
    path.write_text(TINY_TEXT + UNICODE)
    return path


def text_run(tmp_path, corpus, *extra):
    return [*small_run(tmp_path, modality="text"), "data=text_files", f"data.source.files={corpus}", *extra]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizer_round_trips(kind):
    vocab = build_vocab(kind, TINY_TEXT + UNICODE, vocab_size=300, min_frequency=1)
    for text in (TINY_TEXT, UNICODE, "", "  speak and  spaces  ", "\n\n"):
        assert vocab.decode(vocab.encode(text)) == text
    reloaded = Vocab.from_json(vocab.to_json())
    assert reloaded.kind == kind and reloaded.encode(UNICODE) == vocab.encode(UNICODE)


def test_bpe_covers_unseen_text_and_merges():
    vocab = build_vocab("bpe", TINY_TEXT, vocab_size=300, min_frequency=1)
    unseen = "Zebras 🦓 über alles"
    assert vocab.decode(vocab.encode(unseen)) == unseen  # byte-level: nothing is unknown
    assert len(vocab.encode("First Citizen")) < len("First Citizen")  # merges learned
    assert vocab.token_id("<|endoftext|>") is not None


def test_char_tokenizer_names_unseen_characters():
    vocab = build_vocab("char", "abc \n")
    with pytest.raises(ValueError, match=r"never saw in training: \['z'\]"):
        vocab.encode("abz")


def test_tokenizer_from_file(tmp_path):
    vocab = build_vocab("char", "hello")
    vocab.save(tmp_path / "tokenizer.json")
    assert build_vocab("file", "", path=str(tmp_path / "tokenizer.json")).encode("hello") == vocab.encode("hello")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        build_vocab("file", "", path=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a tokenizers JSON file"):
        build_vocab("file", "", path=str(tmp_path / "bad.json"))


def datamodule(tmp_path, corpus, **kw):
    kw.setdefault("vocab", {"kind": "char"})
    dm = TextDataModule(TextFiles(str(corpus)), cache_dir=str(tmp_path / "cache"), block_size=8, batch_size=4, **kw)
    dm.setup()
    return dm


def test_split_windows_and_targets(tmp_path, corpus):
    dm = datamodule(tmp_path, corpus)
    text = corpus.read_bytes().decode()  # (read_text would turn the \r\n into \n)
    cut = int(len(text) * 0.9)
    assert dm.vocab.decode(dm.splits["train"]["ids"].tolist()) == text[:cut]
    assert dm.vocab.decode(dm.splits["val"]["ids"].tolist()) == text[cut:]
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.tokens.shape == batch.targets.shape == (4, 8)
    torch.testing.assert_close(batch.tokens[:, 1:], batch.targets[:, :-1])
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    torch.testing.assert_close(val.tokens[0], dm.splits["val"]["ids"][:8])  # validation: in order, unshifted
    assert dm.chars_per_token == 1.0


def test_memory_mapped_path_gives_the_same_windows(tmp_path, corpus):
    resident = datamodule(tmp_path, corpus)
    mapped = datamodule(tmp_path, corpus, device_resident=False)
    index = next(iter(resident.val_dataloader()))
    torch.testing.assert_close(resident.on_after_batch_transfer(index, 0).tokens,
                               mapped.on_after_batch_transfer(index, 0).tokens)
    cache = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert (cache / "train.bin").stat().st_size == 2 * len(resident.splits["train"]["ids"])  # uint16 on disk


def test_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path, corpus, monkeypatch):
    reads = []  # one entry per build of the cache (however many passes over the text a build takes)
    original = TextDataModule._tokenize
    monkeypatch.setattr(TextDataModule, "_tokenize", lambda self, folder: reads.append(1) or original(self, folder))
    datamodule(tmp_path, corpus)
    datamodule(tmp_path, corpus)
    assert len(reads) == 1  # reused
    corpus.write_text(TINY_TEXT + "a brand new ending\n")
    dm = datamodule(tmp_path, corpus)
    assert len(reads) == 2 and dm.vocab.decode(dm.splits["val"]["ids"].tolist()).endswith("a brand new ending\n")
    datamodule(tmp_path, corpus, vocab={"kind": "bpe", "vocab_size": 300, "min_frequency": 1})
    assert len(reads) == 3  # another vocabulary: another cache


def test_glob_of_files(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"file {i} " * 50)
    source = TextFiles(str(tmp_path / "part*.txt"))
    assert [f.name for f in source.files] == ["part0.txt", "part1.txt", "part2.txt"]
    assert source.decode("all")["text"].count("file 2") == 50


def test_bad_text_inputs(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no text file matches"):
        TextFiles(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*are empty"):
        TextFiles(str(empty)).decode("all")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("hello caf".encode() + b"\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8: invalid byte 0xe9 at byte offset 9"):
        TextFiles(str(latin)).decode("all")
    with caplog.at_level(logging.WARNING):
        text = TextFiles(str(latin), on_decode_error="replace").decode("all")["text"]
    assert text == "hello caf\ufffd au lait\n" and "replaced 1 invalid" in caplog.text


def test_block_size_longer_than_the_data(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text here")
    with pytest.raises(ValueError, match=r"data.block_size=64 is longer than the train split \(26 tokens\)"):
        TextDataModule(TextFiles(str(short)), cache_dir=str(tmp_path), vocab={"kind": "char"}, block_size=64).setup()


def tiny_lm(rotary: bool):
    """The language model as generation sees it: a CausalLM over a LanguageModel part and its backbone."""
    from mmtx.tasks.language_model import CausalLM, LanguageModel
    from mmtx.tokenizers.text import TokenEmbedding

    vocab = build_vocab("char", TINY_TEXT)
    tokenizer = TokenEmbedding(32, vocab, max_len=24, pos_embed="none" if rotary else "learned")
    backbone = Backbone(32, 2, 4, rotary=rotary).eval()
    part = LanguageModel(tokenizer, 32).eval()
    part.attach(backbone)
    model = CausalLM(part, backbone)
    model.vocab = vocab
    return model


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_greedy_decoding_matches_full_recompute(rotary):
    torch.manual_seed(0)
    model = tiny_lm(rotary)
    prompt = torch.tensor([model.vocab.encode("First Citizen:\n"), model.vocab.encode("All:\nSpeak, spe")])
    cached = generate(model, prompt, max_new_tokens=9, temperature=0.0, use_cache=True)
    full = generate(model, prompt, max_new_tokens=9, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 24)
    assert torch.equal(cached, full)
    # and the cached logits themselves match the full forward pass
    caches = model.new_caches(2, 24)
    steps = [model.decode(cached[:, :10], caches, 0)[:, -1]]
    steps += [model.decode(cached[:, t:t + 1], caches, t)[:, -1] for t in range(10, 23)]
    full_logits = model.decode(cached[:, :23])[:, 9:]
    torch.testing.assert_close(torch.stack(steps, 1), full_logits, atol=1e-4, rtol=1e-4)


def test_generation_past_max_len_keeps_going():
    model = tiny_lm(rotary=False)
    out = generate(model, torch.tensor([model.vocab.encode("All:\n")]), max_new_tokens=40, temperature=0.0)
    assert out.shape == (1, 5 + 40)  # max_len is 24: the cache was refilled on the way


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)  # about [0.64, 0.24, 0.09, 0.03]
    assert probs[0, 0] < 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


@pytest.mark.slow  # learns to a threshold
def test_causal_lm_loss_decreases_and_the_run_keeps_its_tokenizer(tmp_path, corpus):
    cfg = compose("gpt_shakespeare", text_run(tmp_path, corpus, "trainer.max_steps=60", "optim.lr=3e-3",
                                               "optim.warmup_steps=5", "trainer.limit_val_batches=4"))
    summary = train(cfg, run_dir=tmp_path / "run")
    rows = (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("train/loss")]) for r in rows[1:]
              if r.split(",")[header.index("train/loss")]]
    assert len(losses) >= 3
    assert losses[-1] < 0.75 * losses[0]
    vocab = Vocab.from_file(tmp_path / "run" / "tokenizer.json")
    assert summary["test/loss"] < 0.8 * math.log(len(vocab))  # well below the uniform guess
    torch.testing.assert_close(summary["test/bpc"], summary["test/loss"] / math.log(2))  # chars: 1 per token
    assert (tmp_path / "run" / "samples.tsv").read_text().startswith("step\tprompt\ttext\n")
    assert load_model(summary["last_checkpoint"]).task.vocab.to_json() == (tmp_path / "run" / "tokenizer.json").read_text()

    # generation from the saved checkpoint, in a fresh process
    proc = subprocess.run(
        [sys.executable, "-m", "mmtx.generate", f"ckpt={summary['last_checkpoint']}", "prompt=All:",
         "max_new_tokens=20", "temperature=0", "device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("All:") and len(proc.stdout.rstrip("\n")) >= 4
    model = load_model(summary["last_checkpoint"])
    same = model.task.complete(model.backbone, "All:", 20, temperature=0.0)
    assert proc.stdout.rstrip("\n") == same.rstrip("\n")


def test_train_loss_is_the_mean_since_it_was_last_logged(tmp_path, corpus):
    def logged(name, every):
        cfg = compose("gpt_shakespeare", text_run(tmp_path / name, corpus, "trainer.max_steps=8",
                                                   f"trainer.log_every_n_steps={every}", "test_after_fit=false"))
        train(cfg, run_dir=tmp_path / name / "run")
        with open(tmp_path / name / "run" / "metrics" / "version_0" / "metrics.csv") as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    every_step, every_fourth = logged("one", 1), logged("four", 4)
    assert len(every_step) == 8 and len(every_fourth) == 2
    torch.testing.assert_close(every_fourth, [sum(every_step[:4]) / 4, sum(every_step[4:]) / 4], rtol=1e-4, atol=1e-5)


def test_generate_points_a_classifier_checkpoint_to_predict(image_folder, tmp_path):
    from conftest import folder_run

    summary = train(compose("vit_cifar", [*folder_run(tmp_path, image_folder), "trainer.max_steps=1",
                                          "test_after_fit=false"]), run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="holds a classification model, which does not generate: label images or audio with python -m mmtx.predict"):
        load_model(summary["last_checkpoint"])


def test_generate_cli_arguments():
    """mmtx.generate is a Hydra app: numbers parse as numbers, free text stays exactly as written."""
    from omegaconf import MissingMandatoryValue

    from mmtx.config.apps import app_keys, compose_app, hydra_argv
    from mmtx.generate import VERBATIM

    def args(*argv):
        return compose_app("generate", hydra_argv(argv, app_keys("generate"), verbatim=VERBATIM))

    text = "It's 1, ${x} [2] {a: b} \\n end\\"
    cfg = args("ckpt=x.ckpt", "prompt=ROMEO: a=b", "top_k=0", "temperature=0.5", f"text={text}", "audio=a.wav,b.wav")
    assert cfg.prompt == "ROMEO: a=b" and cfg.top_k == 0 and cfg.temperature == 0.5
    assert cfg.text == text and cfg.audio == "a.wav,b.wav"
    with pytest.raises(ValueError, match="topk"):
        args("ckpt=x", "topk=3")
    with pytest.raises(MissingMandatoryValue, match="ckpt"):
        args("prompt=hi").ckpt


def test_hf_text_source_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from mmtx.data.text_sources import HFText

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "train.txt").write_text(TINY_TEXT)
    (tmp_path / "val.txt").write_text("All:\nSpeak, speak.\n" * 10)
    source = HFText("text", data_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")},
                    split_names={"train": "train", "val": "validation"}, separator="\n")
    dm = TextDataModule(source, cache_dir=str(tmp_path / "cache"), vocab={"kind": "char"}, block_size=8)
    dm.setup()
    assert dm.vocab.decode(dm.splits["val"]["ids"].tolist()).startswith("All:\nSpeak, speak.\nAll:")
    assert len(dm.splits["train"]["ids"]) > len(dm.splits["val"]["ids"])


def test_eval_of_a_language_model_uses_its_stored_tokenizer(tmp_path, corpus):
    from mmtx.eval import evaluate

    cfg = compose("gpt_shakespeare", text_run(tmp_path, corpus, "trainer.max_steps=5", "test_after_fit=false",
                                               "tokenizer=bpe", "tokenizer.vocab.vocab_size=300"))
    summary = train(cfg, run_dir=tmp_path / "run")
    metrics = evaluate(summary["last_checkpoint"], ["trainer.limit_test_batches=2"])
    assert metrics["test/loss"] > 0 and metrics["test/bpc"] > 0


def test_throughput_logs_tokens_per_second_and_mfu_by_its_formula(tmp_path, corpus, monkeypatch):
    """train/mfu = flops_per_token(T) x tokens/s / peak (6N + 12 L D T per token); on the CPU there is no
    peak, so one is given here."""
    import mmtx.training.callbacks
    from conftest import read_metrics
    from mmtx.config.wiring import build

    monkeypatch.setattr(mmtx.training.callbacks, "peak_flops", lambda device: 1e12)
    cfg = compose("gpt_shakespeare", text_run(tmp_path, corpus, "trainer.max_steps=9", "test_after_fit=false",
                                               "callbacks.throughput.window=4", "trainer.log_every_n_steps=1"))
    train(cfg, run_dir=tmp_path / "run")
    rows = {(r["train/mfu"], r["train/tokens_per_sec"], r["train/samples_per_sec"]): r
            for r in read_metrics(tmp_path / "run") if r.get("train/mfu")}.values()  # (the CSV repeats a value)
    assert len(rows) == 2  # steps 2-5 and 6-9 (the first step is start-up, not timed)
    model, _ = build(cfg)
    T = cfg.data.block_size
    for row in rows:
        tokens_per_sec = float(row["train/tokens_per_sec"])
        assert tokens_per_sec == pytest.approx(float(row["train/samples_per_sec"]) * T)
        assert float(row["train/mfu"]) == pytest.approx(model.flops_per_token(T) * tokens_per_sec / 1e12, rel=1e-3)
    assert model.task.tokenizer.pos is None  # rotary positions: no table to leave out of N
    n = sum(p.numel() for p in model.parameters())
    assert model.flops_per_token(T) == 6 * n + 12 * cfg.backbone.depth * cfg.backbone.dim * T


def test_throughput_is_logged_when_epochs_are_shorter_than_its_window(tmp_path, corpus):
    """Windows run across epochs, the clock stops for validation, and the figures reach the logger even
    when no window ends on a `log_every_n_steps` step (the GPT-2-shape GPU run: 18 batches an epoch, a
    window of 20, logging every 50 steps, and no figure at all before)."""
    from conftest import read_metrics

    cfg = compose("gpt_shakespeare", text_run(tmp_path, corpus, "trainer.max_steps=13", "test_after_fit=false",
                                               "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                                               "trainer.val_check_interval=null",
                                               "trainer.check_val_every_n_epoch=1",
                                               "callbacks.throughput.window=4", "trainer.log_every_n_steps=50"))
    train(cfg, run_dir=tmp_path / "run")
    rows = {r["step"]: float(r["train/tokens_per_sec"]) for r in read_metrics(tmp_path / "run")
            if r.get("train/tokens_per_sec")}
    assert len(rows) == 3 and all(rate > 0 for rate in rows.values())  # steps 2-5, 6-9, 10-13 over 5 epochs


def test_throughput_of_a_cotraining_mix_logs_samples_per_second():
    """A co-training run's windows mix token batches with image batches, and some windows hold no token batch at
    all (cotrain_multimodal stopped there: Lightning's meter needs its lengths to grow every window): samples/s
    alone, all members together."""
    from types import SimpleNamespace

    from mmtx.batch import ImageBatch, TokenBatch
    from mmtx.training.callbacks import Throughput

    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    trainer = SimpleNamespace(world_size=1, loggers=[logger], global_step=0, sanity_checking=False)
    module = SimpleNamespace(device=torch.device("cpu"))
    text = {"text": TokenBatch(tokens=torch.zeros(3, 8, dtype=torch.long))}
    image = {"image": ImageBatch(image=torch.zeros(5, 3, 4, 4))}
    meter = Throughput(window=2)
    meter.on_train_start(trainer, module)
    for step, batch in enumerate([text, text, image, image, image]):  # windows: text + image, then image alone
        trainer.global_step = step + 1
        meter.on_train_batch_end(trainer, module, None, batch, step)
    assert [set(m) for m in logged] == [{"train/samples_per_sec"}] * 2
    assert all(m["train/samples_per_sec"] > 0 for m in logged)
