"""Shapes, backward, masks and causality of the shared backbone and its layers."""

import pytest
import torch

from mmtx.backbone import Backbone
from mmtx.batch import Tokens
from mmtx.nn import Block, CrossAttention
from mmtx.nn.attention import attention_mask


def test_backbone_shapes_and_backward():
    torch.manual_seed(0)
    model = Backbone(dim=32, depth=2, num_heads=4, drop_path=0.1, dropout=0.1)
    x = torch.randn(3, 7, 32, requires_grad=True)
    out = model(Tokens(x))
    assert out.shape == (3, 7, 32)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_backbone_does_not_leak_future_tokens():
    torch.manual_seed(0)
    model = Backbone(dim=32, depth=3, num_heads=4, causal=True).eval()
    x = torch.randn(2, 10, 32)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 32)  # change only positions 6..9
    a, b = model(Tokens(x)), model(Tokens(changed))
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_causal_gradient_flows_only_backwards():
    model = Backbone(dim=16, depth=2, num_heads=2, causal=True).eval()
    x = torch.randn(1, 8, 16, requires_grad=True)
    (model(Tokens(x))[0, 3] * torch.randn(16)).sum().backward()  # (a plain sum of LayerNorm output has no gradient)
    assert x.grad[0, 4:].abs().sum() == 0
    assert x.grad[0, :4].abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_hides_padding(causal):
    torch.manual_seed(0)
    model = Backbone(dim=32, depth=2, num_heads=4, causal=causal).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False  # sample 0 has 5 real tokens
    noisy = x.clone()
    noisy[0, 5:] = 100 * torch.randn(4, 32)  # garbage in the padding
    a, b = model(Tokens(x, mask)), model(Tokens(noisy, mask))
    torch.testing.assert_close(a[0, :5], b[0, :5])
    torch.testing.assert_close(a[1], b[1])
    # and the padded sample alone, unpadded, gives the same outputs
    alone = model(Tokens(x[:1, :5]))
    torch.testing.assert_close(alone[0], a[0, :5], atol=1e-5, rtol=1e-5)


def test_attention_mask_combines_padding_and_causality():
    key_mask = torch.tensor([[True, True, False]])
    mask, is_causal = attention_mask(key_mask, 3, 3, causal=True)
    assert not is_causal
    expected = torch.tensor([[True, False, False], [True, True, False], [True, True, False]])
    assert torch.equal(mask[0, 0], expected)
    assert attention_mask(None, 3, 3, causal=True) == (None, True)
    assert attention_mask(None, 1, 5, causal=True) == (None, False)  # one new query with a cache
    mask, _ = attention_mask(None, 2, 4, causal=True)  # two new queries after two cached positions
    assert torch.equal(mask[0, 0], torch.tensor([[True, True, True, False], [True, True, True, True]]))


def test_cross_attention_block_uses_context_and_its_mask():
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, cross_attention=True).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    ctx_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = block(x, context=ctx, context_mask=ctx_mask)
    assert out.shape == (2, 4, 16)
    ctx2 = ctx.clone()
    ctx2[1, 3:] = torch.randn(3, 16)  # padded context positions only
    torch.testing.assert_close(out, block(x, context=ctx2, context_mask=ctx_mask))
    ctx2[1, 0] += 1.0  # a real context position
    assert not torch.allclose(out[1], block(x, context=ctx2, context_mask=ctx_mask)[1])
    with pytest.raises(ValueError, match="context"):
        block(x)


def test_cross_attention_backward():
    attn = CrossAttention(16, 4)
    x, ctx = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    attn(x, ctx).sum().backward()
    assert x.grad is not None and ctx.grad is not None


def test_dim_must_divide_heads():
    with pytest.raises(ValueError, match="num_heads"):
        Backbone(dim=30, depth=1, num_heads=4)


def test_decoder_with_cross_attention_decodes_step_by_step_from_its_cache():
    """A cached step-by-step pass over a causal, cross-attending backbone equals the full pass;
    the encoder keys/values are computed once; reordering the cache follows a beam's choice."""
    torch.manual_seed(0)
    decoder = Backbone(dim=16, depth=2, num_heads=2, causal=True, cross_attention=True).eval()
    memory = torch.randn(2, 7, 16)
    memory_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    x = torch.randn(2, 6, 16)
    full = decoder(Tokens(x), context=memory, context_mask=memory_mask)
    caches = decoder.new_caches(2, 6)
    steps = [decoder(Tokens(x[:, :2]), context=memory, context_mask=memory_mask, caches=caches)]
    cross_k = caches[0].cross[0]
    for t in range(2, 6):
        steps.append(decoder(Tokens(x[:, t:t + 1]), context=memory, context_mask=memory_mask, caches=caches))
    assert caches[0].cross[0] is cross_k  # not recomputed
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

    caches = decoder.new_caches(2, 6)
    decoder(Tokens(x[:, :3]), context=memory, context_mask=memory_mask, caches=caches)
    for c in caches:
        c.reorder(torch.tensor([1, 1]))  # both rows continue hypothesis 1
    out = decoder(Tokens(x[1:2, 3:4].expand(2, 1, 16)), context=memory[[1, 1]], context_mask=memory_mask[[1, 1]],
                  caches=caches)
    torch.testing.assert_close(out[0], full[1, 3:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], full[1, 3:4], atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    from mmtx.nn.pos_embed import apply_rotary, rotary_tables

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    table = rotary_tables(32, 8)

    def score(m, n):
        return (apply_rotary(q, table[m:m + 1]) * apply_rotary(k, table[n:n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(25, 22))
    torch.testing.assert_close(score(3, 3), (q * k).sum())
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rotary_rotates_each_pair_by_its_angle(monkeypatch):
    from mmtx.nn.pos_embed import apply_rotary, rotary_tables

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, Dh)
    out = apply_rotary(x, rotary_tables(5, 8))
    t = torch.arange(5.0)[:, None]
    angle = t * 10000.0 ** (-torch.arange(0, 8, 2) / 8)  # (T, Dh/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * angle.cos() - odd * angle.sin())
    torch.testing.assert_close(out[..., 1::2], even * angle.sin() + odd * angle.cos())
    # the gradient (a hand-written backward: the inverse rotation), also of a non-contiguous input
    wide = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: apply_rotary(w.transpose(1, 2), rotary_tables(5, 8)), (wide,))
    half = apply_rotary(x.bfloat16(), rotary_tables(5, 8))  # autocast activations: rotated in float32, cast back
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # torch.compile's real-arithmetic form
    torch.testing.assert_close(apply_rotary(x, rotary_tables(5, 8)), out)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out, atol=0.05, rtol=0.02)
