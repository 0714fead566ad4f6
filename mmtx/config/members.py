"""Co-training: several tasks (members) on one shared backbone in one run.

A co-training task file lists `members`, each an existing task by name; the run builds one backbone (the
run's `backbone` group) and, per member, the data, tokenizer and task part of that member's own task file
(PolyViT: Likhosherstov et al., TMLR 2023; "One Model To Learn Them All": Kaiser et al., 2017):

    members:
      audio: {task: audio_fsdd}
      asr: {task: asr_fsdd, tokenizer_from: audio, loss_weight: 1.0}

A member entry: `task` (a task name), `overrides` (Hydra overrides applied when the member's task is
composed: `[data.batch_size=32]`), any other config subtree merged on top (`data: {batch_size: 32}`),
`loss_weight` (its loss is multiplied by it; 1.0), `sample_weight` (the `weighted` schedule: a number, `steps`:
the optimizer steps its task trains alone, as PolyViT weights tasks, or null: the
member's number of training batches an epoch), `tokenizer_from` (another member whose tokenizer this one
uses: one mel front end for two audio tasks), and `monitor`/`mode`/`reference` (the member's validation
metric, its direction and its reference value, for `cotrain.best: mean`).

The schedules that pick a member per training step and the members' data behind one data module:
`mmtx.data.cotrain`. This module: the members' configurations and settings, and the best-checkpoint score.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmtx.checkpoints.io import SINGLE
from mmtx.config.validate import is_number, validate
from mmtx.data.cotrain import CoTrainData
from mmtx.errors import ConfigError

log = logging.getLogger(__name__)

MEMBER_KEYS = ("task", "overrides", "loss_weight", "sample_weight", "tokenizer_from", "monitor", "mode", "reference")
# Backbone keys that shape its weights or what they compute: the run's apply to every member; a member entry
# that sets one to another value is an error, a member task whose own file differs is warned about.
SHARED_BACKBONE_KEYS = ("dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "bias", "rotary", "norm_eps", "activation",
                        "block", "mlp", "moe")


def is_cotrain(cfg: DictConfig | dict) -> bool:
    """Whether `cfg` is a co-training run (it lists members)."""
    return bool(cfg.get("members"))


def task_names() -> list[str]:
    """The shipped task names (conf/task/*.yaml, without the shared fragments that start with `_`)."""
    from mmtx.files import config_dir

    return sorted(p.stem for p in Path(config_dir(), "task").glob("*.yaml") if not p.stem.startswith("_"))


def compose_task(task: str, overrides: list[str]) -> DictConfig:
    """A task's run configuration, composed as `python -m mmtx.train task=TASK OVERRIDES` would; inside a
    running Hydra app its own config search path is used (without resetting Hydra)."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="train", overrides=[f"task={task}", *overrides])
    from mmtx.config.compose import compose

    return compose(task, overrides)


def member_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The composed configuration of every member: its own task file, its overrides, then the run's seed
    and the shared backbone (after checking that the member's backbone agrees with it)."""
    members = cfg.get("members") or {}
    known = task_names()
    out: dict[str, DictConfig] = {}
    for name, spec in members.items():
        where = f"members.{name}"
        if spec is None or not isinstance(spec, (dict, DictConfig)) or not spec.get("task"):
            raise ConfigError(f"{where} needs a `task:` (one of: {', '.join(known)})")
        task = str(spec.task)
        if task not in known:
            raise ConfigError(f"{where}.task={task!r} is not a task; the tasks are: {', '.join(known)}")
        overrides = [str(o) for o in (spec.get("overrides") or [])]
        try:
            member = compose_task(task, overrides)
        except (HydraException, OmegaConfBaseException) as err:  # Hydra's own message names the bad override
            raise ConfigError(f"{where}: composing task {task!r} with overrides {overrides} failed: {err}") from None
        if is_cotrain(member):
            raise ConfigError(f"{where}.task={task!r} is itself a co-training task; members are single tasks")
        OmegaConf.set_struct(member, False)
        # The run's seed, folders and data root (data.root, if set) reach every member's interpolations.
        run = {"seed": cfg.seed, "paths": OmegaConf.to_container(cfg.paths, resolve=True)}
        if cfg.get("data") is not None and cfg.data.get("root") is not None:
            run["data"] = {"root": cfg.data.root}
        tree = {k: v for k, v in OmegaConf.to_container(spec, resolve=True).items() if k not in MEMBER_KEYS}
        member = OmegaConf.merge(member, run, tree)
        _check_backbone(name, task, spec, member, cfg)
        member.backbone = OmegaConf.merge(cfg.backbone, {})  # dropout, drop_path, ...: the run's
        try:
            validate(member)
        except ConfigError as err:
            raise ConfigError(f"{where} (task {task}): {err}") from None
        out[name] = member
    _check_shared_tokenizers(members, out)
    return out


def _check_backbone(name: str, task: str, spec: DictConfig, member: DictConfig, cfg: DictConfig) -> None:
    """A member's backbone keys against the shared backbone's: an error where the member entry asks for another
    value, a warning where only its task file differs."""
    where = f"members.{name}"
    asked = _asked_backbone(spec)
    for key in SHARED_BACKBONE_KEYS:
        theirs, ours = member.backbone.get(key), cfg.backbone.get(key)
        if theirs == ours:
            continue
        if key in asked:
            raise ConfigError(
                f"member {name!r} (task {task}) asks for backbone.{key}={theirs}, but the co-training run's "
                f"backbone has backbone.{key}={ours}: the backbone is shared by all members, so set the run's "
                f"backbone.{key} instead (and drop it from {where})")
        log.warning("member %r: task %s trains alone with backbone.%s=%s; the shared backbone's %s applies here",
                    name, task, key, theirs, ours)


def _check_shared_tokenizers(members: DictConfig, out: dict[str, DictConfig]) -> None:
    """`members.<name>.tokenizer_from`: names another member that owns its tokenizer, of the same config."""
    source_names = {name: spec.get("tokenizer_from") for name, spec in members.items()}
    for name, source in source_names.items():
        if source is None:
            continue
        if source not in out or source == name:
            raise ConfigError(f"members.{name}.tokenizer_from={source!r} names no other member "
                              f"(members: {', '.join(out)})")
        if source_names.get(source):
            raise ConfigError(f"members.{name}.tokenizer_from={source!r}: that member takes its tokenizer from "
                              f"{source_names[source]!r}; name that one")
        mine = OmegaConf.to_container(out[name].tokenizer, resolve=True)
        theirs = OmegaConf.to_container(out[source].tokenizer, resolve=True)
        if mine != theirs:
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"members.{name}.tokenizer_from={source!r}: the two members' tokenizers differ in "
                              f"{', '.join(f'tokenizer.{k}' for k in differ)}; a shared tokenizer needs one config")


def resolved_members(cfg: DictConfig) -> dict[str, DictConfig]:
    """The members' configurations: those stored in the run's config (`member_configs`, written by
    `resolve_cotrain` at the start of training and kept in every checkpoint), else composed now."""
    stored = cfg.get("member_configs")
    if stored:
        return {name: OmegaConf.create(OmegaConf.to_container(node, resolve=True)) for name, node in stored.items()}
    return member_configs(cfg)


def resolve_cotrain(cfg: DictConfig) -> DictConfig:
    """A co-training run's configuration made complete at its start: `member_configs` holds every member's
    composed and resolved configuration (so the run folder's config.yaml and the checkpoints say exactly
    what each member was, and eval rebuilds it without the task files), and the checkpoint callback
    monitors what `cotrain.best` names (`mean`: `val/score`; a member: that member's metric)."""
    if not is_cotrain(cfg) or cfg.get("member_configs"):
        return cfg
    members = member_configs(cfg)
    settings = member_settings(cfg, members)
    best = cfg.cotrain.get("best", "mean")
    if best == "mean":
        monitor, mode = "val/score", "max"
    elif best in settings:
        monitor, mode = settings[best]["monitor"], settings[best]["mode"]
    else:
        raise ConfigError(f"cotrain.best={best!r} must be `mean` or a member: {', '.join(settings)}")
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.member_configs = {name: OmegaConf.to_container(m, resolve=True) for name, m in members.items()}
    if cfg.get("callbacks") and cfg.callbacks.get("checkpoint"):
        cfg.callbacks.checkpoint.monitor, cfg.callbacks.checkpoint.mode = monitor, mode
    OmegaConf.set_struct(cfg, True)
    return cfg


def _asked_backbone(spec: DictConfig) -> set[str]:
    """The backbone keys a member entry itself sets (in `overrides` or its `backbone:` subtree)."""
    keys = set((spec.get("backbone") or {}).keys())
    for override in spec.get("overrides") or []:
        key = str(override).lstrip("+~").split("=", 1)[0]
        if key.startswith("backbone."):
            keys.add(key.split(".", 1)[1])
    return keys


def member_settings(cfg: DictConfig, configs: dict[str, DictConfig]) -> dict[str, dict[str, Any]]:
    """Per member: loss weight, sample weight, shared tokenizer, and the validation metric it is judged by
    (`{member}/{monitor}`, its mode, its reference), each defaulting to the member task's own."""
    settings = {}
    for name, spec in cfg.members.items():
        own = configs[name].get("callbacks", {}).get("checkpoint") or {}
        loss_weight = spec.get("loss_weight")
        loss_weight = 1.0 if loss_weight is None else loss_weight
        sample_weight = spec.get("sample_weight")
        if not is_number(loss_weight) or loss_weight < 0:
            raise ConfigError(f"members.{name}.loss_weight must be a number >= 0, got {loss_weight!r}")
        if sample_weight not in (None, "steps") and not (is_number(sample_weight) and sample_weight > 0):
            raise ConfigError(f"members.{name}.sample_weight must be a number > 0, `steps` (the training steps of "
                              f"the member's task alone) or null (its training batches an epoch), got {sample_weight!r}")
        mode = spec.get("mode") or own.get("mode", "max")
        if mode not in ("min", "max"):
            raise ConfigError(f"members.{name}.mode must be min or max, got {mode!r}")
        settings[name] = {
            "loss_weight": float(loss_weight),
            "sample_weight": sample_weight if sample_weight in (None, "steps") else float(sample_weight),
            "tokenizer_from": spec.get("tokenizer_from"),
            "monitor": f"{name}/{spec.get('monitor') or own.get('monitor', 'val/loss')}",
            "mode": mode,
            "reference": None if spec.get("reference") is None else float(spec.reference),
        }
    return settings


def run_members(cfg: DictConfig) -> tuple[dict[str, DictConfig], dict[str, dict[str, Any]]]:
    """The run's members and their settings (`member_settings`): a co-training run's, or a single-task run as
    its one member `main` (its own task, loss weight 1, its own tokenizer)."""
    if is_cotrain(cfg):
        members = resolved_members(cfg)
        return members, member_settings(cfg, members)
    return {SINGLE: cfg}, {SINGLE: {"loss_weight": 1.0, "sample_weight": None, "tokenizer_from": None}}


def own_steps(member: DictConfig, datamodule: Any) -> float:
    """The optimizer steps a member's task trains alone: its `trainer.max_steps`, else `trainer.max_epochs`
    epochs of its training batches (`sample_weight: steps`, PolyViT's weighting)."""
    trainer = member.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps > 0:
        return float(max_steps)
    epochs = trainer.get("max_epochs")
    if epochs is None or epochs <= 0:
        return None  # unbounded alone: `sample_weight: steps` and `cotrain.max_steps: sum` say so when asked
    return float(epochs * len(datamodule.train_dataloader()))


def with_total_steps(cfg: DictConfig, datamodule: CoTrainData) -> DictConfig:
    """`cotrain.max_steps: sum`: the run trains the sum of the steps its members train alone
    (`trainer.max_steps`; the epochs then do not bound it). A `trainer.max_steps` the run sets itself (on the
    command line: `trainer.max_steps=12`) wins: the sum is derived only where the run leaves it unbounded (-1)."""
    if not is_cotrain(cfg) or cfg.cotrain.get("max_steps") != "sum":
        return cfg
    if (cfg.trainer.get("max_steps") or -1) > 0:
        log.info("co-training for trainer.max_steps=%d steps (set for the run; cotrain.max_steps=sum applies only "
                 "when trainer.max_steps is -1)", cfg.trainer.max_steps)
        return cfg
    unbounded = [name for name, steps in datamodule.own_steps.items() if steps is None]
    if unbounded:
        raise ConfigError(f"cotrain.max_steps=sum: member(s) {', '.join(unbounded)} set neither trainer.max_steps "
                          "nor trainer.max_epochs in their task; set the run's trainer.max_steps instead")
    total = int(sum(datamodule.own_steps.values()))
    log.info("co-training for %d steps, the sum of the members' own: %s", total,
             ", ".join(f"{name} {int(steps)}" for name, steps in datamodule.own_steps.items()))
    cfg = cfg.copy()
    cfg.trainer.max_steps, cfg.trainer.max_epochs = total, -1
    return cfg


def normalised_score(value: float, mode: str, reference: float) -> float:
    """A member's metric against its reference: 1.0 at the reference, higher is better, and a change of one
    reference's worth moves it by 1 either way (max: value / reference; min: 2 - value / reference)."""
    return value / reference if mode == "max" else 2.0 - value / reference


class CoTrainScore(L.Callback):
    """`val/score`: the mean over members of each member's validation metric normalised against its
    reference (`normalised_score`), computed after every validation, before the checkpoint callbacks
    (Lightning runs those last) read it: `callbacks.checkpoint.monitor: val/score` (mode max) keeps the
    checkpoint that is best for the members together."""

    def __init__(self, members: dict[str, dict[str, Any]]) -> None:
        missing = [name for name, m in members.items() if not m.get("reference")]
        if missing:
            raise ConfigError(f"cotrain.best=mean needs a reference value for every member: set "
                              f"{', '.join(f'members.{n}.reference' for n in missing)} (or cotrain.best=<member>)")
        self.members = members

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = []
        for m in self.members.values():
            value = trainer.callback_metrics.get(m["monitor"])
            if value is None:
                return  # a member not validated this time: no score (the checkpoint keeps the last best)
            scores.append(normalised_score(float(value), m["mode"], m["reference"]))
        score = torch.tensor(sum(scores) / len(scores))
        trainer.callback_metrics["val/score"] = score
        for logger in trainer.loggers:
            logger.log_metrics({"val/score": float(score)}, step=trainer.global_step)
