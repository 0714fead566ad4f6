"""Image classification data: a cached uint8 tensor per split, batches gathered and augmented on the device.

The DataLoader only yields index batches (cheap, and shuffled and sharded by
Lightning's samplers, DDP included); `on_after_batch_transfer` gathers the
images from a copy of the split that lives on the training device and
augments the whole batch there. A CPU DataLoader never starves the GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmtx.data.augment import BatchAugment
from mmtx.data.cache import load_or_build
from mmtx.data.sources import ImageSource, resolve_root

log = logging.getLogger(__name__)


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


def _identity(batch):
    return batch


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh random order every epoch, fixed by (seed, epoch) alone.

    Lightning calls `set_epoch` at each epoch start (as for DistributedSampler),
    so a run resumed at an epoch boundary sees the same batches as one that
    never stopped.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ImageDataModule(L.LightningDataModule):
    """Labelled images from any `ImageSource`, cached, with device-side batch augmentation.

    val_fraction: the share of the training split held out for validation
    (a fixed, seeded choice); with 0 the source's `val` split is used, or
    else its `test` split.
    root: the data root the source was looked up under (`data.root`, else
    $MMTX_DATA_DIR, else ./data); kept for messages.
    mixup / cutmix: alphas for timm's Mixup (0 turns each off); batches then
    carry soft `target`s beside the hard `label`s.
    """

    def __init__(
        self,
        source: ImageSource,
        cache_dir: str,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.0,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        augment: dict | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        device_resident: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.source = source
        self.root = resolve_root(root)
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255  # normalise uint8 values directly
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.augment = BatchAugment(**(augment or {}))
        self.mixup_args = {"mixup_alpha": mixup, "cutmix_alpha": cutmix}
        self.mixup = None
        self.device_resident = device_resident
        self.seed = seed
        self.classes: list[str] = []
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self._on_device: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}

    # -- decoding and caching -------------------------------------------------

    def _cache(self, split: str) -> dict[str, Any]:
        path = self.cache_dir / f"{self.source.cache_name}-{split}.pt"
        return load_or_build(path, self.source.fingerprint(split), lambda: self.source.decode(split))

    def prepare_data(self) -> None:
        for split in self.source.splits():
            self._cache(split)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        caches = {split: self._cache(split) for split in self.source.splits()}
        self.classes = list(caches["train"]["classes"])
        splits = {k: {"images": v["images"], "labels": v["labels"]} for k, v in caches.items()}
        if self.val_fraction > 0:
            splits["train"], splits["val"] = _hold_out(splits["train"], self.val_fraction, self.seed)
        elif "val" not in splits:
            splits["val"] = splits["test"]
        self.splits = splits
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            from timm.data import Mixup

            # Label smoothing is the module's business (it applies it to soft targets too).
            self.mixup = Mixup(**self.mixup_args, label_smoothing=0.0, num_classes=self.num_classes)
        log.info("image data under %s: %s", self.root, {k: tuple(v["images"].shape) for k, v in splits.items()})

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.setup()
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        return tuple(self.splits["train"]["images"].shape[-2:])

    @property
    def in_channels(self) -> int:
        self.setup()
        return self.splits["train"]["images"].shape[1]

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        """Run-time values the model is built with: image geometry (tokenizer), number of classes (head, module)."""
        self.setup()
        return {
            "tokenizer": {"image_size": self.image_size, "in_channels": self.in_channels},
            "head": {"num_classes": self.num_classes},
            "module": {"num_classes": self.num_classes},
        }

    # -- loaders ---------------------------------------------------------------

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if split not in self.splits:
            raise KeyError(f"the data source has no {split!r} split (it has {sorted(self.splits)})")
        dataset = IndexDataset(split, len(self.splits[split]["labels"]))
        sampler = EpochShuffle(len(dataset), self.seed) if train else None
        # Mixup pairs samples, so training batches keep a fixed, even size.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=_identity)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)

    # -- the device-side data path ----------------------------------------------

    def _store(self, split: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The split's tensors on `device` (copied there once) or on the CPU."""
        if not self.device_resident:
            return self.splits[split]
        key = (split, device)
        if key not in self._on_device:
            self._on_device[key] = {k: v.to(device) for k, v in self.splits[split].items()}
        return self._on_device[key]

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int = 0) -> dict[str, Any]:
        if "index" not in batch:  # already a batch of tensors (a user's own loader)
            return batch
        index = batch["index"]
        device = index.device
        store = self._store(batch["split"], device)
        index = index.to(store["labels"].device)
        images = store["images"][index].to(device, non_blocking=True)  # (B, C, H, W) uint8
        labels = store["labels"][index].to(device, non_blocking=True)  # (B,)
        train = batch["split"] == "train"
        if train:
            images = self.augment(images)
        images = images.float().sub_(self.mean.to(device)).div_(self.std.to(device))  # mean, std in 0..255 units
        out = {"image": images, "label": labels}
        if train and self.mixup is not None:
            out["image"], out["target"] = self.mixup(images, labels)  # target: (B, num_classes)
        return out


def _hold_out(split: dict[str, torch.Tensor], fraction: float, seed: int):
    """Split off a seeded random `fraction` of a split."""
    n = len(split["labels"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * fraction)))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    pick = lambda idx: {k: v[idx] for k, v in split.items()}  # noqa: E731
    return pick(train), pick(val)
