"""The one data spine every DataModule stands on: one source protocol, index batches, an epoch-seeded
sampler, splits decoded once into cached tensors (hold-out and val/test fallback included) that are
copied to the training device, and the batch gather as a template method.

The DataLoader only yields index batches (cheap, and shuffled and sharded by
Lightning's samplers, DDP included); `on_after_batch_transfer` hands each one
to the subclass's `gather`, which cuts the samples out of the copy of the split
on the training device, augments the whole batch there and returns a typed
batch (`mmtx.batch`). A CPU DataLoader never starves the GPU.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmtx.data.cache import load_or_build
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, Rate
from mmtx.files import resolve_root

log = logging.getLogger(__name__)


class Source(Protocol):
    """Where a data module's samples come from (images, audio, text, pairs): every source kind in
    `mmtx.data.*_sources` has this shape, and `CachedSplits` caches what `decode` returns per split."""

    cache_name: str  # a file-name-safe identity of the source, for its cache files

    def splits(self) -> list[str]: ...  # e.g. ["train", "test"]; "val" when the source has one
    def fingerprint(self, split: str) -> str: ...  # changes when the split's raw data changes
    def decode(self, split: str) -> dict[str, Any]: ...  # the split as tensors and plain values


class IndexDataset(torch.utils.data.Dataset):
    """Indices 0..n-1 of one split; batched fetches return one index tensor."""

    def __init__(self, split: str, size: int) -> None:
        self.split, self.size = split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        return {"index": torch.tensor(indices, dtype=torch.long), "split": self.split}


def identity(batch):
    return batch


def gather_padded(flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                  pad_value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length samples cut out of one flat tensor: (B, L) padded with `pad_value` to the
    longest of them, and the mask of real positions (B, L). offsets, lengths: (B,)."""
    steps = torch.arange(int(lengths.max()), device=offsets.device)  # (L,)
    inside = steps[None, :] < lengths[:, None]  # (B, L)
    where = (offsets[:, None] + steps[None, :]).clamp_max(flat.numel() - 1)  # (B, L)
    return flat[where].masked_fill(~inside, pad_value), inside


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh random order every epoch, fixed by (seed, epoch) alone.

    Lightning calls `set_epoch` at each epoch start (as for DistributedSampler),
    so a run resumed at an epoch boundary sees the same batches as one that
    never stopped.

    With `lengths` and `batch_size`, samples of similar length are batched
    together (less padding): the shuffled order is cut into windows of 4
    batches, each sorted by length and cut into batches, and the full batches
    are shuffled (as Hugging Face's group_by_length, with small windows so that a
    batch still mixes classes whose clips differ in length).
    """

    def __init__(self, size: int, seed: int = 0, lengths: torch.Tensor | None = None, batch_size: Count = 1) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.lengths is None:
            return iter(order.tolist())
        window = 4 * self.batch_size
        full, partial = [], []
        for start in range(0, self.size, window):
            chunk = order[start:start + window]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True)]
            for batch in chunk.split(self.batch_size):
                (full if len(batch) == self.batch_size else partial).append(batch)
        batches = [full[i] for i in torch.randperm(len(full), generator=generator)] + partial  # partial ones last
        return iter(torch.cat(batches).tolist())


def fit_position(owner: L.LightningDataModule | None) -> dict[str, int]:
    """A training loader's place, as its checkpointed state: the epoch and the batches the trainer finished in
    it (not those the loader yielded: Lightning fetches one ahead). `owner`: the DataModule, whose trainer knows."""
    trainer = getattr(owner, "trainer", None)
    if trainer is None:
        return {"epoch": 0, "batches": 0}
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return {"epoch": int(trainer.current_epoch), "batches": int(done)}


def resume_position(state: dict[str, int], length: int) -> tuple[int, int]:
    """(epoch, batches to skip) where a loader of `length` batches a epoch goes on from `fit_position`'s state:
    saved at the end of an epoch, the next one from its beginning."""
    epoch, batches = int(state["epoch"]), int(state["batches"])
    return (epoch + 1, 0) if batches >= length else (epoch, batches)


def set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    """Give `loader`'s sampler (or its batch sampler's) the epoch whose seeded order it is to draw."""
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """A DataLoader of index batches whose place in the epoch is saved in checkpoints and restored on
    resume, so a run stopped at any step trains on exactly the batches it would have seen.

    Lightning saves `state_dict()` with the fit loop and calls `load_state_dict()` before it starts
    iterating again; the next iterator then skips the batches already trained (index batches only:
    cheap). The position is the number of batches the trainer finished in the epoch, not the number
    this loader yielded (Lightning fetches one ahead). `owner` is the DataModule, whose trainer knows.
    Every loader draws its iterator seed from its own generator (`generator`), not the global RNG, so
    that creating a loader's iterator (validation, a resume) does not shift the random numbers of
    training (dropout, augmentation).
    """

    def __init__(self, *args: Any, owner: L.LightningDataModule | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        self._skip: int = 0

    def state_dict(self) -> dict[str, int]:
        return fit_position(self.owner)

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, self._skip = resume_position(state, len(self))
        set_sampler_epoch(self, epoch)  # the iterator is made before Lightning sets the epoch

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator


def index_loader(split: str, size: int, batch_size: int, sampler=None, train: bool = False,
                 owner: L.LightningDataModule | None = None, seed: int = 0) -> DataLoader:
    """The loader of one split's index batches: resumable (training) and with its own generator."""
    dataset = IndexDataset(split, size)
    generator = torch.Generator().manual_seed(seed)
    # Training batches keep a fixed size (Mixup pairs samples; shapes stay static).
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=identity,
                           generator=generator, owner=owner)


def subset_order(size: int, labels: torch.Tensor | None, seed: int) -> list[int]:
    """A seeded order of a split's samples whose every prefix is a fair subset: the classes taken in turn
    (round robin, each class's samples in a seeded random order) when `labels` (N,) are given, else a seeded
    permutation. The whole split in this order gives the same figures as in any other."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    if labels is None or labels.dim() != 1:
        return order.tolist()
    shuffled = labels[order]
    turn = torch.zeros(size, dtype=torch.long)  # each sample's place among its class's samples
    for c in shuffled.unique():
        members = shuffled == c
        turn[members] = torch.arange(int(members.sum()))
    return order[torch.argsort(turn * (int(labels.max()) + 1) + shuffled, stable=True)].tolist()


def hold_out(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded split of n sample indices: (kept, held out), each sorted; at least one held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = max(1, int(round(n * fraction)))
    return order[n_out:].sort().values, order[:n_out].sort().values


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int, classes: list[str]) -> torch.Tensor:
    """Sorted indices of a seeded, class-stratified `fraction` of `labels`: round(fraction x n_c) samples of each
    class c. A class left with none is an error naming it and the fraction."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = (labels == c).nonzero().flatten()
        if not len(members):
            continue
        n = int(round(len(members) * fraction))
        if n == 0:
            name = classes[c] if c < len(classes) else c
            raise ConfigError(f"data.label_fraction={fraction} leaves class {name!r} without a labelled sample (it has "
                              f"{len(members)} training samples): raise data.label_fraction to at least "
                              f"{1 / len(members):.3g}")
        kept.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(kept).sort().values


class IndexedSplits(L.LightningDataModule, abc.ABC):
    """What the cached-data modules share: `splits` = {split: {name: tensor}}, index-only loaders
    (a fresh seeded order per training epoch; samples of similar length batched together when the
    split has `lengths_key`) and the copy of each split on the training device.

    A subclass fills `splits` in `setup` and names the per-sample tensor that counts its samples
    (`size_key`) and the one that holds their lengths (`lengths_key`, if any).
    """

    size_key = "labels"
    lengths_key = "lengths"
    classes: list[str] | tuple[str, ...] = ()  # the class names of labelled data, set by `setup`

    def __init__(self, batch_size: Count, eval_batch_size: MaybeCount, device_resident: bool, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.device_resident = device_resident
        self.seed = seed
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self._on_device: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}

    def num_samples(self, split: str) -> int:
        """How many samples (index values) `split` has."""
        return len(self.splits[split][self.size_key])

    def check_trainable(self, world_size: int = 1, prefix: str = "data.") -> int:
        """The full training batches an epoch gives each of `world_size` ranks (training drops a last partial
        batch); an error naming the cause and the key to change when there are none (an empty training split,
        fewer samples than a batch). `prefix`: where this data's keys are (a co-training member's)."""
        n = self.num_samples("train") if self.has_split("train") else 0
        if n == 0:
            held = getattr(self, "val_fraction", 0) or 0
            val = self.num_samples("val") if held and "val" in self.splits else 0
            cause = (f"{prefix}val_fraction={held} holds out all {val} of its samples for validation; lower it" if held
                     else "the data source has no training samples; check its path")
            raise DataError(f"the training split is empty: {cause}")
        per_rank = -(-n // world_size)  # the distributed sampler gives each rank ceil(n / world_size)
        batches = per_rank // self.batch_size
        if batches == 0:
            ranks = f" ({per_rank} for each of {world_size} ranks)" if world_size > 1 else ""
            raise ConfigError(f"the training split has {n} samples{ranks}, fewer than {prefix}batch_size="
                              f"{self.batch_size}, and training takes full batches only: no optimizer step would "
                              f"be taken; set {prefix}batch_size={per_rank} or less (or give it more data)")
        return batches

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if split not in self.splits:
            raise DataError(f"the data source has no {split!r} split (it has {sorted(self.splits)})")
        size = self.num_samples(split)
        lengths = self.splits[split].get(self.lengths_key)  # variable-length samples: batch similar lengths
        if train:
            sampler = EpochShuffle(size, self.seed, lengths, batch_size)
        elif self._limited(split, size, batch_size):
            sampler = subset_order(size, self.splits[split].get("labels"), self.seed)
        else:
            sampler = None if lengths is None else torch.argsort(lengths, descending=True).tolist()
        return index_loader(split, size, batch_size, sampler, train, owner=self, seed=self.seed)

    def _limited(self, split: str, size: int, batch_size: int) -> bool:
        """Whether the trainer evaluates only part of `split` (`trainer.limit_val_batches` / `limit_test_batches`
        below the whole): its first batches must then be a fair sample, not the first classes of a split stored
        in class order. Said in one line, with how many samples the figure is of."""
        trainer = getattr(self, "trainer", None)  # set by Lightning when the module is attached
        key = f"limit_{'val' if split == 'val' else 'test'}_batches"
        limit = getattr(trainer, key, 1.0) if trainer is not None else 1.0
        batches = -(-size // batch_size)
        used = limit if isinstance(limit, int) else int(limit * batches)
        if used >= batches:
            return False
        how = "a seeded subset that takes the classes in turn" if "labels" in self.splits[split] else "a seeded subset"
        log.info("trainer.%s=%s: the %s figures are of %d of its %d samples, %s", key, limit, split,
                 min(size, used * batch_size), size, how)
        return True

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def has_split(self, split: str) -> bool:
        """Whether the data has this split (a source may have no test split)."""
        self.setup()
        return split in self.splits

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int = 0) -> Any:
        """An index batch moves its one tensor (Lightning's generic walk over the dict costs more than the copy)."""
        if isinstance(batch, dict) and set(batch) == {"index", "split"}:
            return {"index": batch["index"].to(device, non_blocking=True), "split": batch["split"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """An index batch `{"index": (B,), "split": name}` -> the typed batch of those samples, gathered
        (and, for training, augmented) on the device the indices were moved to."""
        if not isinstance(batch, dict):  # already a batch (a user's own loader)
            return batch
        device, split = batch["index"].device, batch["split"]
        index = batch["index"] if self.device_resident else batch["index"].cpu()  # where the split's tensors are
        return self.gather(split, self._store(split, device), index, device)

    @abc.abstractmethod
    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> Any:
        """The typed batch (`mmtx.batch`) of samples `index` of `split`, whose tensors are `store`."""

    def _store(self, split: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The split's tensors on `device` (copied there once), or on the CPU when not device-resident."""
        if not self.device_resident:
            return self.splits[split]
        key = (split, device)
        if key not in self._on_device:
            self._on_device[key] = {k: v.to(device) for k, v in self.splits[split].items()}
        return self._on_device[key]


class CachedSplits(IndexedSplits):
    """Samples from a `Source`, each split decoded once into a cache (`mmtx.data.cache`); a subclass
    turns the caches into tensors (`tensors`). `sample_keys` names the tensors indexed by sample; any
    other tensor of a split is shared by its samples (a flat waveform, flat token ids).

    val_fraction: the share of the training split held out for validation (a fixed, seeded choice);
    with 0 the source's `val` split is used, or else its `test` split (`val_from` records which).
    root: the data root the source was looked up under (`data.root`, else $MMTX_DATA_DIR, else
    ./data); kept for messages.
    """

    sample_keys: tuple[str, ...] = ("labels",)

    def __init__(self, source: Source, cache_dir: str, root: str | None = None, batch_size: Count = 128,
                 eval_batch_size: MaybeCount = None, val_fraction: Rate = 0.0, device_resident: bool = True,
                 seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, device_resident, seed)
        self.source = source
        self.root = resolve_root(root)
        self.cache_dir = Path(cache_dir)
        self.val_fraction = val_fraction
        self.val_from: str | None = None  # the split validation samples come from, when not "val"

    def _cache(self, split: str) -> dict[str, Any]:
        path = self.cache_dir / f"{self.source.cache_name}-{split}.pt"
        return load_or_build(path, self.source.fingerprint(split), lambda: self.source.decode(split))

    def prepare_data(self) -> None:
        for split in self.source.splits():
            self._cache(split)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.tensors({split: self._cache(split) for split in self.source.splits()})
        self.splits = self._with_val(splits)
        log.info("data under %s: %s", self.root, {k: self.num_samples(k) for k in self.splits})

    def tensors(self, caches: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        """{split: {name: tensor}} from the decoded caches (and whatever else the subclass keeps)."""
        return {k: {n: t for n, t in v.items() if isinstance(t, torch.Tensor)} for k, v in caches.items()}

    def _with_val(self, splits: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        if self.val_fraction > 0:
            train = splits["train"]
            kept, held = hold_out(len(train[self.size_key]), self.val_fraction, self.seed)

            def pick(idx: torch.Tensor) -> dict[str, torch.Tensor]:
                return {k: v[idx] if k in self.sample_keys else v for k, v in train.items()}

            splits["train"], splits["val"] = pick(kept), pick(held)
            self.val_from = "train"
        elif "val" not in splits:
            if "test" not in splits:
                raise DataError("the data source has no val or test split; set data.val_fraction to hold out "
                                "part of the training split")
            splits["val"] = splits["test"]
            self.val_from = "test"
        return splits


class LabelledSplits(CachedSplits):
    """Labelled samples (images, audio clips): the caches hold `labels` and the class names (`classes`).

    label_fraction (`data.label_fraction`): the share of the training split whose labels a run trains on, a
    seeded choice of that share of every class (the same for every run of one seed), after the validation
    hold-out; the other training samples are left out. 1: all of them."""

    label_fraction: float = 1.0

    def tensors(self, caches: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        self.classes = list(caches["train"]["classes"])
        return super().tensors(caches)

    def _with_val(self, splits: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        splits = super()._with_val(splits)
        if self.label_fraction < 1:
            train = splits["train"]
            kept = labelled_subset(train["labels"], self.label_fraction, self.seed, self.classes)
            splits["train"] = {k: v[kept] if k in self.sample_keys else v for k, v in train.items()}
            log.info("data.label_fraction=%s: training on %d labelled samples of %d (every class's share)",
                     self.label_fraction, len(kept), len(train["labels"]))
        return splits
