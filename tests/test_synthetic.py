"""Synthetic data of every modality (`data=synthetic_*`), GPT-2 small's shape, and the padded vocabulary."""

import pytest
import torch

from conftest import small_run
from mmtx import build, compose
from mmtx.data.synthetic import SyntheticAudio, SyntheticImages, SyntheticTokens, synthetic_vocab
from mmtx.errors import ConfigError
from mmtx.train import train


def test_gpt2_small_is_gpt2_small(tmp_path):
    """depth 12, dim 768, 12 heads, block 1,024, no dropout, 50,304 tied rows: 124 M parameters (nanoGPT's GPT-2 has
    124.44 M with 50,257 rows, 124.48 M padded) and 0.85 GFLOP a token by nanoGPT's formula."""
    cfg = compose("gpt2_small", ["trainer=cpu", f"paths.cache_dir={tmp_path}", "data.train_tokens=4096",
                                 "data.val_tokens=2048"])
    model, dm = build(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 124.4e6) / 124.4e6 < 0.01, n
    assert model.task.tokenizer.embed.weight.shape == (50304, 768)
    assert model.task.head.proj.weight is model.task.tokenizer.embed.weight
    assert model.backbone.depth == 12 and model.backbone.num_heads == 12 and dm.block_size == 1024
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert round(model.flops_per_token(1024) / 1e9, 2) == 0.86  # 6 x 123.69 M + 12 x 12 x 768 x 1024 = 0.855 G


def test_synthetic_tokens_train_a_padded_language_model_that_never_samples_a_padding_row(tmp_path):
    cfg = compose("gpt2_small", [*small_run(tmp_path, None, "text"), "data.vocab_size=100", "data.block_size=16",
                                 "data.train_tokens=4096", "data.val_tokens=512", "tokenizer.vocab.pad_to_multiple_of=64",
                                 "trainer.max_steps=3", "trainer.limit_val_batches=2", "trainer.val_check_interval=3",
                                 "family.sample_tokens=8", "test_after_fit=false"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["global_step"] == 3
    model, dm = build(cfg)
    part = model.task
    assert part.tokenizer.embed.num_embeddings == 128 and len(dm.vocab) == 100
    with torch.no_grad():  # every padding row made the likeliest: still never sampled
        part.tokenizer.embed.weight[100:] = 10 * part.tokenizer.embed.weight[:28].abs().max()
    text = part.complete(model.backbone, "t1 t2", max_new_tokens=20, temperature=1.0)
    ids = dm.vocab.encode(text)
    assert len(ids) == 22 and max(ids) < 100
    assert (tmp_path / "run" / "samples.tsv").is_file()


def test_synthetic_images_and_audio_run_through_their_data_modules(tmp_path):
    for task, data, extra in (("vit_cifar", "synthetic_images", [
                                                                 "data.source.train_size=64", "data.source.test_size=16"]),
                              ("audio_fsdd", "synthetic_audio", ["data.source.train_size=40", "data.source.test_size=10"])):
        cfg = compose(task, [*small_run(tmp_path / task, None, "image" if task == "vit_cifar" else "audio"), f"data={data}", *extra, "trainer.max_steps=2",
                             "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"])
        summary = train(cfg, run_dir=tmp_path / task / "run")
        assert summary["global_step"] == 2
    assert SyntheticImages(num_classes=3, image_size=8, train_size=5, test_size=2).decode("train")["images"].shape \
        == (5, 3, 8, 8)
    clips = SyntheticAudio(sample_rate=1000, min_seconds=0.1, max_seconds=0.2, train_size=4).decode("train")
    assert clips["lengths"].min() >= 100 and clips["lengths"].max() <= 200 and len(clips["labels"]) == 4


def test_synthetic_data_is_the_same_for_a_seed():
    a, b = SyntheticTokens(vocab_size=50, block_size=4, train_tokens=64, val_tokens=16, seed=3), \
        SyntheticTokens(vocab_size=50, block_size=4, train_tokens=64, val_tokens=16, seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.splits["train"]["ids"], b.splits["train"]["ids"])
    assert int(a.splits["train"]["ids"].max()) < 48  # <unk> and <|endoftext|> are the last ids, never drawn
    vocab = synthetic_vocab(50, ["<|endoftext|>"])
    assert len(vocab) == 50 and vocab.encode("t3 t47 <|endoftext|>") == [3, 47, 49]
    with pytest.raises(ConfigError, match="outside this synthetic vocabulary"):
        vocab.encode("hello")


@pytest.mark.parametrize("make, key", [
    (lambda: SyntheticTokens(vocab_size=2, special_tokens=["<|endoftext|>"]), "data.vocab_size=2"),
    (lambda: SyntheticTokens(vocab_size=0), "data.vocab_size=0"),
    (lambda: SyntheticTokens(block_size=0), "data.block_size=0"),
    (lambda: SyntheticTokens(block_size=64, train_tokens=10), "data.train_tokens=10"),
    (lambda: SyntheticImages(image_size=0), "data.source.image_size=0"),
    (lambda: SyntheticImages(train_size=0), "data.source.train_size=0"),
    (lambda: SyntheticAudio(num_classes=0), "data.source.num_classes=0"),
    (lambda: SyntheticAudio(min_seconds=0.0), "data.source.min_seconds=0.0"),
])
def test_a_synthetic_source_of_no_size_is_refused_naming_the_key(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()


def test_a_vocabulary_padded_to_nothing_is_refused_naming_the_key(tmp_path):
    cfg = compose("gpt2_small", [*small_run(tmp_path, None, "text"), "data.vocab_size=100", "data.block_size=16",
                                 "data.train_tokens=4096", "data.val_tokens=512", "tokenizer.vocab.pad_to_multiple_of=0"])
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab\.pad_to_multiple_of=0 must be a positive whole number"):
        build(cfg)
