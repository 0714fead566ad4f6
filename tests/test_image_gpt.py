"""Images as tokens a decoder generates (iGPT): the palette, the image-token data, the family and mmtx.generate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import make_image_folder, small_run

from mmtx import build, compose
from mmtx.errors import ConfigError
from mmtx.tokenizers.palette import dequantize, fit_palette, palette_of, palette_vocab, quantize
from mmtx.tokenizers.text import Vocab
from mmtx.train import train

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]], dtype=torch.uint8)


def test_kmeans_finds_the_colours_of_an_image_made_of_few_and_quantizing_round_trips():
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(4, (2, 6, 5), generator=generator)  # (B, H, W) colour ids
    images = COLOURS[picks].permute(0, 3, 1, 2)  # (B, 3, H, W)
    noisy = (images.float() + torch.randn(images.shape, generator=generator) * 2).clamp(0, 255)
    palette = fit_palette(noisy.permute(0, 2, 3, 1).reshape(-1, 3), 4, seed=1)
    assert sorted(palette.round().long().tolist()) == sorted(COLOURS.long().tolist()) or \
        torch.cdist(palette, COLOURS.float()).min(0).values.max() < 4  # each true colour found, up to the noise
    ids = quantize(images, palette)
    assert ids.shape == (2, 30)
    torch.testing.assert_close(dequantize(ids, palette, 6, 5).float(), images.float(), atol=4, rtol=0)
    assert len(fit_palette(COLOURS.float(), 8)) == 8  # fewer distinct pixels than k: they are the palette


def test_the_palette_travels_in_the_vocabulary():
    palette = COLOURS.float()
    vocab = Vocab.from_json(palette_vocab(palette, ["cat", "sea lion"]).to_json())
    assert vocab.kind == "palette" and len(vocab) == 1 + 2 + 4
    assert vocab.encode("cat") == [1] and vocab.encode("sea_lion") == [2] and vocab.encode("<image>") == [0]
    back, first = palette_of(vocab)
    assert first == 3 and torch.equal(back, palette)
    with pytest.raises(ConfigError, match=r"'dog' is not a class of this image model: its prompts are one of \['cat', 'sea_lion'\]"):
        vocab.encode("dog")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(3)], per_class=(8, 3), size=16)
    return root


def igpt_run(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return [*small_run(tmp_path, root, "image_tokens"), *extra]


def test_image_token_batches_are_the_class_token_then_the_quantized_pixels(pictures, tmp_path):
    cfg = compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures, "data.hflip=false"))
    model, dm = build(cfg)
    assert dm.grid == (8, 8) and dm.vocab.kind == "palette" and len(dm.vocab) == 1 + 3 + 16
    batch = dm.on_after_batch_transfer({"index": torch.arange(5), "split": "train"})
    assert batch.tokens.shape == batch.targets.shape == (5, 64)
    labels = dm.splits["train"]["labels"][:5]
    assert torch.equal(batch.tokens[:, 0], 1 + labels)  # each sequence starts with its class's token
    assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1]) and (batch.targets >= 4).all()
    palette, first = palette_of(dm.vocab)
    images = torch.nn.functional.interpolate(dm.images.splits["train"]["images"][:5].float(), size=(8, 8), mode="area")
    assert torch.equal(batch.targets - first, quantize(images.round().to(torch.uint8), palette))
    assert model.task.first_colour == first and model.task.tokenizer.max_len == 64
    _, again = build(cfg)  # the palette and the ids come back from the cache, the same
    assert torch.equal(again.splits["test"]["ids"], dm.splits["test"]["ids"])


def test_an_igpt_run_reports_bits_per_dimension_and_generate_draws_pngs(pictures, tmp_path):
    from mmtx.generate import main as generate

    cfg = compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures, "trainer.max_steps=3"))
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["test/bpd"] == pytest.approx(summary["test/loss"] / math.log(2) / 3, rel=1e-4)
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    from mmtx.eval import evaluate

    again = evaluate(ckpt, ["trainer.accelerator=cpu"])  # the data quantized with the checkpoint's own palette
    assert again["test/bpd"] == pytest.approx(summary["test/bpd"], rel=1e-4)
    with pytest.raises(ConfigError, match=r"the checkpoint's image tokens are for the classes \['c0', 'c1', 'c2'\]"):
        evaluate(ckpt, ["trainer.accelerator=cpu", "data.conditional=false"])
    paths = generate([f"ckpt={ckpt}", "prompt=c1", "num_samples=2", f"out={tmp_path / 'drawn'}", "device=cpu"])
    assert [Path(p).name for p in paths] == ["c1-000.png", "c1-001.png"]
    drawn = np.asarray(Image.open(paths[0]))
    assert drawn.shape == (8, 8, 3)
    palette = {tuple(c) for c in palette_of(Vocab.from_json(torch.load(ckpt, weights_only=True)["mmtx_members"]["main"]
                                                             ["mmtx_vocab"]))[0].long().tolist()}
    assert {tuple(p) for p in drawn.reshape(-1, 3).tolist()} <= palette  # only palette colours are drawn

    half = tmp_path / "half.png"
    source = np.zeros((8, 8, 3), dtype=np.uint8) + 200
    Image.fromarray(source).save(half)
    done = generate([f"ckpt={ckpt}", "prompt=c0", f"image={half}", f"out={tmp_path / 'done'}", "device=cpu"])
    completed = np.asarray(Image.open(done[0]))
    nearest = min(palette, key=lambda c: sum((a - 200) ** 2 for a in c))
    assert (completed[:4] == np.array(nearest, dtype=np.uint8)).all()  # the upper half kept, quantized
    with pytest.raises(ConfigError, match="'dog' is not a class"):
        generate([f"ckpt={ckpt}", "prompt=dog", "device=cpu", f"out={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="text=a does not apply: .* is an image-token model"):
        generate([f"ckpt={ckpt}", "text=a", "device=cpu"])


def test_drawing_with_and_without_the_kv_cache_agrees(pictures, tmp_path):
    model, _ = build(compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures)))
    model.eval()
    cached = model.task.draw(model.backbone, ["c0", "c2"], 2, temperature=0.0)
    plain = model.task.draw(model.backbone, ["c0", "c2"], 2, temperature=0.0, use_cache=False)
    assert cached.shape == (4, 3, 8, 8) and torch.equal(cached, plain)


def test_init_from_an_image_model_of_another_palette_is_refused_naming_both(pictures, tmp_path):
    from mmtx.training.transfer import init_from

    train(compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures, "trainer.max_steps=1")), run_dir=tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    same, _ = build(compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures)))
    assert init_from(same, ckpt)["loaded"]  # the same palette: the weights carry over
    other, _ = build(compose("igpt_cifar_cpu", igpt_run(tmp_path, pictures, "data.palette_size=12")))
    with pytest.raises(ConfigError, match="a palette of 16 colours .* not this run's \\(12 colours"):
        init_from(other, ckpt)
