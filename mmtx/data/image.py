"""Image classification data: a cached uint8 tensor per split, batches gathered and augmented on the device."""

from __future__ import annotations

from typing import Annotated, Any

import torch

from mmtx.batch import ImageBatch
from mmtx.data.augment import BatchAugment
from mmtx.data.base import LabelledSplits, Source
from mmtx.data.memory import check_resident_max_gb
from mmtx.errors import Count, MaybeCount, NonNegative, Rate, number


class ImageDataModule(LabelledSplits):
    """Labelled images from any image `Source` (`mmtx.data.image_sources`), cached, with device-side batch augmentation.

    See `LabelledSplits` for the caching, splits and loaders. mean / std
    normalise the images; `augment` configures `BatchAugment` (crop, flip,
    RandAugment); mixup / cutmix: alphas for timm's Mixup (0 turns each off),
    and batches then carry soft `target`s beside the hard `label`s.
    """

    sample_keys = ("images", "labels")

    def __init__(
        self,
        source: Source,
        cache_dir: str,
        root: str | None = None,
        batch_size: Count = 128,
        eval_batch_size: MaybeCount = None,
        val_fraction: Rate = 0.0,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        augment: dict | None = None,
        mixup: NonNegative = 0.0,
        cutmix: NonNegative = 0.0,
        device_resident: bool = True,
        seed: int = 0,
        resident_max_gb: float | None = None,
        label_fraction: Annotated[float, number(0, 1, low_open=True)] = 1.0,
    ) -> None:
        super().__init__(source, cache_dir, root, batch_size, eval_batch_size, val_fraction, device_resident, seed)
        self.label_fraction = label_fraction
        # Above this decoded size (GB; None: 80% of the memory available) a folder is streamed instead (build_data).
        self.resident_max_gb = check_resident_max_gb(resident_max_gb)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255  # normalise uint8 values directly
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.augment = BatchAugment(**(augment or {}))
        self.mixup_args = {"mixup_alpha": mixup, "cutmix_alpha": cutmix}
        self.mixup = None
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _normaliser(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on `device`, copied there once rather than every batch."""
        if device not in self._norm:
            self._norm[device] = (self.mean.to(device), self.std.to(device))
        return self._norm[device]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            from timm.data import Mixup

            # Label smoothing is the module's business (it applies it to soft targets too).
            self.mixup = Mixup(**self.mixup_args, label_smoothing=0.0, num_classes=self.num_classes)

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        return tuple(self.splits["train"]["images"].shape[-2:])

    @property
    def in_channels(self) -> int:
        self.setup()
        return self.splits["train"]["images"].shape[1]

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        """Run-time values the model is built with: image geometry (tokenizer), number of classes and their names (family)."""
        self.setup()
        return {
            "tokenizer": {"image_size": self.image_size, "in_channels": self.in_channels},
            "family": {"num_classes": self.num_classes, "class_names": self.classes},
        }

    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> ImageBatch:
        images = store["images"][index].to(device, non_blocking=True)  # (B, C, H, W) uint8
        labels = store["labels"][index].to(device, non_blocking=True)  # (B,)
        train = split == "train"
        if train:
            images = self.augment(images)
        mean, std = self._normaliser(device)
        images = images.float().sub_(mean).div_(std)  # mean, std in 0..255 units
        if train:
            images = self.augment.erase(images)
        if train and self.mixup is not None:
            images, soft = self.mixup(images, labels)  # soft: (B, num_classes)
            return ImageBatch(images, labels, soft_label=soft)
        return ImageBatch(images, labels)
