"""Masked modelling (mmtx.tasks.Masked): BERT's corruption of text, MAE's dropped patches, masked spectrogram spans;
seeded masks, the [MASK] token, pretraining then fine-tuning with init_from, the low-label option, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXT, make_image_folder, small_run
from test_audio import make_tones

from mmtx import compose
from mmtx.backbone import Backbone
from mmtx.batch import IGNORE_INDEX, AudioBatch, ImageBatch, TokenBatch
from mmtx.config.validate import validate
from mmtx.errors import ConfigError
from mmtx.tasks.masked import Masked
from mmtx.tokenizers import MelTokenizer, PatchTokenizer, TokenEmbedding
from mmtx.tokenizers.text import build_vocab
from mmtx.train import train

DIM = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked_data")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(4, 2), size=32)
    make_tones(root / "fsdd" / "recordings", per_class=(10, 5))
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TINY_TEXT)
    return root


def tiny_masked(task: str, tmp_path, data_root, modality: str) -> list[str]:
    keep = [o for o in small_run(tmp_path, data_root, modality) if not o.startswith("family.")]
    return [*keep, "family.decoder.dim=16", "family.decoder.num_heads=2", "trainer.max_steps=3",
            "trainer.max_epochs=null", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1"]


def text_part(ratio=0.15):
    vocab = build_vocab("char", TINY_TEXT).with_tokens(["[MASK]"])
    return Masked(TokenEmbedding(DIM, vocab, max_len=64), DIM, mask_ratio=ratio), vocab


def test_the_mask_token_joins_every_vocabulary_at_its_end():
    for kind in ("char", "bpe"):
        vocab = build_vocab(kind, TINY_TEXT, vocab_size=300)
        with_mask = vocab.with_tokens(["[MASK]"])
        assert len(with_mask) == len(vocab) + 1 and with_mask.token_id("[MASK]") == len(vocab)
        assert with_mask.encode(TINY_TEXT[:200]) == vocab.encode(TINY_TEXT[:200])  # no id changed
        assert with_mask.with_tokens(["[MASK]"]) is with_mask


def test_bert_chooses_its_share_and_corrupts_80_10_10():
    part, vocab = text_part()
    backbone = Backbone(DIM, 1, 4)
    torch.manual_seed(0)
    ids = torch.randint(0, len(vocab) - 1, (64, 64))  # never [MASK] itself
    seen = []
    part.tokenizer.register_forward_hook(lambda module, args, out: seen.append(args[0].tokens))
    part.train()
    out = part(backbone, TokenBatch(ids))
    chosen = out.target != IGNORE_INDEX
    assert abs(chosen.float().mean().item() - 0.15) < 0.02
    assert torch.equal(out.target[chosen], ids[chosen])  # the originals are the targets
    shown = seen[0][chosen]
    as_mask = (shown == part.mask_id).float().mean().item()
    kept = (shown == ids[chosen]).float().mean().item()  # kept, or replaced by chance with the same id
    assert abs(as_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.04
    assert torch.equal(seen[0][~chosen], ids[~chosen])  # nothing else changes
    assert out.pred.shape == (64, 64, len(vocab))


def test_evaluation_masks_are_the_same_every_time_and_training_masks_follow_the_seed():
    part, vocab = text_part()
    backbone = Backbone(DIM, 1, 4)
    ids = torch.randint(0, len(vocab) - 1, (4, 32))
    part.eval()
    first = part(backbone, TokenBatch(ids)).target
    part.epoch_start_eval()
    assert torch.equal(part(backbone, TokenBatch(ids)).target, first)
    part.train()
    torch.manual_seed(5)
    a = part(backbone, TokenBatch(ids)).target
    torch.manual_seed(5)
    assert torch.equal(part(backbone, TokenBatch(ids)).target, a)


def test_mae_encodes_only_the_kept_patches():
    tokenizer = PatchTokenizer(DIM, patch_size=4, image_size=16)
    part = Masked(tokenizer, DIM, decoder={"dim": 16, "depth": 1, "num_heads": 2})
    backbone = Backbone(DIM, 1, 4)
    lengths = []
    backbone.register_forward_hook(lambda module, args, out: lengths.append(args[0].x.shape[1]))
    images = torch.randn(2, 3, 16, 16)
    out = part(backbone, ImageBatch(images))
    assert lengths == [4]  # 16 patches, 75% dropped
    assert out.pred.shape == out.target.shape == (2, 16, 4 * 4 * 3)
    assert out.weight.sum().item() == 2 * 12  # the loss counts the dropped patches only
    loss = part.loss(out, None)
    loss.backward()
    assert torch.isfinite(loss) and part.mask_token.grad is not None
    patch = out.target[0, 0]
    assert abs(patch.mean().item()) < 1e-4  # norm_pix_loss: every target patch normalised


def test_mae_kept_tokens_see_nothing_of_the_dropped_patches_through_a_conv_stem():
    # A conv stem's receptive field crosses patch borders: the dropped patches' pixels must not reach the encoder.
    tokenizer = PatchTokenizer(DIM, patch_size=4, image_size=16, stem="conv")
    part = Masked(tokenizer, DIM, decoder={"dim": 16, "depth": 1, "num_heads": 2}).eval()
    backbone = Backbone(DIM, 1, 4).eval()
    seen = []
    backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].x))
    images = torch.randn(2, 3, 16, 16)
    out = part(backbone, ImageBatch(images))
    dropped = out.weight.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 4, 4, 4).reshape(2, 3, 16, 16).bool()
    part.epoch_start_eval()  # the same masks again
    part(backbone, ImageBatch(torch.where(dropped, torch.randn_like(images) * 5, images)))
    assert torch.equal(seen[0], seen[1])
    part.epoch_start_eval()
    part(backbone, ImageBatch(torch.where(dropped, images, images + 1)))  # a kept pixel changed: seen
    assert not torch.allclose(seen[0], seen[2])


def test_masked_spectrogram_replaces_spans_of_frames_and_predicts_them():
    tokenizer = MelTokenizer(DIM, sample_rate=8000, stem="stack", stack=2)
    part = Masked(tokenizer, DIM, mask_ratio=0.5, span=2)
    audio = torch.randn(3, 8000) * 0.1
    out = part(Backbone(DIM, 1, 4), AudioBatch(audio, torch.tensor([8000, 6000, 4000])))
    assert out.pred.shape == out.target.shape and out.pred.shape[-1] == 2 * tokenizer.n_mels
    real = out.weight.sum(1)
    assert (real > 0).all() and real[2] < real[0]  # shorter clips have fewer real masked tokens
    assert torch.isfinite(part.loss(out, None))


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match=r"family.mask_ratio=1.5 is not valid"):
        validate(compose("mae_cifar_cpu", ["family.mask_ratio=1.5"]))
    with pytest.raises(ConfigError, match=r"family.decoder.dim=256 is wider than the encoder \(backbone.dim=32\)"):
        Masked(PatchTokenizer(DIM, patch_size=4, image_size=16), DIM, decoder={"dim": 256, "depth": 1, "num_heads": 4})
    vocab = build_vocab("char", TINY_TEXT)
    with pytest.raises(ConfigError, match=r"needs a vocabulary with a \[MASK\] token"):
        Masked(TokenEmbedding(DIM, vocab), DIM)


@pytest.mark.parametrize("task, modality", [("mae_cifar_cpu", "image"), ("mask_fsdd", "audio"),
                                            ("bert_shakespeare", "text")])
def test_each_recipe_pretrains_and_evaluates(task, modality, data_root, tmp_path):
    summary = train(compose(task, tiny_masked(task, tmp_path, data_root, modality)), run_dir=tmp_path / "run")
    assert summary["global_step"] == 3 and summary["test/loss"] > 0
    if modality == "text":
        assert 0 <= summary["test/acc"] <= 1


def test_pretraining_then_fine_tuning_takes_the_encoder_and_leaves_the_decoder(data_root, tmp_path):
    pre = train(compose("mae_cifar_cpu", tiny_masked("mae_cifar_cpu", tmp_path, data_root, "image")),
                run_dir=tmp_path / "pre")
    args = [*small_run(tmp_path, data_root), "trainer.max_steps=2", "trainer.max_epochs=null",
            f"init_from={pre['last_checkpoint']}", "optim.layer_decay=0.75"]
    train(compose("vit_cifar_cpu", args), run_dir=tmp_path / "fine")
    rows = [line.split("\t") for line in (tmp_path / "fine" / "init_from.tsv").read_text().splitlines()[1:]]
    status = {name: what for what, name, *_ in rows}
    assert status["tasks.main.tokenizer.proj.0.weight"] == "loaded" and status["backbone.blocks.0.attn.qkv.weight"] == "loaded"
    assert status["tasks.main.head.proj.weight"] == "new"
    assert status["tasks.main.decoder.blocks.0.attn.qkv.weight"] == "unused" and status["tasks.main.mask_token"] == "unused"


def test_label_fraction_keeps_a_seeded_share_of_every_class(data_root, tmp_path):
    from mmtx.config.wiring import build_data

    args = [*small_run(tmp_path, data_root, "audio"), "data.val_fraction=0"]
    full = build_data(compose("audio_fsdd", args))
    few = build_data(compose("audio_fsdd", [*args, "data.label_fraction=0.5"]))
    again = build_data(compose("audio_fsdd", [*args, "data.label_fraction=0.5"]))
    counts = torch.bincount(few.splits["train"]["labels"], minlength=10)
    assert torch.equal(counts, (torch.bincount(full.splits["train"]["labels"], minlength=10) * 0.5).round().long())
    assert torch.equal(few.splits["train"]["offsets"], again.splits["train"]["offsets"])  # the same share each run
    assert few.num_samples("test") == full.num_samples("test")  # evaluation keeps every sample
    with pytest.raises(ConfigError, match=r"data.label_fraction=0.01 leaves class '\w+' without a labelled sample"):
        build_data(compose("audio_fsdd", [*args, "data.label_fraction=0.01"]))


def test_a_masked_run_resumes_exactly(data_root, tmp_path):
    """The training masks come from the global random state, which a resumed run restores: 6 steps straight and
    2 + 4 resumed give the same weights."""
    from mmtx.checkpoints.io import load_checkpoint

    base = [*tiny_masked("mae_cifar_cpu", tmp_path, data_root, "image"), "trainer.max_steps=6",
            "trainer.limit_val_batches=0", "test_after_fit=false", "callbacks.last_checkpoint.every_n_steps=2",
            "data.batch_size=4"]
    straight = train(compose("mae_cifar_cpu", base), run_dir=tmp_path / "straight")
    stop = ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=2"]
    cut = train(compose("mae_cifar_cpu", [*base, *stop]), run_dir=tmp_path / "cut")
    resumed = train(compose("mae_cifar_cpu", [*base, f"resume={cut['last_checkpoint']}"]), run_dir=tmp_path / "resumed")
    assert cut["global_step"] == 2 and resumed["global_step"] == 6
    a, b = (load_checkpoint(s["last_checkpoint"])["state_dict"] for s in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_masked_member_cotrains_beside_a_classifier(data_root, tmp_path):
    """The PolyViT / 4M picture: masked spectrogram modelling and digit classification on one backbone."""
    audio = ["data.batch_size=8", "data.eval_batch_size=16", "data.source.max_seconds=1.0"]
    quoted = "[" + ",".join(f"'{o}'" for o in audio) + "]"
    args = [o for o in small_run(tmp_path, data_root) if o.startswith(("backbone.", "trainer", "paths.", "data.root"))]
    args += ["members.asr.task=mask_fsdd", "members.asr.tokenizer_from=null", "members.asr.reference=null",
             "cotrain.best=audio", f"members.audio.overrides={quoted}", f"members.asr.overrides={quoted}",
             "trainer.max_steps=4", "trainer.max_epochs=-1", "trainer.limit_val_batches=2"]
    summary = train(compose("cotrain_fsdd", args), run_dir=tmp_path / "run")
    assert summary["global_step"] == 4 and {"audio/test/acc", "asr/test/loss"} <= set(summary)


def test_validation_logs_reconstructions_and_masked_text(data_root, tmp_path, monkeypatch):
    import mmtx.tasks.masked as masked

    logged = []
    monkeypatch.setattr(masked, "log_media", lambda trainer, key, captions, images=None: logged.append((key, captions, images)))
    monkeypatch.setattr(masked, "log_text_table", lambda trainer, key, columns, rows: logged.append((key, columns, rows)))
    first = []
    for task, modality in (("mae_cifar_cpu", "image"), ("mask_fsdd", "audio"), ("bert_shakespeare", "text")):
        logged.clear()
        train(compose(task, [*tiny_masked(task, tmp_path, data_root, modality), "family.media_samples=2",
                             "test_after_fit=false"]), run_dir=tmp_path / task)
        first.append(logged[0])  # every validation logs the same inputs; the first is checked
    (image_key, captions, images), (audio_key, _, spectrograms), (text_key, columns, rows) = first
    assert image_key == "val_reconstructions" and captions[:3] == ["0: masked", "0: reconstructed", "0: original"]
    assert images.shape[1:] == (3, 32, 32) and len(images) == len(captions) and len(images) % 3 == 0
    assert 0 <= images.min() and images.max() <= 1
    assert audio_key == "val_reconstructions" and spectrograms.shape[:2] == (6, 3)  # 2 clips, 3 pictures each
    assert text_key == "val_masked" and columns[1:] == ["input", "predicted", "original"] and len(rows) == 2
    assert "[MASK]" in rows[0][1]


def test_a_headless_timm_vit_starts_mae_pretraining(data_root, tmp_path):
    """timm's MAE weights (vit_base_patch16_224.mae: a ViT without a classifier) load into the masked family;
    a headless ViT-Ti with random weights stands in for them here."""
    from conftest import timm_reference

    reference = timm_reference(tmp_path / "vit_tiny_headless.safetensors", num_classes=0)
    keep = [o for o in small_run(tmp_path, data_root) if not o.startswith(("backbone.", "tokenizer.", "family."))]
    args = [*keep, "init_from=timm:vit_tiny_patch16_224", f"finetune.pretrained_file={reference}",
            "data.source.image_size=32", "family.decoder.dim=96", "family.decoder.num_heads=3", "trainer.max_steps=2",
            "trainer.max_epochs=null"]
    summary = train(compose("mae_cifar_cpu", args), run_dir=tmp_path / "run")
    assert summary["global_step"] == 2
    table = (tmp_path / "run" / "init_from.tsv").read_text()
    assert "loaded\tbackbone.blocks.11.mlp.fc2.weight" in table and "resampled\ttasks.main.tokenizer.pos.table" in table
    assert "new\ttasks.main.decoder.blocks.0.attn.qkv.weight" in table  # MAE's decoder starts anew
