"""Check the types and ranges of a composed run configuration before any data is read or model built.

Hydra checks that keys exist; this checks their values (`optim.lr=abc`, `data.batch_size=0`) and
fails with one message naming the key, the value and what is allowed, instead of an error raised
deep inside PyTorch minutes later.

What a value must be is declared once, where it is taken: on the parameter of the class or function a config
node's `_target_` names (`batch_size: Count`, `dropout: Rate`: `mmtx.errors`' rules), read from there for every
node of the configuration. `RULES` holds only the keys no mmtx constructor takes: the run's own, the optimizer's
settings and Lightning's Trainer's.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmtx.errors import ConfigError, Rule, _integer, boolean, integer, is_number, limit, number, one_of

_ABSENT = object()  # OmegaConf.select's default: the key is not in this task's config
# Config nodes without a `_target_` whose keys a constructor takes: {node: (that constructor, null allowed)}.
# `family.decoder`'s keys are the backbone's, null for the backbone's own value.
TAKEN_BY = {"family.decoder": ("mmtx.backbone.Backbone", True), "module": ("mmtx.module.MmtxModule", False),
            "data.augment": ("mmtx.data.augment.BatchAugment", False), "backbone.moe": ("mmtx.nn.mlp.MoeSpec", False)}


def device() -> Rule:
    """A device for inference: auto, cpu, cuda or cuda:<index>."""
    return Rule("'auto', 'cpu', 'cuda' or 'cuda:<index>'",
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
    such as mmtx.generate's, on its arguments; default: a training run's: `RULES`, what its constructors declare,
    and its cross-key checks)."""
    for key, (allowed, test) in (RULES if rules is None else rules).items():
        node = _select(cfg, key)
        if node is _ABSENT:
            continue
        if not test(node):
            raise ConfigError(f"{key}={node!r} is not valid: {key} must be {allowed}")
    if rules is not None:
        return
    check_declared(cfg)
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None and not (len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas={list(betas)!r} is not valid: it must be two numbers in [0, 1)")
    dim, heads = OmegaConf.select(cfg, "backbone.dim"), OmegaConf.select(cfg, "backbone.num_heads")
    if _integer(dim) and _integer(heads) and dim % heads:
        raise ConfigError(f"backbone.dim={dim} is not divisible by backbone.num_heads={heads}")
    check_experts(cfg)


def check_experts(cfg: DictConfig) -> None:
    """`backbone.mlp=moe`: the keys of `backbone.moe` together (top_k within num_experts), and every_n_blocks
    dividing the depth of each stack (the backbone's, an encoder-decoder's decoder's)."""
    if OmegaConf.select(cfg, "backbone.mlp", default=None) != "moe":
        return
    from mmtx.nn.mlp import MoeSpec

    spec = MoeSpec(**OmegaConf.to_container(cfg.backbone.moe, resolve=True))
    depths = {"backbone.depth": OmegaConf.select(cfg, "backbone.depth"),
              "family.decoder.depth": OmegaConf.select(cfg, "family.decoder.depth", default=None)}
    for key, depth in depths.items():
        if _integer(depth):
            spec.check_depth(depth, key)


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


def check_declared(cfg: DictConfig) -> None:
    """Check every value of `cfg` that an mmtx constructor declares a rule for (see the module's docstring)."""
    nodes: list[tuple[str, DictConfig, dict[str, Rule]]] = [("", cfg, {})]
    for path, node, rules in nodes:  # in the configuration's order, each node's keys before those below it
        target = node.get("_target_") if "_target_" in node else None
        if isinstance(target, str) and target.startswith("mmtx."):
            rules = declared(target)
        elif path in TAKEN_BY:
            target, nullable = TAKEN_BY[path]
            rules = {k: _or_null(r) if nullable else r for k, r in declared(target).items()}
        for key in node:
            where = f"{path}.{key}" if path else str(key)
            if OmegaConf.is_missing(node, key):  # ???: filled later (init_from's weights), or named when built
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                nodes.append((where, value, {}))
            elif key in rules and not isinstance(value, ListConfig) and not rules[key].test(value):
                raise ConfigError(f"{where}={value!r} is not valid: {where} must be {rules[key].words}")


@functools.cache
def declared(target: str) -> dict[str, Rule]:
    """{parameter: its rule} of the class or function `target` names: its `Annotated[..., Rule]` parameters, and its
    plain int, float and bool ones (for a class, its mmtx base classes' too, which its own override)."""
    from hydra.utils import get_object

    try:
        found = get_object(target)
    except Exception:  # noqa: BLE001 - a target that does not import is Hydra's error to name, when it builds it
        return {}
    if isinstance(found, type):
        functions = [c.__dict__["__init__"] for c in reversed(found.__mro__)
                     if "__init__" in c.__dict__ and c.__module__.startswith("mmtx")]
    else:
        functions = [found]
    rules: dict[str, Rule] = {}
    for function in functions:
        for name, hint in _hints(function).items():
            rule = _rule_of(hint)
            if rule is not None and name != "return":
                rules[name] = rule
    return rules


def _hints(function: Any) -> dict[str, Any]:
    """The parameters' type hints of `function`, each evaluated alone (a name imported only for type checkers
    leaves that parameter out, not the others)."""
    hints = {}
    for name, hint in inspect.get_annotations(function).items():
        try:
            hints[name] = eval(hint, function.__globals__) if isinstance(hint, str) else hint  # noqa: S307
        except Exception:  # noqa: BLE001
            continue
    return hints


_PLAIN = {int: Rule("a whole number", _integer), float: Rule("a number", is_number), bool: boolean()}


def _rule_of(hint: Any) -> Rule | None:
    if typing.get_origin(hint) is Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Rule)), None) or _rule_of(typing.get_args(hint)[0])
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:  # X | None
        inner = _rule_of(next(a for a in args if a is not type(None)))
        return None if inner is None else _or_null(inner)
    return _PLAIN.get(hint)


def _or_null(rule: Rule) -> Rule:
    if rule.test(None):
        return rule
    return Rule(f"{rule.words} or null", lambda v: v is None or rule.test(v))
