"""Patch tokenizer, 2D positional encodings and the classifier head."""

import pytest
import torch

from mmtx.batch import Tokens
from mmtx.tasks.classification import ClassifierHead
from mmtx.nn.pos_embed import sincos_2d
from mmtx.tokenizers import PatchTokenizer
from mmtx.batch import ImageBatch


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_patch_tokenizer_shapes_and_backward(pos_embed):
    tok = PatchTokenizer(dim=32, patch_size=4, image_size=16, pos_embed=pos_embed)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    tokens = tok(ImageBatch(images))
    assert tokens.x.shape == (2, 16, 32) and tokens.mask is None
    tokens.x.sum().backward()
    assert images.grad is not None and tok.proj.weight.grad is not None


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_conv_stem_gives_the_patch_stems_grid(patch_size):
    tok = PatchTokenizer(dim=32, patch_size=patch_size, image_size=16, stem="conv")
    convs = [m for m in tok.proj if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == patch_size.bit_length()  # log2(p) stride-2 3x3 convolutions + the 1x1 projection
    assert [c.stride for c in convs[:-1]] == [(2, 2)] * (len(convs) - 1) and convs[-1].kernel_size == (1, 1)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    tokens = tok(ImageBatch(images))
    assert tokens.x.shape == (2, (16 // patch_size) ** 2, 32)
    tokens.x.sum().backward()
    assert images.grad is not None and all(c.weight.grad is not None for c in convs)
    assert tok(ImageBatch(torch.randn(1, 3, 32, 16))).x.shape == (1, (32 // patch_size) * (16 // patch_size), 32)
    wide = PatchTokenizer(dim=32, patch_size=patch_size, image_size=16, stem="conv", stem_width=24)
    assert [c.out_channels for c in wide.proj if isinstance(c, torch.nn.Conv2d)] == [24 * 2**i for i in range(len(convs) - 1)] + [32]


def test_conv_stem_and_unknown_stem_errors():
    with pytest.raises(ValueError, match="power-of-two tokenizer.patch_size"):
        PatchTokenizer(dim=32, patch_size=6, image_size=24, stem="conv")
    with pytest.raises(ValueError, match="tokenizer.stem must be 'patch' or 'conv', got 'resnet'"):
        PatchTokenizer(dim=32, patch_size=4, image_size=16, stem="resnet")


def test_sincos_2d_halves_encode_x_and_y():
    enc = sincos_2d(4, 5, 16).reshape(4, 5, 16)  # (rows=y, cols=x, D)
    x_half, y_half = enc[..., :8], enc[..., 8:]
    # the x half is the same along a column (varies with x only), the y half along a row
    assert torch.allclose(x_half, x_half[:1].expand_as(x_half))
    assert torch.allclose(y_half, y_half[:, :1].expand_as(y_half))
    # every position is distinct, and (x, y) differs from (y, x)
    flat = enc.reshape(20, 16)
    assert torch.cdist(flat, flat).add(torch.eye(20)).min() > 1e-3
    square = sincos_2d(4, 4, 16).reshape(4, 4, 16)
    assert not torch.allclose(square[1, 2], square[2, 1])


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_resolution_change(pos_embed):
    tok = PatchTokenizer(dim=32, patch_size=4, image_size=16, pos_embed=pos_embed)
    assert tok(ImageBatch(torch.randn(1, 3, 32, 24))).x.shape == (1, 8 * 6, 32)
    # back to the training grid: the original encodings again
    a = tok(ImageBatch(torch.zeros(1, 3, 16, 16))).x
    tok(ImageBatch(torch.zeros(1, 3, 32, 32)))
    torch.testing.assert_close(a, tok(ImageBatch(torch.zeros(1, 3, 16, 16))).x)


def test_learned_positions_resample_to_new_grid():
    tok = PatchTokenizer(dim=8, patch_size=2, image_size=4, pos_embed="learned")  # 2x2 grid
    table = tok.pos(4, 4).reshape(4, 4, 8)  # upsampled to 4x4
    torch.testing.assert_close(table[0, 0, :4], tok.pos.x[0])
    torch.testing.assert_close(table[0, -1, :4], tok.pos.x[-1])
    torch.testing.assert_close(table[-1, 0, 4:], tok.pos.y[-1])


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="not divisible by tokenizer.patch_size=4"):
        PatchTokenizer(dim=32, patch_size=4, image_size=30)
    tok = PatchTokenizer(dim=32, patch_size=4, image_size=16)
    with pytest.raises(ValueError, match="18x16 is not divisible"):
        tok(ImageBatch(torch.zeros(1, 3, 18, 16)))


def test_unknown_pos_embed():
    with pytest.raises(ValueError, match="tokenizer.pos_embed"):
        PatchTokenizer(dim=32, patch_size=4, image_size=16, pos_embed="rope")


def test_classifier_head_cls_and_mean():
    x = torch.randn(2, 5, 16)
    cls = ClassifierHead(16, 7, pool="cls")
    tokens = cls.prepare(Tokens(x))
    assert tokens.x.shape == (2, 6, 16)
    logits = cls(tokens.x)
    assert logits.shape == (2, 7)
    # without a backbone in between, the CLS output is the CLS token itself
    torch.testing.assert_close(logits, cls.proj(cls.pool.token[0].expand(2, -1)))
    logits.sum().backward()
    assert cls.pool.token.grad is not None

    mean = ClassifierHead(16, 7, pool="mean")
    assert mean.prepare(Tokens(x)).x is x
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    garbage = x.clone()
    garbage[0, 3:] = 1e3
    torch.testing.assert_close(mean(x, mask), mean(garbage, mask))
    torch.testing.assert_close(mean(x[:1, :3])[0], mean(x, mask)[0])


def test_cls_prepare_extends_the_mask():
    head = ClassifierHead(8, 3, pool="cls")
    tokens = head.prepare(Tokens(torch.randn(2, 4, 8), torch.tensor([[True, True, False, False]] * 2)))
    assert tokens.mask.shape == (2, 5) and tokens.mask[:, 0].all()


def test_bad_pool():
    with pytest.raises(ValueError, match="family.pool"):
        ClassifierHead(8, 3, pool="max")
