"""Several modalities in one sequence: paired multimodal samples, the fused tokenizer, fused classification and the
contrastive family (av_digits, av_digits_clip)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_image_folder, small_run
from test_audio import make_tones

from mmtx import build, compose
from mmtx.batch import AudioBatch, FusedBatch, ImageBatch, PairBatch
from mmtx.data.fused import pair_by_class
from mmtx.errors import ConfigError
from mmtx.tasks.contrastive import info_nce, recall_at, zero_shot_accuracy
from mmtx.tokenizers import MelTokenizer, PatchTokenizer
from mmtx.tokenizers.fused import FusedTokenizer
from mmtx.train import train
from mmtx.training.transfer import init_from

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def av_root(tmp_path_factory) -> Path:
    """Written digits (8x8 images of classes 0 and 1) and spoken ones (tones of classes 0 and 1), FSDD's layout."""
    root = tmp_path_factory.mktemp("av")
    make_image_folder(root / "digits", classes=("0", "1"), per_class=(10, 4), size=8)
    make_tones(root / "fsdd" / "recordings", per_class=(10, 5))
    return root


def av_run(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return [*small_run(tmp_path, root, "fused"), "trainer.max_epochs=1", *extra]


def fused_tokenizer(dim: int = 16) -> FusedTokenizer:
    image = PatchTokenizer(dim=dim, image_size=(8, 8), patch_size=2)
    audio = MelTokenizer(dim=dim, sample_rate=8000, spec_augment=None)
    return FusedTokenizer({"image": image, "audio": audio}, dim=dim)


def fused_batch(n: int = 3, present=None) -> FusedBatch:
    image = ImageBatch(torch.randn(n, 3, 8, 8))
    audio = AudioBatch(torch.randn(n, 4000) * 0.1, torch.tensor([4000, 2000, 3000][:n]))
    return FusedBatch({"image": image, "audio": audio}, torch.tensor([0, 1, 0][:n]), present)


def test_fused_tokens_are_the_fields_tokens_with_their_segment_vectors_joined():
    tok = fused_tokenizer()
    batch = fused_batch()
    tokens = tok(batch)
    image, audio = tok.fields["image"](batch.fields["image"]), tok.fields["audio"](batch.fields["audio"])
    assert tokens.x.shape == (3, 16 + audio.x.shape[1], 16)
    torch.testing.assert_close(tokens.x[:, :16], image.x + tok.segment[0])
    torch.testing.assert_close(tokens.x[:, 16:], audio.x + tok.segment[1])
    assert tokens.mask[:, :16].all() and torch.equal(tokens.mask[:, 16:], audio.mask)  # the clips' padding kept
    tokens.x.sum().backward()
    assert tok.segment.grad is not None and tok.fields["image"].proj.weight.grad is not None


def test_a_missing_field_is_masked_out_and_changes_nothing_a_classifier_sees():
    from mmtx.backbone import Backbone
    from mmtx.tasks.classification import ClassifierHead

    torch.manual_seed(0)
    tok, backbone, head = fused_tokenizer(), Backbone(dim=16, depth=1, num_heads=2), ClassifierHead(16, 2, pool="mean")
    backbone.eval()
    no_image = {"image": torch.tensor([False, False, False]), "audio": torch.ones(3, dtype=torch.bool)}
    batch = fused_batch(present=no_image)
    tokens = tok(batch)
    assert not tokens.mask[:, :16].any()
    other = fused_batch(present=no_image)  # other images, the same clips: the output must not change
    other.fields["audio"] = batch.fields["audio"]
    out = head(backbone(tokens), tokens.mask)
    torch.testing.assert_close(out, head(backbone(tok(other)), tok(other).mask))


def test_pairing_by_class_is_seeded_balanced_and_leaves_out_classes_a_field_lacks(caplog):
    anchor = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    other = torch.tensor([1, 0, 1, 0, 1])  # no class 2
    pairs = pair_by_class({"audio": anchor, "image": other}, "audio", seed=3, split="val")
    assert pairs["audio"].tolist() == [0, 1, 2, 3, 4, 5]  # the class-2 sample is left out, with a warning
    assert "no val sample of class id(s) [2]" in caplog.text
    assert torch.equal(other[pairs["image"]], anchor[pairs["audio"]])  # every pair of one class
    assert sorted(pairs["image"][:4].tolist()) == [1, 1, 3, 3]  # each class-0 image used equally often
    again = pair_by_class({"audio": anchor, "image": other}, "audio", seed=3, split="val")
    assert torch.equal(again["image"], pairs["image"])


def test_paired_data_gives_fused_batches_of_one_class_per_sample(av_root, tmp_path):
    cfg = compose("av_digits", av_run(tmp_path, av_root, "data.field_dropout=0.5"))
    model, dm = build(cfg)
    assert dm.classes == ["0", "1"] and set(dm.splits) == {"train", "val", "test"}
    assert dm.num_samples("train") == len(dm.fields["audio"].splits["train"]["labels"])  # the larger field is the anchor
    index = {"index": torch.arange(8), "split": "train"}
    torch.manual_seed(0)
    batch = dm.on_after_batch_transfer(index)
    assert isinstance(batch, FusedBatch) and set(batch.fields) == {"image", "audio"}
    assert batch.fields["image"].image.shape == (8, 3, 8, 8)
    assert torch.equal(batch.fields["image"].label, batch.label) and torch.equal(batch.fields["audio"].label, batch.label)
    lost = ~batch.present["image"] | ~batch.present["audio"]
    assert lost.any() and (batch.present["image"] | batch.present["audio"]).all()  # one field at most is dropped
    logits = model.task(model.backbone, batch)
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()
    assert model.task.tokenizer.names == ["image", "audio"]


def test_one_field_alone_has_the_same_samples_and_a_tokenizer_of_that_field(av_root, tmp_path):
    cfg = compose("av_digits", av_run(tmp_path, av_root, "data.use=[image]"))
    model, dm = build(cfg)
    _, both = build(compose("av_digits", av_run(tmp_path, av_root)))
    assert model.task.tokenizer.names == ["image"]
    assert dm.num_samples("train") == both.num_samples("train")  # the same samples: the same steps
    batch = dm.on_after_batch_transfer({"index": torch.arange(2), "split": "val"})
    assert set(batch.fields) == {"image"}


def test_field_subsets_show_each_training_sample_with_all_its_fields_and_with_each_alone(av_root, tmp_path):
    _, dm = build(compose("av_digits", av_run(tmp_path, av_root, "data.field_subsets=true")))
    batch = dm.on_after_batch_transfer({"index": torch.arange(4), "split": "train"})
    assert batch.fields["audio"].audio.shape[0] == 12 and torch.equal(batch.label, batch.label[:4].repeat(3))
    image, audio = batch.present["image"], batch.present["audio"]
    assert image.tolist() == [True] * 8 + [False] * 4 and audio.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    val = dm.on_after_batch_transfer({"index": torch.arange(2), "split": "val"})
    assert val.present is None and len(val.label) == 2  # evaluation sees each sample once, with every field


def test_evaluation_without_a_field_and_with_fixed_noise(av_root, tmp_path):
    cfg = compose("av_digits", av_run(tmp_path, av_root, "data.eval_missing=[image]", "data.noise.image=0.5"))
    _, dm = build(cfg)
    val = {"index": torch.arange(4), "split": "test"}
    a, b = dm.on_after_batch_transfer(val), dm.on_after_batch_transfer(val)
    assert not a.present["image"].any() and a.present["audio"].all()
    torch.testing.assert_close(a.fields["image"].image, b.fields["image"].image)  # the same noise each evaluation
    clean = build(compose("av_digits", av_run(tmp_path, av_root)))[1].on_after_batch_transfer(val)
    assert not torch.allclose(a.fields["image"].image, clean.fields["image"].image)
    assert dm.on_after_batch_transfer({"index": torch.arange(4), "split": "train"}).present is None


@pytest.mark.parametrize("override, message", [
    ("data.use=[video]", r"data.use names \['video'\], which data.fields does not have"),
    ("data.eval_missing=[image,audio]", "leaves the evaluated samples no field"),
    ("~tokenizer.fields.audio", "data.fields.audio has no tokenizer: add tokenizer.fields.audio"),
    ("data.use=[image] data.field_subsets=true", "data.field_subsets=true shows every sample"),
    ("data.field_dropout=0.5 data.field_subsets=true", r"data.field_dropout=0.5 drops fields too.*data.field_dropout=0"),
])
def test_bad_fused_settings_name_the_key(av_root, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        build(compose("av_digits", av_run(tmp_path, av_root, *override.split())))


def test_a_trained_fused_classifier_loads_from_its_checkpoint_alone(av_root, tmp_path):
    import mmtx

    cfg = compose("av_digits", av_run(tmp_path, av_root, "data.field_dropout=0.3"))
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["global_step"] >= 1
    model = mmtx.load(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    assert model.kind == "classification" and model.part.tokenizer.names == ["image", "audio"]
    _, dm = build(cfg)
    batch = dm.on_after_batch_transfer({"index": torch.arange(4), "split": "test"})
    probs = model.part.predict(model.module.backbone, batch)
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(-1), torch.ones(4))
    with pytest.raises(ConfigError, match="several fields in one sequence"):
        model.predict([av_root / "digits" / "test" / "0" / "000.png"])


# -- a prefix LM after the fused fields -----------------------------------------------------------------------------

def test_av_digits_words_writes_the_class_word_after_both_fields_and_loads_alone(av_root, tmp_path):
    import mmtx
    from mmtx.eval import evaluate

    cfg = compose("av_digits_words", av_run(tmp_path, av_root, "data.field_dropout=0.5"))
    _, dm = build(cfg)
    batch = dm.on_after_batch_transfer({"index": torch.arange(3), "split": "test"})
    assert isinstance(batch, PairBatch) and isinstance(batch.source, FusedBatch)
    words = [{"0": "zero", "1": "one"}[dm.classes[i]] for i in batch.source.label.tolist()]
    assert batch.refs == words
    vocab = dm.tgt_vocab
    for row, word in zip(range(3), words):  # BOS + the word's characters; the characters + EOS
        n = len(word)
        assert batch.target.tokens[row, 0] == vocab.token_id("<s>")
        assert vocab.decode(batch.target.tokens[row, 1:1 + n].tolist()) == word
        assert batch.target.targets[row, n] == vocab.token_id("</s>") and (batch.target.targets[row, n + 1:] < 0).all()

    summary = train(cfg, run_dir=tmp_path / "run")
    assert 0.0 <= summary["test/wer"] <= 1.0 and 0.0 <= summary["test/cer"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    missing = evaluate(str(ckpt), ["data.eval_missing=[image]"])
    assert 0.0 <= missing["test/wer"] <= 1.0
    model = mmtx.load(ckpt, device="cpu")  # without its data: the fields' geometry and the captions' vocabulary
    assert model.kind == "prefix_lm" and model.part.tokenizer.names == ["image", "audio"]
    hyps = model.part.translate(model.module.backbone, batch.source)
    assert len(hyps) == 3 and all(isinstance(h, str) for h in hyps)
    with pytest.raises(ConfigError, match="several inputs in one sequence"):
        model.generate(audio=str(next((av_root / "fsdd" / "recordings").glob("*.wav"))))


def test_a_class_without_a_caption_is_named(av_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.captions has no text for class\(es\) \['1'\]"):
        build(compose("av_digits_words", av_run(tmp_path, av_root, "data.captions.1=null")))


# -- contrastive ----------------------------------------------------------------------------------------------------

def test_info_nce_is_low_for_aligned_pairs_and_recall_counts_a_right_class():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(20.0)
    assert info_nce(a, a, scale) < info_nce(a, a.roll(1, 0), scale)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert recall_at(a, a, labels, labels, 1) == 1.0
    keys = a.roll(1, 0)  # key i is the query i-1's: a right class only where neighbours share one
    assert recall_at(a, keys, labels, labels.roll(1, 0), 1) == 1.0
    protos = torch.eye(3)[labels]  # each class's keys point one way
    assert zero_shot_accuracy(protos, protos, labels, labels, 3) == 1.0


def _ddp_info_nce(rank: int, world: int, init: str, a: torch.Tensor, b: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows = slice(rank * 4, rank * 4 + 4)
    mine_a, mine_b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    loss = info_nce(mine_a, mine_b, torch.tensor(10.0))
    loss.backward()
    out[rank] = (loss.detach(), mine_a.grad)
    dist.destroy_process_group()


def test_under_ddp_every_ranks_samples_are_the_negatives(tmp_path):
    a = torch.nn.functional.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    whole_a = a.clone().requires_grad_()
    whole = info_nce(whole_a, b, torch.tensor(10.0))
    whole.backward()
    out = mp.Manager().dict()
    mp.spawn(_ddp_info_nce, args=(2, f"file://{tmp_path / 'rendezvous'}", a, b, out), nprocs=2, join=True)
    torch.testing.assert_close((out[0][0] + out[1][0]) / 2, whole.detach())  # DDP's mean of the ranks' losses
    # DDP averages the ranks' gradients: each rank's rows get the whole batch's gradient
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / 2, whole_a.grad)


def test_av_digits_clip_trains_and_reports_retrieval(av_root, tmp_path):
    cfg = compose("av_digits_clip", av_run(tmp_path, av_root))
    summary = train(cfg, run_dir=tmp_path / "run")
    for key in ("test/audio_to_image_r@1", "test/image_to_audio_r@5", "test/zero_shot_acc"):
        assert 0.0 <= summary[key] <= 1.0, key


def test_clip_from_a_written_digit_tower_keeps_its_weights_and_its_segment_row(av_root, tmp_path):
    """LiT's recipe: av_digits on the images alone, then av_digits_clip from that checkpoint. The tower's backbone,
    image tokenizer and image segment row (matched by field name: the tower had one field) are loaded; the audio
    tokenizer, its segment row and the projections start new."""
    train(compose("av_digits", av_run(tmp_path, av_root, "data.use=[image]")), run_dir=tmp_path / "tower")
    ckpt = tmp_path / "tower" / "checkpoints" / "last.ckpt"
    tower = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model, _ = build(compose("av_digits_clip", av_run(tmp_path, av_root)))
    fresh_audio_row = model.task.tokenizer.segment[1].detach().clone()
    result = init_from(model, ckpt)
    tok = model.task.tokenizer
    torch.testing.assert_close(tok.segment[0], tower["tasks.main.tokenizer.segment"][0])
    torch.testing.assert_close(tok.segment[1], fresh_audio_row)
    assert "tasks.main.tokenizer.segment" in [n for n, _, _ in result["resampled"]]
    assert not result["skipped"]
    torch.testing.assert_close(model.backbone.norm.weight, tower["backbone.norm.weight"])
    assert any(n.startswith("tasks.main.tokenizer.fields.audio.") for n in result["new"])
    assert "tasks.main.head.proj.weight" in result["unused"]


def test_init_from_the_same_fields_in_another_order_maps_segment_rows_by_name():
    """A checkpoint of fields (audio, image) starting a model of (image, audio): the segment tensors have the same
    shape, and each row still goes to the field of its name, not to the field at its position."""
    dim = 16
    theirs = FusedTokenizer({"audio": MelTokenizer(dim=dim, sample_rate=8000, spec_augment=None),
                             "image": PatchTokenizer(dim=dim, image_size=(8, 8), patch_size=2)}, dim=dim)
    ours = fused_tokenizer(dim)  # image, audio
    source = {f"tokenizer.{k}": v for k, v in theirs.state_dict().items()}
    model = torch.nn.Module()
    model.tokenizer = ours
    result = init_from(model, "given", preloaded={"state_dict": source})
    torch.testing.assert_close(ours.segment[0], theirs.segment[1])  # image
    torch.testing.assert_close(ours.segment[1], theirs.segment[0])  # audio
    assert ("tokenizer.segment", (2, dim), (2, dim)) in result["resampled"]
    torch.testing.assert_close(ours.fields["image"].proj.weight, theirs.fields["image"].proj.weight)
    # the same order: loaded as it is, not listed as adapted
    again = init_from(model, "given", preloaded={"state_dict": {f"tokenizer.{k}": v for k, v in ours.state_dict().items()}})
    assert "tokenizer.segment" in again["loaded"] and not again["resampled"]


def test_contrastive_needs_two_fields(av_root, tmp_path):
    with pytest.raises(ConfigError, match="aligns two fields"):
        build(compose("av_digits_clip", av_run(tmp_path, av_root, "data.use=[audio]")))


@pytest.mark.skipif(not (SHARED / "digits").is_dir() or not (SHARED / "fsdd").is_dir(),
                    reason="../shared/data/digits and fsdd (the real written and spoken digits) are not here")
def test_real_digits_pair_with_real_spoken_digits(tmp_path):
    cfg = compose("av_digits", [f"data.root={SHARED}", f"paths.cache_dir={tmp_path / 'cache'}"])
    _, dm = build(cfg)
    assert dm.classes == [str(d) for d in range(10)]
    assert dm.num_samples("test") == 360 and dm.num_samples("train") == 2430  # the larger field of each split
    batch = dm.on_after_batch_transfer({"index": torch.arange(16), "split": "test"})
    assert batch.fields["image"].image.shape == (16, 3, 8, 8)
    assert torch.equal(batch.fields["audio"].label, batch.label)


def test_fields_of_different_widths_are_named_both():
    image = PatchTokenizer(dim=16, image_size=(8, 8), patch_size=2)
    audio = MelTokenizer(dim=24, sample_rate=8000, spec_augment=None)
    with pytest.raises(ConfigError, match="tokenizer.fields.audio makes tokens 24 wide and tokenizer.fields.image 16"):
        FusedTokenizer({"image": image, "audio": audio}, dim=16)


def test_a_sample_without_a_field_the_model_reads_is_named():
    tok = fused_tokenizer()
    batch = fused_batch()
    del batch.fields["audio"]
    with pytest.raises(ConfigError, match="the batch has no field 'audio'"):
        tok(batch)


def test_the_contrastive_loss_falls_on_one_batch_at_the_tasks_learning_rate(av_root, tmp_path):
    """The embeddings of one batch come apart under the task's own optimizer settings. (On the real digits at
    av_digits' lr, 2e-3, they collapsed onto one vector; this tiny model does not reproduce that, see
    docs/benchmarks.md.)"""
    cfg = compose("av_digits_clip", av_run(tmp_path, av_root))
    model, dm = build(cfg)
    torch.manual_seed(0)
    batch = dm.on_after_batch_transfer({"index": torch.arange(8), "split": "train"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    model.train()
    for _ in range(60):
        _, loss = model.task.forward_loss(model.backbone, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < math.log(8) - 0.2  # log(8): one embedding for all; two classes of four bound it at log(4)
