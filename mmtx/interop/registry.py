"""Weight families: how `init_from=<scheme>:<name>` reads weights of another library onto mmtx's parts.

A family is one module of `mmtx.interop` that registers its reader:

    @register_family("hf", "gpt2", describe="a GPT-2 (gpt2, gpt2-medium, distilgpt2, ...)")
    def load(spec: str) -> dict: ...   # {"state_dict": mmtx names, "mmtx_pretrained": {"spec", "arch", ...}}

`scheme` is the part of `init_from` before the colon; `kind` tells the families of one scheme apart (for `hf:`, the
model's `model_type` in its configuration; None: the scheme's only family). The families are found by importing
the modules named in `FAMILIES` (a new family: one file, and its name there).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable

from mmtx.checkpoints.io import SINGLE
from mmtx.errors import ConfigError

log = logging.getLogger(__name__)

FAMILIES = ("mmtx.interop.timm", "mmtx.interop.gpt2", "mmtx.interop.whisper", "mmtx.interop.bert")
PREFIX = f"tasks.{SINGLE}."  # a single-task model's part; init_from maps it to every member of a co-training run

_READERS: dict[str, dict[str | None, tuple[Callable[..., dict[str, Any]], str]]] = {}


def register_family(scheme: str, kind: str | None = None, describe: str = "") -> Callable:
    """Register the decorated `load(spec, ...)` as the reader of `init_from=<scheme>:...` weights of `kind`."""
    def register(load: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        _READERS.setdefault(scheme, {})[kind] = (load, describe)
        return load
    return register


def _readers() -> dict[str, dict[str | None, tuple[Callable[..., dict[str, Any]], str]]]:
    for module in FAMILIES:
        importlib.import_module(module)
    return _READERS


def supported() -> str:
    """Every registered family, as error messages name them."""
    readers = _readers()  # sorted: the same text whatever order the families were imported in
    return "; ".join(f"{scheme}:<{' or '.join(readers[scheme][k][1] for k in sorted(readers[scheme], key=str))}>"
                     for scheme in sorted(readers))


def is_pretrained(spec: Any) -> bool:
    """True for `<scheme>:<name>` of a registered scheme (timm:, hf:), not for an mmtx checkpoint path."""
    return isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0] in _readers()


def load_pretrained(spec: str, file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The weights named by `spec` as an mmtx checkpoint: {"state_dict": mmtx names (single-task),
    "mmtx_pretrained": {"spec", "arch": the run configuration they need, "mean", "std", "num_classes"}}, read by
    their family's registered reader. `file`: a local weights file, for the families that take one (timm)."""
    scheme, name = spec.split(":", 1)
    kinds = _readers().get(scheme)
    if not kinds:
        raise ConfigError(f"init_from={spec}: no weight family reads {scheme}: weights; this mmtx maps {supported()}")
    if None in kinds:
        load = kinds[None][0]
        return load(spec, file) if file is not None else load(spec)
    if file is not None:
        raise ConfigError(f"finetune.pretrained_file is for init_from=timm:...; for init_from={spec} give the "
                          f"folder itself: init_from={scheme}:/path/to/folder (saved by save_pretrained)")
    from mmtx.tokenizers.hub import auto_config

    kind = auto_config(name).model_type
    if kind not in kinds:
        raise ConfigError(f"init_from={spec} is a {kind} model; this mmtx maps {supported()}")
    return kinds[kind][0](spec)


def _same(have: Any, want: Any) -> bool:
    return have == want if not isinstance(want, float) else have is not None and abs(float(have) - want) < 1e-9


def take_architecture(cfg, source: dict[str, Any], baseline=None) -> list[str]:
    """Set in `cfg` the run configuration the pretrained weights dictate (their `arch`: the backbone's shape, the
    tokenizer's, the decoder's, the vocabulary), so a task file holds only its fine-tuning choices; return the keys
    set. `baseline`: the run's task composed alone (no command-line overrides): a key whose value differs from it
    was chosen for this run, and when the weights need another value that is an error naming both
    (`check_architecture`); None: every key is taken as chosen (only checked). A co-training run is only checked."""
    from omegaconf import OmegaConf

    info = source["mmtx_pretrained"]
    taken = {}
    if baseline is not None and "member_configs" not in cfg:
        for key, want in _applicable(cfg, info["arch"]).items():
            have = OmegaConf.select(cfg, key, default=None)
            if not _same(have, want) and _same(have, OmegaConf.select(baseline, key, default=None)):
                taken[key] = want
    for key, want in taken.items():
        OmegaConf.update(cfg, key, want, force_add=True)
    if taken:
        log.info("init_from=%s sets %s (what its weights need)", info["spec"],
                 " ".join(f"{k}={v}" for k, v in taken.items()))
    check_architecture(cfg, source)
    return list(taken)


def _applicable(cfg, arch: dict[str, Any]) -> dict[str, Any]:
    """The keys of `arch` that concern this run: a head setting of the weights' family (`family.pool` of a ViT) is
    left out when the run's family has no such key (masked pretraining from a classifier's weights)."""
    from omegaconf import OmegaConf

    missing = object()
    return {key: want for key, want in arch.items()
            if not (key.startswith("family.") and key != "family._target_"
                    and OmegaConf.select(cfg, key, default=missing) is missing)}


def check_architecture(cfg, source: dict[str, Any]) -> None:
    """Fail naming every key of the run configuration that differs from what the pretrained weights need
    (with the overrides that fix it); note a data normalisation other than the model's."""
    from omegaconf import OmegaConf

    info = source["mmtx_pretrained"]
    cotrain = "member_configs" in cfg  # the backbone is the run's; members' tokenizers and heads match where they can
    wrong = {}
    for key, want in _applicable(cfg, info["arch"]).items():
        if cotrain and not key.startswith("backbone."):
            continue
        have = OmegaConf.select(cfg, key, default=None)
        if not _same(have, want):
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
        log.warning(
            "init_from=%s was trained on images normalised with mean %s, std %s; this run uses data.mean=%s "
            "data.std=%s", info["spec"], info["mean"], info["std"], list(mean), list(std))
