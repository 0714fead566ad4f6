"""Check the types and ranges of a composed run configuration before any data is read or model built.

Hydra checks that keys exist; this checks their values (`optim.lr=abc`, `data.batch_size=0`) and
fails with one message naming the key, the value and what is allowed, instead of an error raised
deep inside PyTorch minutes later.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mmtx.errors import ConfigError

_ABSENT = object()  # OmegaConf.select's default: the key is not in this task's config

# A rule: (what is allowed, in words; a test of the value). Keys absent from a task's config are skipped.
Rule = tuple[str, Callable[[Any], bool]]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           optional: bool = False) -> Rule:
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    words = "a number" + (" " + " and ".join(w for w in (lo, hi) if w) if lo or hi else "")
    words += " or null" if optional else ""

    def test(value: Any) -> bool:
        if value is None:
            return optional
        if not is_number(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)

    return words, test


def integer(low: int, optional: bool = False, also: tuple[Any, ...] = ()) -> Rule:
    words = f"a whole number >= {low}" + "".join(f" or {a}" for a in also) + (" or null" if optional else "")
    return words, lambda v: (v is None and optional) or v in also or (_integer(v) and v >= low)


def limit(optional: bool = True) -> Rule:
    """Lightning's limit_*_batches / val_check_interval: a fraction in [0, 1] or a whole number of batches."""
    return ("a fraction in [0, 1] or a whole number of batches >= 0" + (" or null" if optional else ""),
            lambda v: (v is None and optional) or (_integer(v) and v >= 0) or (is_number(v) and 0 <= v <= 1))


def boolean() -> Rule:
    return "true or false", lambda v: isinstance(v, bool)


def one_of(*choices: str) -> Rule:
    return " or ".join(repr(c) for c in choices), lambda v: v in choices


def device() -> Rule:
    """A device for inference: auto, cpu, cuda or cuda:<index>."""
    return ("'auto', 'cpu', 'cuda' or 'cuda:<index>'",
            lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())))


RULES: dict[str, Rule] = {
    "seed": integer(0),
    "test_ckpt": one_of("best", "last"),
    "optim.lr": number(0, low_open=True),
    "optim.weight_decay": number(0),
    "optim.eps": number(0, low_open=True),
    "optim.warmup_steps": integer(0, optional=True),
    "optim.warmup_fraction": number(0, 1, high_open=True),
    "optim.min_lr_ratio": number(0, 1),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1, optional=True),
    "data.val_fraction": number(0, 1, high_open=True, optional=True),  # null: data=streaming_text, as prepared
    "data.block_size": integer(1),
    "data.max_src_len": integer(2, optional=True),  # null: data=streaming_pairs, as prepared
    "data.max_tgt_len": integer(2, optional=True),
    "data.mixup": number(0),
    "data.augment.crop_padding": integer(0),
    "data.augment.hflip": boolean(),
    "data.source.image_size": integer(1, optional=True),
    "data.source.sample_rate": integer(1),
    "data.source.max_seconds": number(0, low_open=True, optional=True),
    "tokenizer.patch_size": integer(1),
    "data.cutmix": number(0),
    "data.device_resident": boolean(),
    "trainer.max_epochs": integer(0, also=(-1,), optional=True),
    "trainer.max_steps": integer(0, also=(-1,)),
    "trainer.gradient_clip_val": number(0, optional=True),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": integer(1, optional=True),
    "trainer.num_sanity_val_steps": integer(0, also=(-1,)),
    "trainer.limit_train_batches": limit(),
    "trainer.limit_val_batches": limit(),
    "trainer.limit_test_batches": limit(),
    "trainer.val_check_interval": limit(),
    "trainer.num_nodes": integer(1),
    "backbone.dim": integer(1),
    "backbone.depth": integer(1),
    "backbone.num_heads": integer(1),
    "backbone.mlp_ratio": number(0, low_open=True),
    "backbone.dropout": number(0, 1, high_open=True),
    "backbone.attn_dropout": number(0, 1, high_open=True),
    "backbone.drop_path": number(0, 1, high_open=True),
    "family.decoder.depth": integer(1, optional=True),  # null: the backbone's
    "family.decoder.num_heads": integer(1, optional=True),
    "family.decoder.dropout": number(0, 1, high_open=True, optional=True),
    "family.decoder.attn_dropout": number(0, 1, high_open=True, optional=True),
    "family.decoder.drop_path": number(0, 1, high_open=True, optional=True),
    "family.label_smoothing": number(0, 1, high_open=True),
    "family.beam_size": integer(1),
    "family.media_samples": integer(0),
    "family.sample_tokens": integer(0),
    "family.sample_temperature": number(0),
    "family.sample_top_k": integer(0, optional=True),
    "module.max_nonfinite_steps": integer(1),
    "callbacks.last_checkpoint.every_n_steps": integer(0, optional=True),
    "callbacks.last_checkpoint.every_n_minutes": number(0, low_open=True, optional=True),
    "callbacks.last_checkpoint.on_validation": boolean(),
}


def _select(cfg: DictConfig | dict, key: str) -> Any:
    """The value at dotted `key` of a config or a plain dict (a program's arguments), or _ABSENT."""
    if isinstance(cfg, DictConfig):
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if node is not _ABSENT and OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} has no value (???): set it, e.g. {key}=...")
        return node
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def validate(cfg: DictConfig | dict, rules: dict[str, Rule] | None = None) -> None:
    """Raise a ConfigError naming the first key of `cfg` whose value breaks its rule (`rules`: a program's own,
    such as mmtx.generate's, on its arguments; default: a training run's, and its cross-key checks)."""
    for key, (allowed, test) in (RULES if rules is None else rules).items():
        node = _select(cfg, key)
        if node is _ABSENT:
            continue
        if not test(node):
            raise ConfigError(f"{key}={node!r} is not valid: {key} must be {allowed}")
    if rules is not None:
        return
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None and not (len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas={list(betas)!r} is not valid: it must be two numbers in [0, 1)")
    dim, heads = OmegaConf.select(cfg, "backbone.dim"), OmegaConf.select(cfg, "backbone.num_heads")
    if _integer(dim) and _integer(heads) and dim % heads:
        raise ConfigError(f"backbone.dim={dim} is not divisible by backbone.num_heads={heads}")


def check_run_keys(cfg: DictConfig) -> None:
    """Mistakes in the run's own keys, named before anything is read."""
    if cfg.get("init_from") and cfg.get("resume"):
        raise ConfigError(f"init_from={cfg.init_from} and resume={cfg.resume} are both set: resume continues a run "
                          "(its weights, optimizer, schedule and data order), init_from starts a new run from a "
                          "checkpoint's weights; keep one (to resume a run that began with init_from, drop init_from)")
    if cfg.get("eval_only") and cfg.get("resume"):
        raise ConfigError(f"eval_only=true and resume={cfg.resume} are both set: to test a checkpoint, use "
                          f"python -m mmtx.eval ckpt={cfg.resume}")
    if cfg.get("members"):  # a co-training run (mmtx.config.members.is_cotrain): each member builds its own parts
        required = ("backbone", "trainer")
    else:
        data = cfg.get("data")
        if isinstance(data, DictConfig) and "_target_" not in data and "members" in cfg:
            raise ConfigError(f"task={cfg.task_name} is a co-training task, but members={cfg.members} lists no "
                              "member: give members its tasks, or train one task alone (e.g. task=audio_fsdd)")
        required = ("data", "tokenizer", "backbone", "family", "trainer")
    if not isinstance(cfg.get("optim"), DictConfig):
        raise ConfigError(f"optim={cfg.get('optim')} leaves the run without optimizer settings: pick one of "
                          "conf/optim/ (optim=adamw), or drop that override")
    for group in required:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group}={node if node is None else '{...}'} leaves task={cfg.get('task_name')} "
                              f"without a {group} to build (its settings have no _target_): pick one of conf/{group}/ "
                              f"(e.g. {group}=<name>), or drop that override")
