"""Pretrained weights of other libraries on mmtx's parts: `init_from=timm:<name>` (here) and `init_from=hf:<name>`
(GPT-2: mmtx.gpt2), read by mmtx.transfer.

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

SUPPORTED = ("timm:<a timm Vision Transformer, e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k, "
             "vit_small_patch16_224.augreg_in21k_ft_in1k, vit_base_patch16_224.augreg2_in21k_ft_in1k> and "
             "hf:<a Hugging Face GPT-2 (gpt2, gpt2-medium, distilgpt2, ...) or Whisper (openai/whisper-tiny, ...), "
             "or a save_pretrained folder>")
PREFIX = "tasks.main."  # a single-task model's part; init_from maps it to every member of a co-training run


def is_pretrained(spec: Any) -> bool:
    """True for `timm:<name>` and `hf:<name>` (weights from another library), not for an mmtx checkpoint path."""
    return isinstance(spec, str) and spec.split(":", 1)[0] in ("timm", "hf") and ":" in spec


def load_pretrained(spec: str, file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The weights named by `spec` as an mmtx checkpoint: {"state_dict": mmtx names (single-task),
    "mmtx_pretrained": {"spec", "arch": the run configuration they need, "mean", "std", "num_classes"}}."""
    kind, name = spec.split(":", 1)
    if kind == "hf":
        if file is not None:
            raise ConfigError(f"finetune.pretrained_file is for init_from=timm:...; for init_from={spec} give the "
                              "folder itself: init_from=hf:/path/to/folder (saved by save_pretrained)")
        from mmtx.hf import load

        return load(spec)
    model = create_timm(name, file)
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
        return timm.create_model(name, **kwargs)
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


def timm_vit_state(model: nn.Module, spec: str = "timm") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm VisionTransformer's weights under mmtx's names, and the run configuration that holds them."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"init_from={spec}: {type(model).__name__} is not a timm VisionTransformer; this mmtx "
                          f"maps {SUPPORTED}")
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
        "backbone.dim": dim, "backbone.depth": len(model.blocks), "backbone.num_heads": block.attn.num_heads,
        "backbone.mlp_ratio": block.mlp.fc1.out_features / dim, "backbone.qkv_bias": has_qkv_bias,
        "backbone.bias": True, "backbone.rotary": False, "backbone.norm_eps": 1e-6, "backbone.activation": "gelu",
        "tokenizer._target_": "mmtx.tokenizers.PatchTokenizer", "tokenizer.patch_size": patch[0],
        "tokenizer.stem": "patch", "tokenizer.pos_embed": "grid", "family.pool": "cls",
    }
    return state, arch


def check_architecture(cfg, source: dict[str, Any]) -> None:
    """Fail naming every key of the run configuration that differs from what the pretrained weights need
    (with the overrides that fix it); note a data normalisation other than the model's."""
    import logging

    from omegaconf import OmegaConf

    info = source["mmtx_pretrained"]
    cotrain = "member_configs" in cfg  # the backbone is the run's; members' tokenizers and heads match where they can
    wrong = {}
    for key, want in info["arch"].items():
        if cotrain and not key.startswith("backbone."):
            continue
        have = OmegaConf.select(cfg, key, default=None)
        same = have == want if not isinstance(want, float) else have is not None and abs(float(have) - want) < 1e-9
        if not same:
            wrong[key] = (have, want)
    if wrong:
        found = "; ".join(f"{k}={have} here, {want} in the weights" for k, (have, want) in wrong.items())
        fix = " ".join(f"{k}={want}" for k, (_, want) in wrong.items())
        start = info.get("task", "vit_finetune")
        raise ConfigError(f"init_from={info['spec']} needs another model than this run's ({found}): add {fix} to the "
                          f"command line, or start from the task {start}")
    for key, limit in (info.get("limits") or {}).items():  # context lengths the weights have positions for
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and int(value) > limit:
            raise ConfigError(f"{key}={value} is longer than the {limit} positions init_from={info['spec']} has "
                              f"learned: use {key}<={limit}")
    mean, std = OmegaConf.select(cfg, "data.mean", default=None), OmegaConf.select(cfg, "data.std", default=None)
    if info["mean"] and mean is not None and (list(mean) != info["mean"] or list(std) != info["std"]):
        logging.getLogger(__name__).warning(
            "init_from=%s was trained on images normalised with mean %s, std %s; this run uses data.mean=%s "
            "data.std=%s", info["spec"], info["mean"], info["std"], list(mean), list(std))
