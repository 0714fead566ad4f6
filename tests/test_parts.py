"""Unit tests of the parts every task is assembled from: a shape-and-backward test for each tokenizer and
head, the weight tying of the language model and the encoder-decoder, and the soft-target loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtx.backbone import Backbone
from mmtx.batch import AudioBatch, ImageBatch, PairBatch, TokenBatch, Tokens
from mmtx.heads import ClassifierHead, LMHead, Seq2SeqHead
from mmtx.tokenizers import MelTokenizer, PatchTokenizer, TokenEmbedding

DIM = 32


def _backward_reaches_every_parameter(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.float().square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("stem", ["stack", "conv"])
def test_mel_tokenizer_shapes_mask_and_backward(stem):
    tok = MelTokenizer(DIM, sample_rate=8000, stem=stem, stack=3, spec_augment=None)
    audio, lengths = torch.randn(2, 4000), torch.tensor([4000, 2000])
    tokens = tok(AudioBatch(audio, lengths))
    B, T, D = tokens.x.shape
    assert (B, D) == (2, DIM) and tokens.mask.shape == (2, T)
    assert tokens.mask[0].all() and 0 < tokens.mask[1].sum() < T  # the shorter clip's padding is masked
    _backward_reaches_every_parameter(tok, tokens.x)


def test_token_embedding_shapes_positions_and_backward():
    tok = TokenEmbedding(DIM, 50, max_len=8)
    ids = torch.randint(0, 50, (3, 8))
    tokens = tok(TokenBatch(ids, mask=ids > 0))
    assert tokens.x.shape == (3, 8, DIM) and torch.equal(tokens.mask, ids > 0)
    later = tok(TokenBatch(ids[:, :1]), start=5).x  # one token at position 5: its own position added
    torch.testing.assert_close(later[:, 0], tok.embed(ids[:, 0]) + tok.pos[5])
    _backward_reaches_every_parameter(tok, tokens.x)


def test_patch_tokenizer_and_classifier_head_backward():
    tok, head = PatchTokenizer(DIM, image_size=16, patch_size=4), ClassifierHead(DIM, 5, pool="cls")
    tokens = head.prepare(tok(ImageBatch(torch.randn(2, 3, 16, 16))))
    assert tokens.x.shape == (2, 1 + 16, DIM)
    logits = head(tokens.x, tokens.mask)
    assert logits.shape == (2, 5)
    _backward_reaches_every_parameter(torch.nn.ModuleList([tok, head]), logits)


def test_lm_head_shapes_and_backward():
    head = LMHead(DIM, 40)
    x = torch.randn(2, 7, DIM)
    assert head.prepare(Tokens(x)).x is x
    logits = head(x)
    assert logits.shape == (2, 7, 40)
    _backward_reaches_every_parameter(head, logits)


def test_seq2seq_head_shapes_and_backward():
    head = Seq2SeqHead(DIM, 30, depth=1, num_heads=4, max_len=10)
    memory, memory_mask = torch.randn(2, 6, DIM), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    logits = head(memory, memory_mask, torch.randint(0, 30, (2, 9)))
    assert logits.shape == (2, 9, 30)
    _backward_reaches_every_parameter(head, logits)


def test_the_language_model_ties_its_output_to_its_input_embedding():
    from mmtx.lm import LMModule

    model = LMModule(TokenEmbedding(DIM, 40, max_len=8), Backbone(DIM, 1, 4, causal=True), LMHead(DIM, 40), optim={})
    assert model.head.proj.weight is model.tokenizer.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n != "head.proj.weight")
    ids = torch.randint(0, 40, (2, 8))
    logits = model(TokenBatch(ids))
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert model.tokenizer.embed.weight.grad is not None  # one tensor: both uses add to its gradient


def test_the_encoder_decoder_ties_source_target_and_output_embeddings():
    from mmtx.seq2seq import Seq2SeqModule
    from mmtx.tokenizers.text import build_vocab

    vocab = build_vocab("char", "abcdef", special_tokens=["<pad>", "<s>", "</s>"])
    model = Seq2SeqModule(TokenEmbedding(DIM, vocab, max_len=8), Backbone(DIM, 1, 4),
                          Seq2SeqHead(DIM, vocab, depth=1, num_heads=4, max_len=8), optim={}, bos_id=1, eos_id=2)
    shared = model.head.embed.embed.weight
    assert model.tokenizer.embed.weight is shared and model.head.proj.weight is shared
    untied = Seq2SeqModule(TokenEmbedding(DIM, vocab, max_len=8), Backbone(DIM, 1, 4),
                           Seq2SeqHead(DIM, vocab, depth=1, num_heads=4, max_len=8), optim={}, bos_id=1, eos_id=2,
                           tie_embeddings=False)
    assert untied.tokenizer.embed.weight is not untied.head.embed.embed.weight
    assert untied.head.proj.weight is untied.head.embed.embed.weight  # the decoder's own output stays tied
    batch = PairBatch(TokenBatch(torch.randint(3, len(vocab), (2, 5))),
                      TokenBatch(torch.randint(3, len(vocab), (2, 4)), targets=torch.randint(3, len(vocab), (2, 4))))
    model.loss(model(batch), batch).backward()
    assert shared.grad is not None


def test_soft_targets_get_the_same_label_smoothing_as_hard_labels():
    from mmtx.module import ClassificationModule

    model = ClassificationModule(PatchTokenizer(DIM, image_size=8, patch_size=4), Backbone(DIM, 1, 4),
                                 ClassifierHead(DIM, 4), num_classes=4, optim={}, label_smoothing=0.1)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    images = torch.zeros(6, 3, 8, 8)
    hard = model.loss(logits, ImageBatch(images, labels))
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, label_smoothing=0.1))
    one_hot = F.one_hot(labels, 4).float()  # Mixup with lambda = 1: the soft targets are the labels
    torch.testing.assert_close(model.loss(logits, ImageBatch(images, labels, soft_label=one_hot)), hard)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)  # a real mix: smoothed, then cross-entropy against it
    target = mixed * 0.9 + 0.1 / 4
    expected = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(model.loss(logits, ImageBatch(images, labels, soft_label=mixed)), expected)


def test_the_language_model_runs_a_bidirectional_backbone_causally():
    """Causality belongs to the LM, not to the backbone's configuration: the same weights can serve a classifier."""
    from mmtx.lm import LMModule

    torch.manual_seed(0)
    model = LMModule(TokenEmbedding(DIM, 40, max_len=8), Backbone(DIM, 2, 4), LMHead(DIM, 40), optim={}).eval()
    ids = torch.randint(0, 40, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 1) % 40  # change only the future of position 4
    with torch.no_grad():
        a, b = model(TokenBatch(ids)), model(TokenBatch(changed))
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0..4 do not see tokens 5..7
    assert not torch.allclose(a[:, 5:], b[:, 5:])
