"""The data side of co-training (`mmtx.config.members`): the members' data modules behind one, and the schedule that
picks the member (and its batch) of every training step.

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
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from mmtx.data.base import fit_position, resume_position, set_sampler_epoch
from mmtx.errors import ConfigError, DataError

SCHEDULES = ("weighted", "uniform", "round_robin", "accumulate")


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


def streamed(loader: Any) -> bool:
    """Whether `loader` is litdata's (`data=streaming`): it gives each DDP rank its own samples and counts only
    that rank's batches in its length, where an index loader gives every rank every batch."""
    return any(cls.__name__ == "StreamingDataLoader" for cls in type(loader).__mro__)


class _MemberStream:
    """One member's training index batches, one member epoch after the next (its own seeded shuffle each),
    starting `done` batches in (so a resumed run continues where it stopped); under DDP every rank takes
    every `world`-th batch of the epoch, or, from a streamed member (litdata's loader), the batches of its own
    shards."""

    def __init__(self, loader, done: int, per_epoch: int, rank: int, world: int) -> None:
        self.loader, self.per_epoch, self.rank, self.world = loader, per_epoch, rank, world
        self.epoch, offset = divmod(done, per_epoch)
        self._iterator = self._epoch_batches()
        for _ in range(offset):
            next(self._iterator)

    def _epoch_batches(self) -> Iterator[Any]:
        if streamed(self.loader):  # litdata's: each rank reads its own shards; its epoch seeds the order
            self.loader.restore = False
            self.loader.current_epoch = self.epoch  # its iterator counts it up by one, as at every epoch
            return itertools.islice(iter(self.loader), self.per_epoch)
        set_sampler_epoch(self.loader, self.epoch)
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
    `{"members": {name: batch}}`). Resumable as `mmtx.data.base.ResumableLoader` is (the same saved place in
    the epoch); the members' places are recomputed from the schedule's draws."""

    def __init__(self, owner: L.LightningDataModule, loaders: dict[str, Any], schedule: str,
                 sample_weights: dict[str, float | None], seed: int) -> None:
        self.owner, self.loaders, self.schedule, self.seed = owner, loaders, schedule, int(seed)
        self.names = list(loaders)
        self.rank, self.world = _rank_and_world(owner)
        self.per_epoch = {name: len(loader) // (1 if streamed(loader) else self.world) for name, loader in loaders.items()}
        empty = [name for name, n in self.per_epoch.items() if n == 0]
        if empty:
            raise ConfigError(f"member(s) {', '.join(empty)} have no full training batch: their data.batch_size is "
                              f"larger than their training split (set it in members.{empty[0]}.overrides)")
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
        return fit_position(self.owner)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._skip = resume_position(state, self.length)

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

    def check_trainable(self, world_size: int = 1) -> int:
        """The training steps of a co-training epoch on each rank; an error naming the member, the cause and the
        key when a member has no full training batch (as `IndexedSplits.check_trainable`)."""
        for name, dm in self.members.items():
            try:
                batches = dm.check_trainable(1)
                if batches // world_size == 0:
                    raise ConfigError(f"its {batches} full training batch(es) of data.batch_size="
                                      f"{dm.batch_size} do not give each of {world_size} ranks one; lower "
                                      "data.batch_size")
            except (ConfigError, DataError) as err:
                raise type(err)(f"co-training member {name!r}: {err} (a member's keys are set in "
                                f"members.{name}.overrides, e.g. [data.batch_size=4])") from None
        return len(self.train_dataloader())

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
