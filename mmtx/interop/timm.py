"""timm's Vision Transformers on mmtx's parts: the weight family of `init_from=timm:<name>` (mmtx.interop.registry;
read by mmtx.training.transfer).

timm's Vision Transformers (`timm.models.vision_transformer.VisionTransformer`: `vit_*`, and `deit_*` without
a distillation token) map onto mmtx's `PatchTokenizer` + `Backbone` + classifier head with the same numbers:
the blocks are the same modules under the same names (pre-norm, LayerNorm eps 1e-6, exact GELU, qkv bias); the
patch projection is `tokenizer.proj`; the learned positions of the patches are `tokenizer.pos.table`
(`tokenizer.pos_embed: grid`, resampled bicubically to the run's grid as timm does); the CLS token, with its
position added (a constant), is `head.pool.token` (`family.pool: cls`); `head` is `head.proj`, kept when the
class count matches. Anything the model has that this mapping does not place (LayerScale, register tokens,
QK-norm, a pre-norm, average pooling) is an error naming it; nothing is dropped silently.

timm builds the model and fetches its weights through its own Hugging Face hub cache (`HF_HOME`);
`finetune.pretrained_file=PATH` gives a local weights file instead (timm's `pretrained_cfg_overlay`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtx.errors import ConfigError, MissingError
from mmtx.interop.registry import PREFIX, register_family

SUPPORTED = ("timm:<a timm Vision Transformer (vit_*, deit_* without a distillation token), e.g. "
             "vit_tiny_patch16_224.augreg_in21k_ft_in1k>")


@register_family("timm", describe="a timm Vision Transformer, e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k, "
                 "vit_small_patch16_224.augreg_in21k_ft_in1k, vit_base_patch16_224.augreg2_in21k_ft_in1k")
def load(spec: str, file: str | os.PathLike | None = None) -> dict[str, Any]:
    """`timm:<name>` as an mmtx checkpoint (see `mmtx.interop.registry.load_pretrained`); `file`: its weights from a
    local file (`finetune.pretrained_file`) instead of timm's hub cache."""
    model = create_timm(spec.split(":", 1)[1], file)
    state, arch = timm_vit_state(model, spec)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    info = {"spec": spec, "arch": arch, "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ())),
            "num_classes": model.num_classes}
    return {"state_dict": state, "mmtx_pretrained": info}


def create_timm(name: str, file: str | os.PathLike | None = None) -> nn.Module:
    """`timm.create_model(name, pretrained=True)` (from `file` if given), for the families mmtx maps."""
    import timm
    from timm.models import model_entrypoint

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ConfigError(f"init_from=timm:{name}: timm has no model {arch!r} (timm.list_models('vit_*') lists the "
                          f"ones mmtx maps: {SUPPORTED})")
    module = model_entrypoint(arch).__module__
    if module != "timm.models.vision_transformer":
        raise ConfigError(f"init_from=timm:{name} is a {module.rsplit('.', 1)[-1]} model; this mmtx maps {SUPPORTED}")
    kwargs: dict[str, Any] = {"pretrained": True}
    if file is not None:
        file = Path(file).expanduser()
        if not file.is_file():
            raise MissingError(f"finetune.pretrained_file={file} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    try:
        try:
            return timm.create_model(name, **kwargs)
        except RuntimeError as err:  # a local file without a classifier (MAE's weights): a headless model
            if file is None or "head.weight" not in str(err):
                raise
            return timm.create_model(name, num_classes=0, **kwargs)
    except OSError as err:  # huggingface_hub: not in the cache and no network (LocalEntryNotFoundError, ...)
        if file is not None:
            raise
        from huggingface_hub import constants

        raise MissingError(
            f"init_from=timm:{name}: its weights are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}; "
            f"HF_HOME sets it) and could not be downloaded ({type(err).__name__}). Download them once where there is a "
            f"network: python -c \"import timm; timm.create_model('{name}', pretrained=True)\" (then "
            "HF_HUB_OFFLINE=1 works), or give a local weights file with finetune.pretrained_file=PATH"
        ) from None


def _check_expressible(model: nn.Module, spec: str) -> None:
    """Fail naming what of a timm ViT mmtx's backbone does not express (another pooling, LayerScale, QK-norm...)."""
    unsupported = {
        "global_pool": model.global_pool != "token",
        "no_embed_class": getattr(model, "no_embed_class", False),
        "num_prefix_tokens": model.num_prefix_tokens != 1 or model.cls_token is None,
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "attn_pool": getattr(model, "attn_pool", None) is not None,
        "dynamic_img_size": getattr(model, "dynamic_img_size", False),
    }
    block = model.blocks[0]
    unsupported.update({
        "blocks.*.ls1 (LayerScale)": not isinstance(block.ls1, nn.Identity),
        "blocks.*.attn.q_norm (QK-norm)": not isinstance(block.attn.q_norm, nn.Identity),
        "blocks.*.mlp.norm": not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity),
        "activation (exact GELU)": not (isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"),
        "norm eps (1e-6)": any(getattr(m, "eps", 1e-6) != 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm)),
        "patch_embed (one convolution)": not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d),
    })
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"init_from={spec}: this ViT has {', '.join(bad)}, which mmtx's backbone does not express; "
                          f"it maps {SUPPORTED} (class token, pre-norm blocks without LayerScale)")


def timm_vit_state(model: nn.Module, spec: str = "timm") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm VisionTransformer's weights under mmtx's names, and the run configuration that holds them."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"init_from={spec}: {type(model).__name__} is not a timm VisionTransformer; this mmtx "
                          f"maps {SUPPORTED}")
    _check_expressible(model, spec)
    patch = tuple(model.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ConfigError(f"init_from={spec}: patches of {patch[0]}x{patch[1]}; mmtx's patches are square")
    source = {k: v.detach() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    grid = tuple(model.patch_embed.grid_size)
    pos = source.pop("pos_embed")  # (1, 1 + gh*gw, D): the CLS position first
    state = {
        "tokenizer.proj.weight": source.pop("patch_embed.proj.weight"),
        "tokenizer.proj.bias": source.pop("patch_embed.proj.bias"),
        "tokenizer.pos.table": pos[0, 1:].reshape(*grid, dim),
        "head.pool.token": source.pop("cls_token") + pos[:, :1],  # the CLS position is a constant: folded in
    }
    if "head.weight" in source and model.num_classes > 0:
        state["head.proj.weight"], state["head.proj.bias"] = source.pop("head.weight"), source.pop("head.bias")
    state = {PREFIX + k: v for k, v in state.items()}
    for key in list(source):
        if key.startswith("blocks.") or key in ("norm.weight", "norm.bias"):
            state["backbone." + key] = source.pop(key)
    if source:
        raise ConfigError(f"init_from={spec}: tensor(s) {', '.join(sorted(source)[:5])} have no place in mmtx's ViT; "
                          f"this mmtx maps {SUPPORTED}")
    has_qkv_bias = "backbone.blocks.0.attn.qkv.bias" in state
    arch = {
        "backbone.dim": dim, "backbone.depth": len(model.blocks), "backbone.num_heads": model.blocks[0].attn.num_heads,
        "backbone.mlp_ratio": model.blocks[0].mlp.fc1.out_features / dim, "backbone.qkv_bias": has_qkv_bias,
        "backbone.bias": True, "backbone.rotary": False, "backbone.norm_eps": 1e-6, "backbone.activation": "gelu",
        "tokenizer._target_": "mmtx.tokenizers.PatchTokenizer", "tokenizer.patch_size": patch[0],
        "tokenizer.stem": "patch", "tokenizer.pos_embed": "grid", "family.pool": "cls",
    }
    return state, arch
