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

Schedules (`cotrain.schedule`, PolyViT's names), one member per optimizer step unless noted:
  weighted      a member drawn at random, with probability proportional to its `sample_weight` (default)
  uniform       a member drawn at random, all equally likely
  round_robin   the members in turn
  accumulate    every member at every step: one batch of each, the weighted losses summed
The draws are seeded by `cotrain.seed` and the epoch, identical on every rank (so every DDP rank trains the
same member at a step), and a run resumed mid-epoch continues the same sequence of members and batches.

An epoch is the sum of the members' training batches (accumulate: the largest member's); a member whose
batches run out starts its next epoch (a new shuffle) within the co-training epoch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmtx.errors import ConfigError
from mmtx.validate import is_number, validate

log = logging.getLogger(__name__)

SCHEDULES = ("weighted", "uniform", "round_robin", "accumulate")
MEMBER_KEYS = ("task", "overrides", "loss_weight", "sample_weight", "tokenizer_from", "monitor", "mode", "reference")
# Backbone keys that shape its weights or what they compute: the run's apply to every member; a member entry
# that sets one to another value is an error, a member task whose own file differs is warned about.
SHARED_BACKBONE_KEYS = ("dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "bias", "rotary")


def is_cotrain(cfg: DictConfig | dict) -> bool:
    """Whether `cfg` is a co-training run (it lists members)."""
    return bool(cfg.get("members"))


def task_names() -> list[str]:
    """The shipped task names (conf/task/*.yaml, without the shared fragments that start with `_`)."""
    from mmtx.config import config_dir

    return sorted(p.stem for p in Path(config_dir(), "task").glob("*.yaml") if not p.stem.startswith("_"))


def _compose_task(task: str, overrides: list[str]) -> DictConfig:
    """A task's run configuration, composed as `python -m mmtx.train task=TASK OVERRIDES` would; inside a
    running Hydra app its own config search path is used (without resetting Hydra)."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="train", overrides=[f"task={task}", *overrides])
    from mmtx.config import compose

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
            member = _compose_task(task, overrides)
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
        member.backbone = OmegaConf.merge(cfg.backbone, {})  # dropout, drop_path, ...: the run's
        try:
            validate(member)
        except ConfigError as err:
            raise ConfigError(f"{where} (task {task}): {err}") from None
        out[name] = member
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
    return out


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
    (`trainer.max_steps`; the epochs then do not bound it)."""
    if not is_cotrain(cfg) or cfg.cotrain.get("max_steps") != "sum":
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


def member_sequence(schedule: str, weights: list[float], length: int, seed: int, epoch: int) -> torch.Tensor:
    """The member (its position in `weights`) trained at each of the `length` steps of co-training epoch
    `epoch`; seeded by (seed, epoch) only, so every rank and every resumed run draws the same."""
    n = len(weights)
    if schedule == "round_robin":
        return (torch.arange(length) + epoch * length) % n
    if schedule == "accumulate":
        raise ValueError("accumulate trains every member at every step: no sequence")
    probs = torch.tensor(weights if schedule == "weighted" else [1.0] * n, dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (epoch + 1))
    return torch.multinomial(probs, length, replacement=True, generator=generator)


class _MemberStream:
    """One member's training index batches, one member epoch after the next (its own seeded shuffle each),
    starting `done` batches in (so a resumed run continues where it stopped); under DDP every rank takes
    every `world`-th batch of the epoch."""

    def __init__(self, loader, done: int, per_epoch: int, rank: int, world: int) -> None:
        self.loader, self.per_epoch, self.rank, self.world = loader, per_epoch, rank, world
        self.epoch, offset = divmod(done, per_epoch)
        self._iterator = self._epoch_batches()
        for _ in range(offset):
            next(self._iterator)

    def _epoch_batches(self) -> Iterator[Any]:
        for sampler in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
        batches = itertools.islice(iter(self.loader), self.rank, None, self.world)
        return itertools.islice(batches, self.per_epoch)

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._iterator = self._epoch_batches()
            return next(self._iterator)


class ScheduleLoader:
    """The co-training run's training loader: per step, the index batch of the member the schedule picks
    (`{"member": name, "index": ..., "split": "train"}`), or of every member (`accumulate`:
    `{"members": {name: batch}}`). Resumable like `mmtx.data.base.ResumableLoader`: its place in the epoch is
    saved with the fit loop, and the members' places are recomputed from the schedule's draws."""

    def __init__(self, owner: L.LightningDataModule, loaders: dict[str, Any], schedule: str,
                 sample_weights: dict[str, float | None], seed: int) -> None:
        self.owner, self.loaders, self.schedule, self.seed = owner, loaders, schedule, int(seed)
        self.names = list(loaders)
        self.rank, self.world = _rank_and_world(owner)
        self.per_epoch = {name: len(loader) // self.world for name, loader in loaders.items()}
        empty = [name for name, n in self.per_epoch.items() if n == 0]
        if empty:
            raise ConfigError(f"member(s) {', '.join(empty)} have no full training batch "
                              "(members.<name>.data.batch_size is larger than the training split)")
        self.weights = [sample_weights.get(name) or float(self.per_epoch[name]) for name in self.names]
        counts = list(self.per_epoch.values())
        self.length = max(counts) if schedule == "accumulate" else sum(counts)
        self._epoch: int | None = None
        self._skip = 0
        self._sequences: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def sequence(self, epoch: int) -> torch.Tensor:
        if epoch not in self._sequences:
            self._sequences = {epoch: member_sequence(self.schedule, self.weights, self.length, self.seed, epoch)}
        return self._sequences[epoch]

    def batches_done(self, epoch: int, steps: int) -> list[int]:
        """How many batches each member has trained before step `steps` of epoch `epoch`."""
        if self.schedule == "accumulate":
            return [epoch * self.length + steps] * len(self.names)
        done = torch.zeros(len(self.names), dtype=torch.long)
        for e in range(epoch):
            done += torch.bincount(member_sequence(self.schedule, self.weights, self.length, self.seed, e),
                                   minlength=len(self.names))
        done += torch.bincount(self.sequence(epoch)[:steps], minlength=len(self.names))
        return done.tolist()

    def state_dict(self) -> dict[str, int]:
        trainer = getattr(self.owner, "trainer", None)
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(trainer.current_epoch), "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= self.length:  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self._epoch, self._skip = epoch, batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        trainer = getattr(self.owner, "trainer", None)
        epoch = self._epoch if self._epoch is not None else (int(trainer.current_epoch) if trainer else 0)
        skip, self._epoch, self._skip = self._skip, None, 0
        done = self.batches_done(epoch, skip)
        streams = {name: _MemberStream(self.loaders[name], done[i], self.per_epoch[name], self.rank, self.world)
                   for i, name in enumerate(self.names)}
        if self.schedule == "accumulate":
            for _ in range(skip, self.length):
                yield {"members": {name: next(stream) for name, stream in streams.items()}}
            return
        sequence = self.sequence(epoch).tolist()
        for step in range(skip, self.length):
            name = self.names[sequence[step]]
            yield {**next(streams[name]), "member": name}


def _rank_and_world(owner: L.LightningDataModule) -> tuple[int, int]:
    trainer = getattr(owner, "trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class CoTrainData(L.LightningDataModule):
    """The members' data modules behind one: training batches by the schedule (`ScheduleLoader`), and
    for validation and test one loader per member (Lightning's multiple loaders: each member validated on
    its whole validation split every time, sharded by Lightning under DDP)."""

    def __init__(self, members: dict[str, Any], schedule: str = "weighted",
                 sample_weights: dict[str, float | None] | None = None, seed: int = 0,
                 own_steps: dict[str, float | None] | None = None) -> None:
        super().__init__()
        self.members = members
        self.own_steps = own_steps or {}  # the optimizer steps each member's task trains alone
        self.schedule = schedule
        self.sample_weights = sample_weights or {}
        self.seed = seed
        if schedule not in SCHEDULES:
            raise ConfigError(f"cotrain.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")

    def prepare_data(self) -> None:
        for dm in self.members.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self.members.values():
            dm.setup(stage)
            dm.trainer = self.trainer  # the members' loaders read the fit loop's progress through their owner

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        return {name: dm.runtime_kwargs() for name, dm in self.members.items()}

    def has_split(self, split: str) -> bool:
        return bool(self._with_split(split))

    def _with_split(self, split: str) -> list[str]:
        return [name for name, dm in self.members.items() if not hasattr(dm, "has_split") or dm.has_split(split)]

    def train_dataloader(self) -> ScheduleLoader:
        loaders = {name: dm.train_dataloader() for name, dm in self.members.items()}
        return ScheduleLoader(self, loaders, self.schedule, self.sample_weights, self.seed)

    def val_dataloader(self) -> list:
        return [self.members[name].val_dataloader() for name in self._with_split("val")]

    def test_dataloader(self) -> list:
        return [self.members[name].test_dataloader() for name in self._with_split("test")]

    def member_of(self, dataloader_idx: int) -> str:
        """The member whose validation (or test) loader has this index."""
        trainer = getattr(self, "trainer", None)
        testing = trainer is not None and trainer.testing
        return self._with_split("test" if testing else "val")[dataloader_idx]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> dict[str, Any]:
        """An index batch -> {member: typed batch}, each gathered by its member's data module."""
        if "members" in batch:
            return {name: self.members[name].on_after_batch_transfer(b) for name, b in batch["members"].items()}
        name = batch.pop("member") if "member" in batch else self.member_of(dataloader_idx)
        return {name: self.members[name].on_after_batch_transfer(batch)}
