"""Images streamed from a prepared folder (`data=streaming`): decoded in the loader workers, augmented and
normalised on the training device as the cached path does it."""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from mmtx.batch import ImageBatch
from mmtx.data.image import ImageDataModule
from mmtx.data.streaming.base import _name, _Streamed
from mmtx.errors import ConfigError, Count, DataError, MaybeCount, MaybeRate, NonNegative

log = logging.getLogger(__name__)


class _Decode:
    """A shard's record -> {"image": uint8 (3, H, W), "label"}, in a loader worker (picklable: workers may be
    spawned). torchvision's decoder (libjpeg-turbo, libpng) gives the pixels Pillow gives, 5x faster on 64 px JPEGs;
    an image to resize, or one it cannot read, goes through the cached path's own reader."""

    def __init__(self, image_size: MaybeCount, on_bad_file: str) -> None:
        self.image_size, self.on_bad_file = image_size, on_bad_file

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        from torchvision.io import ImageReadMode, decode_image

        from mmtx.data.image_sources import read_image

        size = self.image_size
        try:
            try:
                image = decode_image(torch.frombuffer(bytearray(item["data"]), dtype=torch.uint8), ImageReadMode.RGB)
            except RuntimeError:
                image = None
            if image is None or (size is not None and tuple(image.shape[-2:]) != (size, size)):
                image = read_image(io.BytesIO(item["data"]), size)
        except DataError as err:
            if self.on_bad_file == "error":
                raise DataError(f"cannot read image {_name(item)}: {err} (set data.on_bad_file=skip to skip such "
                                "files)") from None
            log.warning("skipped an unreadable image: %s (%s)", _name(item), err)
            return None
        return {"image": image, "label": item["label"]}


class _Collate:
    """Decoded samples -> {"images": (B, C, H, W) uint8, "labels": (B,), "split": name}; skipped samples dropped."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [i for i in items if i is not None]
        if not items:
            return None  # every sample skipped (a damaged shard): the loader moves on to the next batch
        return {"images": torch.stack([i["image"] for i in items]),
                "labels": torch.tensor([i["label"] for i in items], dtype=torch.long), "split": self.split}


class StreamingImages(_Streamed, ImageDataModule):
    """Labelled images streamed from a prepared folder (`_Streamed`): decoded in `num_workers` loader processes,
    augmented and normalised on the training device as `ImageDataModule` does it. `image_size`: null keeps the
    prepared size (the source's `image_size`); `on_bad_file=skip` leaves an unreadable image out of its batch."""

    def __init__(
        self,
        path: str,
        batch_size: Count = 128,
        eval_batch_size: MaybeCount = None,
        num_workers: int = 2,
        image_size: MaybeCount = None,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        augment: dict | None = None,
        mixup: NonNegative = 0.0,
        cutmix: NonNegative = 0.0,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        source: dict[str, Any] | None = None,
        val_fraction: MaybeRate = None,
        label_fraction: float = 1.0,
    ) -> None:
        if label_fraction != 1:
            raise ConfigError(f"data.label_fraction={label_fraction}: a streamed folder trains on every label it "
                              "holds; prepare a folder of the labelled share instead, or train from the cached "
                              "source (data=imagefolder, data=cifar10)")
        ImageDataModule.__init__(self, source=None, cache_dir="", root=root, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, mean=mean, std=std, augment=augment, mixup=mixup,
                                 cutmix=cutmix, seed=seed)
        self._init_streamed(path, num_workers, on_bad_file, storage_options, cache_dir)
        # A task written for a folder (vit_finetune) sets data.source.image_size and data.val_fraction: the first is
        # the size its model takes (images prepared at another are resized to it), the second has no folder to cut.
        other = sorted(set(source or {}) - {"image_size"})
        if other:
            raise ConfigError(f"data.source.{other[0]} does not apply to data=streaming (a prepared folder); set it "
                              f"when preparing (python -m mmtx.prepare data=imagefolder data.source.{other[0]}=...)")
        self.wanted_size = image_size or (source or {}).get("image_size")
        if val_fraction:
            log.info("data.val_fraction=%s does not apply to data=streaming: it validates on the prepared folder's "
                     "val split, else its test split", val_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.meta:
            return
        _Streamed.setup(self, stage)
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            from timm.data import Mixup

            self.mixup = Mixup(**self.mixup_args, label_smoothing=0.0, num_classes=self.num_classes)

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        size = self.wanted_size or self.meta.get("image_size")
        if size is None:
            raise ConfigError(f"{self.path} was prepared without data.source.image_size, so its images may differ in "
                              "size: set data.image_size")
        return (int(size), int(size))

    @property
    def in_channels(self) -> int:
        return 3  # decoded as RGB

    def _decoder(self) -> _Decode:
        return _Decode(self.image_size[0], self.on_bad_file)

    def _collate(self, split: str) -> _Collate:
        return _Collate(split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> ImageBatch:
        """The decoded batch -> an ImageBatch, augmented (training) and normalised on the device."""
        if not isinstance(batch, dict):
            return batch
        images = batch["images"]
        index = torch.arange(images.shape[0], device=images.device)
        return self.gather(batch["split"], {"images": images, "labels": batch["labels"]}, index, images.device)
