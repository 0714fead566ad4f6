"""Pretrained timm ViTs on mmtx's parts (mmtx.interop.timm): numerical parity with timm on the CPU in fp32 (random
weights, no network), positions resampled as timm resamples them, the run-level `init_from=timm:...` with its
table and checks, and the errors for models the mapping does not place."""

from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, pretrained_small_run, small_run, timm_reference
from mmtx import build, compose
from mmtx.batch import ImageBatch
from mmtx.errors import ConfigError, MissingError
from mmtx.interop.registry import load_pretrained
from mmtx.interop.timm import create_timm, timm_vit_state
from mmtx.train import train
from mmtx.training.transfer import init_from

timm = pytest.importorskip("timm")
ARCH = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained_root")
    make_image_folder(root / "cifar10", classes=[f"c{i}" for i in range(10)], per_class=(2, 1), size=32)
    return root


def mmtx_vit(root: Path, tmp_path: Path, *extra: str):
    """mmtx's classifier shaped as the timm model ARCH (built on the miniature CIFAR-10 folder)."""
    args = [*small_run(tmp_path, root), "data=imagefolder", "data.source.path=cifar10", "backbone.dim=64",
            "backbone.depth=2", "backbone.num_heads=4", "tokenizer.patch_size=4", "tokenizer.pos_embed=grid",
            "tokenizer.stem=patch", "family.pool=cls", *extra]
    model, _ = build(compose("vit_cifar", args))
    return model.eval()


def logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.task(model.backbone, ImageBatch(images))


def max_delta(model, reference, images: torch.Tensor) -> float:
    """The largest absolute difference between mmtx's logits and the timm `reference`'s on `images`."""
    with torch.no_grad():
        return (logits(model, images) - reference(images)).abs().max().item()


def test_a_timm_vit_gives_the_same_logits_in_mmtx(root, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH).eval()
    state, arch = timm_vit_state(reference)
    assert arch["backbone.dim"] == 64 and arch["tokenizer.patch_size"] == 4 and arch["family.pool"] == "cls"
    model = mmtx_vit(root, tmp_path)
    result = init_from(model, "timm:test", preloaded={"state_dict": state})
    assert not result["new"] and not result["skipped"] and not result["unused"]
    delta = max_delta(model, reference, torch.randn(4, 3, 32, 32))
    print(f"ViT (timm vit_tiny_patch16_224 at {ARCH}) logits: max |delta| {delta:.2e}")
    assert delta <= 1e-4


def test_at_another_resolution_the_positions_resample_as_timm_resamples_them(root, tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(1)
    at32 = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH).eval()
    at48 = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**ARCH, "img_size": 48}).eval()
    weights = at32.state_dict()
    # timm's own loading of 32x32 weights at 48x48 (checkpoint_filter_fn): bicubic, no antialiasing
    weights["pos_embed"] = resample_abs_pos_embed(weights["pos_embed"], (12, 12), antialias=False)
    at48.load_state_dict(weights)
    model = mmtx_vit(root, tmp_path)
    init_from(model, "timm:test", preloaded={"state_dict": timm_vit_state(at32)[0]})
    delta = max_delta(model, at48, torch.randn(2, 3, 48, 48))
    print(f"ViT at 48x48 from 32x32 weights: max |delta| {delta:.2e}")
    assert delta <= 1e-4


def test_init_from_timm_in_a_run_reports_the_new_head_and_checks_the_model(root, tmp_path):
    weights = timm_reference(tmp_path / "vit_tiny.safetensors")  # the real ViT-Ti/16 shape, random weights
    args = pretrained_small_run(tmp_path, root, weights)
    summary = train(compose("vit_finetune", [*args, "trainer.max_steps=2", "test_after_fit=false"]), run_dir=tmp_path / "run")
    assert summary["status"] == "finished"
    rows = [line.split("\t") for line in (tmp_path / "run" / "init_from.tsv").read_text().splitlines()[1:]]
    status = {name: kind for kind, name, *_ in rows}
    assert status["tasks.main.head.proj.weight"] == "skipped"  # 1000 ImageNet classes there, 10 here
    assert status["tasks.main.head.pool.token"] == "loaded"
    assert status["tasks.main.tokenizer.pos.table"] == "resampled"  # 14x14 positions at the 2x2 grid of 32x32 images
    assert status["backbone.blocks.11.mlp.fc2.weight"] == "loaded" and "new" not in {
        kind for name, kind in status.items() if name.startswith("backbone.")}

    with pytest.raises(ConfigError, match=r"backbone.dim=96 here, 192 in the weights.*add backbone.dim=192"):
        train(compose("vit_finetune", [*args, "backbone.dim=96"]), run_dir=tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"family.pool=mean here, cls in the weights"):
        train(compose("vit_finetune", [*args, "family.pool=mean"]), run_dir=tmp_path / "bad2")


def test_the_loaded_weights_are_timm_s_own(tmp_path):
    file = timm_reference(tmp_path / "w.safetensors")
    source = load_pretrained("timm:vit_tiny_patch16_224", file)
    from safetensors.torch import load_file

    saved = load_file(str(file))
    state = source["state_dict"]
    assert torch.equal(state["backbone.blocks.3.attn.qkv.weight"], saved["blocks.3.attn.qkv.weight"])
    assert torch.equal(state["tasks.main.head.pool.token"], saved["cls_token"] + saved["pos_embed"][:, :1])
    assert source["mmtx_pretrained"]["num_classes"] == 1000 and source["mmtx_pretrained"]["mean"] == [0.5] * 3


@pytest.mark.parametrize("spec, words", [
    ("timm:swin_tiny_patch4_window7_224", "is a swin_transformer model; this mmtx maps timm:<a timm Vision Transformer"),
    ("timm:no_such_model", "timm has no model 'no_such_model'"),
])
def test_models_the_mapping_does_not_place_are_named(spec, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(spec)


def test_layerscale_and_register_tokens_are_named_not_dropped():
    with pytest.raises(ConfigError, match=r"LayerScale"):
        timm_vit_state(timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5, **ARCH))
    with pytest.raises(ConfigError, match=r"num_prefix_tokens"):
        timm_vit_state(timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4, **ARCH))
    with pytest.raises(ConfigError, match=r"global_pool"):
        timm_vit_state(timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", **ARCH))


def test_without_network_or_cache_the_message_names_the_model_and_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # HF_HUB_OFFLINE=1 and HF_HOME=<empty>, as huggingface_hub reads them (its constants, set at its import)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(MissingError, match=rf"timm:{name}: its weights are not in the local Hugging Face cache "
                                           rf"\({tmp_path / 'hf' / 'hub'}; HF_HOME.*finetune.pretrained_file=PATH"):
        create_timm(name)
    with pytest.raises(MissingError, match="finetune.pretrained_file=.*does not exist"):
        create_timm(name, tmp_path / "absent.safetensors")
