"""Unit tests of the parts every task is assembled from: a shape-and-backward test for each tokenizer and
head, the weight tying of the language model and the encoder-decoder, the soft-target loss, and several
task parts on one backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtx.backbone import Backbone
from mmtx.batch import AudioBatch, ImageBatch, PairBatch, TokenBatch
from mmtx.module import MmtxModule
from mmtx.tasks import Classification, LanguageModel, Seq2Seq
from mmtx.tasks.classification import ClassifierHead
from mmtx.tasks.seq2seq import TextDecoder
from mmtx.tokenizers.text import build_vocab
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


STACK = {"depth": 1, "num_heads": 4}  # a decoder stack spec (the rest: Backbone's defaults)


def _vocab():
    return build_vocab("char", "abcdef", special_tokens=["<pad>", "<s>", "</s>"])


def _lm(depth: int = 1, vocab_size: int = 40) -> MmtxModule:
    tok = TokenEmbedding(DIM, vocab_size, max_len=8)
    return MmtxModule(Backbone(DIM, depth, 4), {"main": LanguageModel(tok, DIM)}, optim={})


def _seq2seq(tie: bool = True) -> MmtxModule:
    vocab = _vocab()
    part = Seq2Seq(TokenEmbedding(DIM, vocab, max_len=8), DIM, vocab, bos_id=1, eos_id=2, decoder=STACK,
                   max_len=8, tie_embeddings=tie)
    return MmtxModule(Backbone(DIM, 1, 4), {"main": part}, optim={})


def test_patch_tokenizer_and_classifier_head_backward():
    tok, head = PatchTokenizer(DIM, image_size=16, patch_size=4), ClassifierHead(DIM, 5, pool="cls")
    tokens = head.prepare(tok(ImageBatch(torch.randn(2, 3, 16, 16))))
    assert tokens.x.shape == (2, 1 + 16, DIM)
    logits = head(tokens.x, tokens.mask)
    assert logits.shape == (2, 5)
    _backward_reaches_every_parameter(torch.nn.ModuleList([tok, head]), logits)


def test_the_classification_part_masks_padding_out_of_its_mean_pool():
    part = Classification(MelTokenizer(DIM, sample_rate=8000, spec_augment=None), DIM, num_classes=3, pool="mean")
    backbone = Backbone(DIM, 1, 4).eval()
    audio = torch.randn(1, 4000)
    padded = torch.cat([audio, torch.randn(1, 4000) * 100], 1)  # loud noise where the clip has ended
    with torch.no_grad():
        short = part(backbone, AudioBatch(audio, torch.tensor([4000])))
        long = part(backbone, AudioBatch(padded, torch.tensor([4000])))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)


def test_the_language_model_head_shapes_and_backward():
    model = _lm()
    ids = torch.randint(0, 40, (2, 7))
    logits = model(TokenBatch(ids))
    assert logits.shape == (2, 7, 40)
    _backward_reaches_every_parameter(model, logits)


def test_the_text_decoder_shapes_and_backward():
    decoder = TextDecoder(DIM, 30, STACK, max_len=10)
    memory, memory_mask = torch.randn(2, 6, DIM), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    logits = decoder(torch.randint(0, 30, (2, 9)), memory, memory_mask)
    assert logits.shape == (2, 9, 30)
    _backward_reaches_every_parameter(decoder, logits)


def test_the_decoder_stack_keeps_every_setting_of_its_spec():
    spec = {"depth": 2, "num_heads": 4, "attn_dropout": 0.1, "drop_path": 0.2, "qkv_bias": False, "bias": False}
    stack = TextDecoder(DIM, 30, spec).stack
    assert stack.depth == 2 and stack.causal and stack.blocks[0].cross_attn is not None
    assert stack.blocks[0].attn.qkv.bias is None and stack.norm.bias is None
    assert stack.blocks[0].attn.attn_dropout == 0.1 and stack.blocks[1].drop_path.drop_prob == pytest.approx(0.2)


def test_the_language_model_ties_its_output_to_its_input_embedding():
    model = _lm()
    part = model.task
    assert part.head.proj.weight is part.tokenizer.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters(remove_duplicate=False) if not n.endswith("head.proj.weight"))
    ids = torch.randint(0, 40, (2, 8))
    F.cross_entropy(model(TokenBatch(ids)).flatten(0, 1), ids.flatten()).backward()
    assert part.tokenizer.embed.weight.grad is not None  # one tensor: both uses add to its gradient


def test_the_encoder_decoder_ties_source_target_and_output_embeddings():
    model = _seq2seq()
    part = model.task
    shared = part.decoder.embed.embed.weight
    assert part.tokenizer.embed.weight is shared and part.decoder.head.proj.weight is shared
    untied = _seq2seq(tie=False).task
    assert untied.tokenizer.embed.weight is not untied.decoder.embed.embed.weight
    assert untied.decoder.head.proj.weight is untied.decoder.embed.embed.weight  # the decoder's own output stays tied
    V = len(part.tgt_vocab)
    batch = PairBatch(TokenBatch(torch.randint(3, V, (2, 5))),
                      TokenBatch(torch.randint(3, V, (2, 4)), targets=torch.randint(3, V, (2, 4))))
    logits = model(batch)
    F.cross_entropy(logits.flatten(0, 1), batch.target.targets.flatten()).backward()
    assert shared.grad is not None


def test_soft_targets_get_the_same_label_smoothing_as_hard_labels():
    part = Classification(PatchTokenizer(DIM, image_size=8, patch_size=4), DIM, num_classes=4, label_smoothing=0.1)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    images = torch.zeros(6, 3, 8, 8)
    hard = part.loss(logits, ImageBatch(images, labels))
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, label_smoothing=0.1))
    one_hot = F.one_hot(labels, 4).float()  # Mixup with lambda = 1: the soft targets are the labels
    torch.testing.assert_close(part.loss(logits, ImageBatch(images, labels, soft_label=one_hot)), hard)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)  # a real mix: smoothed, then cross-entropy against it
    target = mixed * 0.9 + 0.1 / 4
    expected = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(part.loss(logits, ImageBatch(images, labels, soft_label=mixed)), expected)


def test_the_language_model_runs_a_bidirectional_backbone_causally():
    """Causality belongs to the LM, not to the backbone's configuration: the same weights can serve a classifier."""
    torch.manual_seed(0)
    model = _lm(depth=2).eval()
    assert not model.backbone.causal
    ids = torch.randint(0, 40, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 1) % 40  # change only the future of position 4
    with torch.no_grad():
        a, b = model(TokenBatch(ids)), model(TokenBatch(changed))
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0..4 do not see tokens 5..7
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_two_task_parts_share_one_backbone():
    """Co-training is a list: an image classifier and a language model on the same backbone weights; one
    step's loss is the sum of theirs and the backbone's gradient gets both."""
    torch.manual_seed(0)
    backbone = Backbone(DIM, 1, 4)
    image = Classification(PatchTokenizer(DIM, image_size=8, patch_size=4), DIM, num_classes=3, media_samples=0)
    text = LanguageModel(TokenEmbedding(DIM, 20, max_len=6), DIM)
    model = MmtxModule(backbone, {"image": image, "text": text}, optim={})
    batches = {"image": ImageBatch(torch.randn(2, 3, 8, 8), torch.tensor([0, 2])),
               "text": TokenBatch(torch.randint(0, 20, (2, 6)), targets=torch.randint(0, 20, (2, 6)))}
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no trainer: record what is logged
    outputs = model(batches)
    assert outputs["image"].shape == (2, 3) and outputs["text"].shape == (2, 6, 20)
    loss = image.loss(outputs["image"], batches["image"]) + F.cross_entropy(
        outputs["text"].flatten(0, 1), batches["text"].targets.flatten())
    total = model.shared_step(batches, "val")
    torch.testing.assert_close(total, loss)
    assert {"image/val/loss", "image/val/acc", "text/val/loss"} <= set(logged)
    total.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    with pytest.raises(RuntimeError, match="2 task parts"):
        model.task


def test_weight_decay_reaches_matrices_only_not_positions_cls_biases_or_norms():
    from mmtx.training.optim import param_groups

    vit = MmtxModule(Backbone(DIM, 1, 4), {"main": Classification(
        PatchTokenizer(DIM, image_size=8, patch_size=4, pos_embed="learned"), DIM, num_classes=3)}, optim={})
    decay, no_decay = param_groups(vit, 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    decayed, kept = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"tasks.main.head.pool.token", "tasks.main.tokenizer.pos.x", "tasks.main.tokenizer.pos.y",
            "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"} <= kept
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight", "tasks.main.head.proj.weight",
            "tasks.main.tokenizer.proj.weight"} <= decayed
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())

    lm = _lm()  # the tied embedding is one parameter, decayed once; its learned positions are not decayed
    decay, no_decay = param_groups(lm, 0.1)
    assert sum(p is lm.task.tokenizer.embed.weight for p in decay["params"]) == 1
    assert any(p is lm.task.tokenizer.pos for p in no_decay["params"])


def test_validation_media_are_stratified_over_classes():
    """A class-sorted validation split (as a hold-out can be) still shows every class, in a fixed order."""
    from types import SimpleNamespace

    part = Classification(PatchTokenizer(DIM, image_size=8, patch_size=4), DIM, num_classes=3, media_samples=4,
                          class_names=["a", "b", "c"])
    ctx = SimpleNamespace(trainer=SimpleNamespace(datamodule=None))
    for label in (0, 0, 1, 2):  # batches of one class each, in class order
        labels = torch.full((5,), label)
        part._keep_media(ImageBatch(torch.rand(5, 3, 8, 8), labels), labels)
    media = part._media_to_log(part._media, ctx)
    assert [c.split(" / ")[0] for c in media["captions"]] == ["true a", "true b", "true c", "true a"]
    assert media["images"].shape == (4, 3, 8, 8)
