"""Data bigger than memory: a source written once into chunked shards (litdata, Lightning's streaming engine), then
streamed by loader workers from a local or shared folder (object storage, `s3://`, is litdata's too; mmtx does not
read its `mmtx.json` from there yet).

    python -m mmtx.prepare data=imagefolder data.source.path=/data/imagenet out=/shards/imagenet
    python -m mmtx.train task=vit_cifar data=streaming data.path=/shards/imagenet

A prepared folder holds one litdata dataset per split (`<out>/<split>/`: `index.json` and `chunk-*.bin`) and
`mmtx.json`: the modality, the class names, the image size, the sample counts and the source's fingerprint
(`prepare` does nothing when the source has not changed). Images keep their encoded bytes (a JPEG stays a JPEG:
ImageNet's 140 GB, not its 190 GB decoded); loader workers decode them to the pixels the cached path decodes
(torchvision's decoder; the cached path's Pillow reader for an image to resize), and the batch goes through
`ImageDataModule`'s device-side augmentation and normalisation. litdata gives each DDP rank its own samples and
saves the loader's position in the checkpoint. Images only, so far; audio, text and pairs are still held in memory (mmtx.data.text memory-maps
its token files).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mmtx.batch import ImageBatch
from mmtx.data.cache import digest
from mmtx.data.image import ImageDataModule
from mmtx.errors import ConfigError, DataError, MissingError, optional
from mmtx.files import atomic_write_text

log = logging.getLogger(__name__)

META = "mmtx.json"
FORMAT = 1  # of what `prepare_images` writes: part of a prepared folder's fingerprint


def _litdata(purpose: str = "data=streaming (shards read by litdata)"):
    return optional("litdata", "streaming", purpose)


def _image_record(item: tuple[str, int]) -> dict[str, Any]:
    """One image as a shard keeps it: its file's bytes as they are, its label and its name (for messages)."""
    path, label = item
    return {"image": Path(path).read_bytes(), "label": int(label), "name": str(path)}


def prepare_images(source: Any, out: str | os.PathLike, num_workers: int | None = None,
                   replace: bool = False) -> dict[str, Any]:
    """Write every split of an image `source` that lists its files (an ImageFolder) into shards under `out`; the
    written `mmtx.json` (returned). Idempotent: a folder already prepared from the same files is left as it is; one
    prepared from other files is an error, or, with `replace` (mmtx's own cache folder), prepared again. The
    shards are written into `<out>.partial` and moved into place only when every split is done, so a killed
    `prepare` leaves no folder that looks prepared; the next call starts it again."""
    litdata = _litdata("python -m mmtx.prepare (shards written by litdata)")
    if not hasattr(source, "_files"):
        raise ConfigError(f"data.source ({type(source).__name__}) cannot be prepared for streaming: images are "
                          "prepared from a folder (data=imagefolder data.source.path=<folder with train/<class>/...>)")
    out = Path(out).expanduser().resolve()
    splits = source.splits()
    fingerprint = digest(FORMAT, *(source.fingerprint(s) for s in splits))
    meta_path = out / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            log.info("%s is already prepared from %s (%s)", out, source.path, meta["samples"])
            return meta
        if not replace:
            raise DataError(f"{out} holds a dataset prepared from other files ({meta.get('source')}); give another "
                            "out= or delete that folder")
        log.info("%s was prepared from files that have changed since: preparing it again", out)
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared dataset (no {META}); give an empty or new folder as out=")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed prepare left
    partial.mkdir(parents=True)
    listing = {split: source._files(split) for split in splits}  # one walk of the folder a split
    _check_space(partial, sum(size for files in listing.values() for _, _, size, _ in files))
    workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    samples = {}
    for split, found in listing.items():
        files = [(str(path), label) for path, label, _, _ in found]
        log.info("preparing %s [%s]: %d images into %s", source.path, split, len(files), out / split)
        litdata.optimize(fn=_image_record, inputs=files, output_dir=str(partial / split), chunk_bytes="64MB",
                         num_workers=min(workers, len(files)), mode="overwrite", verbose=False)
        samples[split] = len(files)
    first = listing["train" if "train" in listing else splits[0]][0][0]
    meta = {"format": FORMAT, "modality": "image", "classes": list(source.classes()), "samples": samples,
            "image_size": source.image_size or _square_side(first), "source": str(source.path),
            "fingerprint": fingerprint}
    atomic_write_text(partial / META, json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(partial, out)
    return meta


def _dims(path: Path) -> tuple[int, int]:
    """An image file's (width, height), from its header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _square_side(path: Path) -> int:
    """The side of a source's images when `data.source.image_size` is null: its first training image's (`path`),
    which must be square (the images are decoded at that size; the cached path asks the same of every image)."""
    width, height = _dims(path)
    if width != height:
        raise ConfigError(f"{path} is {width}x{height}: set data.source.image_size=N to prepare every image at NxN "
                          "(resized and centre-cropped, as the cached path does)")
    return width


def _check_space(folder: Path, needed: int) -> None:
    """Refuse to start writing shards that would not fit (about the files' size), naming the folder and the space."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"preparing needs about {needed / 1e9:.1f} GB in {folder.parent} and {free / 1e9:.1f} GB is "
                        "free; free space there or give another out=")


class _Decode:
    """A shard's record -> {"image": uint8 (3, H, W), "label"}, in a loader worker (picklable: workers may be
    spawned). torchvision's decoder (libjpeg-turbo, libpng) gives the pixels Pillow gives, 5x faster on 64 px JPEGs;
    an image to resize, or one it cannot read, goes through the cached path's own reader."""

    def __init__(self, image_size: int | None, on_bad_file: str) -> None:
        self.image_size, self.on_bad_file = image_size, on_bad_file

    def __call__(self, item: dict[str, Any]) -> dict[str, Any] | None:
        from torchvision.io import ImageReadMode, decode_image

        from mmtx.data.sources import read_image

        size = self.image_size
        try:
            try:
                image = decode_image(torch.frombuffer(bytearray(item["image"]), dtype=torch.uint8), ImageReadMode.RGB)
            except RuntimeError:
                image = None
            if image is None or (size is not None and tuple(image.shape[-2:]) != (size, size)):
                image = read_image(io.BytesIO(item["image"]), size)
        except DataError as err:
            if self.on_bad_file == "error":
                raise DataError(f"cannot read image {item['name']}: {err} (set data.on_bad_file=skip to skip such "
                                "files)") from None
            log.warning("skipped an unreadable image: %s (%s)", item["name"], err)
            return None
        return {"image": image, "label": item["label"]}


class _Collate:
    """Decoded samples -> {"images": (B, C, H, W) uint8, "labels": (B,), "split": name}; skipped samples dropped."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [i for i in items if i is not None]
        return {"images": torch.stack([i["image"] for i in items]),
                "labels": torch.tensor([i["label"] for i in items], dtype=torch.long), "split": self.split}


_LOADERS: dict[int, type] = {}


def _loader_class(litdata) -> type:
    """litdata's StreamingDataLoader, for a trainer that ends an epoch by counting its batches.

    A loader given a position (`load_state_dict`) replays from it at its next iteration and forgets it only when
    that iteration runs to its end. A resumed trainer stops the epoch after the batches it had left, without running
    the iterator to its end, so the next epoch would replay the same batches; here, once a resumed iteration has
    yielded, the next one is a new epoch."""
    if id(litdata) not in _LOADERS:
        class Loader(litdata.StreamingDataLoader):
            _resumed_yielded = False

            def load_state_dict(self, obj: dict[str, Any]) -> None:
                super().load_state_dict(obj)
                self._resumed_yielded = False

            def __iter__(self):
                if self.restore and self._resumed_yielded:
                    self.restore = False  # the resumed epoch was ended by the trainer: this is the next one
                self._resumed_yielded = False
                resumed = self.restore
                for batch in super().__iter__():
                    self._resumed_yielded = resumed
                    yield batch

        _LOADERS[id(litdata)] = Loader
    return _LOADERS[id(litdata)]


_DATASETS: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`_DecodingDataset`, made on first use (litdata is optional) and found here by name when a spawned loader
    worker unpickles its dataset."""
    if name != "_DecodingDataset":
        raise AttributeError(name)
    if name not in _DATASETS:
        litdata = _litdata()

        class _DecodingDataset(litdata.StreamingDataset):
            """litdata's dataset, its records decoded by `decode` (a `_Decode`) in the worker that reads them."""

            def __init__(self, *args: Any, decode: _Decode, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.decode = decode

            def __getitem__(self, index):
                return self.decode(super().__getitem__(index))

        _DecodingDataset.__module__ = __name__
        _DecodingDataset.__qualname__ = "_DecodingDataset"  # pickled by name: this function makes it again
        _DATASETS[name] = _DecodingDataset
    return _DATASETS[name]


class StreamingImages(ImageDataModule):
    """Labelled images streamed from a prepared folder (`python -m mmtx.prepare`) on a local or shared disk: decoded in
    `num_workers` loader processes, augmented and normalised on the training device as `ImageDataModule` does it.

    Training reads its shards in a seeded random order (litdata's: chunks, then samples within them) and each
    DDP rank its own part; validation uses the prepared `val` split, else `test`. A loader's position is saved in
    checkpoints (litdata's `StreamingDataLoader.state_dict`). `image_size`: null keeps the prepared size (the
    source's `image_size`); `on_bad_file`: skip (a warning, the batch one image short) | error.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int | None = None,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        augment: dict | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        on_bad_file: str = "skip",
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__(source=None, cache_dir="", root=root, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         mean=mean, std=std, augment=augment, mixup=mixup, cutmix=cutmix, seed=seed)
        _litdata()  # missing: one line naming the extra, before anything is read
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be a whole number >= 0 (0: load in the training "
                              "process)")
        self.path = str(path) if str(path).startswith(("s3://", "gs://")) else str(Path(path).expanduser())
        self.num_workers = num_workers
        self.wanted_size = image_size
        self.on_bad_file = on_bad_file
        self.meta: dict[str, Any] = {}
        self._train_loader = None
        self._position: dict[str, Any] | None = None  # a resumed run's loader position, until its loader exists

    def prepare_data(self) -> None:
        pass  # prepared by python -m mmtx.prepare

    def setup(self, stage: str | None = None) -> None:
        if self.meta:
            return
        logging.getLogger("litdata").setLevel(logging.WARNING)  # its cache and mmap notes at every loader
        self.meta = self._read_meta()
        self.classes = list(self.meta["classes"])
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            from timm.data import Mixup

            self.mixup = Mixup(**self.mixup_args, label_smoothing=0.0, num_classes=self.num_classes)
        log.info("streaming %s: %s", self.path, self.meta["samples"])

    def _read_meta(self) -> dict[str, Any]:
        if self.path.startswith(("s3://", "gs://")):
            raise ConfigError(f"data.path={self.path}: streaming from object storage is not supported yet (mmtx reads "
                              f"{META} from a disk); stream a prepared folder on a local or shared disk")
        meta_path = Path(self.path) / META
        if not meta_path.is_file():
            raise MissingError(f"data.path={self.path} is not a prepared dataset (no {META}): prepare it once with "
                               f"python -m mmtx.prepare data=imagefolder data.source.path=<image folder> out={self.path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("modality") != "image":
            raise ConfigError(f"{self.path} holds {meta.get('modality')} data; data=streaming streams images so far")
        return meta

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

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

    def num_samples(self, split: str) -> int:
        self.setup()
        return int(self.meta["samples"][self._split(split)])

    def has_split(self, split: str) -> bool:
        self.setup()
        return split in self.meta["samples"] or (split == "val" and "test" in self.meta["samples"])

    def _split(self, split: str) -> str:
        samples = self.meta["samples"]
        if split == "val" and "val" not in samples:
            return "test"
        if split not in samples:
            raise DataError(f"{self.path} has no {split!r} split (it has {sorted(samples)})")
        return split

    def _loader(self, split: str, batch_size: int, train: bool):
        litdata = _litdata()
        self.setup()
        folder = self._split(split)
        dataset = __getattr__("_DecodingDataset")(os.path.join(self.path, folder), shuffle=train, seed=self.seed,
                                                  drop_last=train, decode=_Decode(self.image_size[0], self.on_bad_file))
        loader = _loader_class(litdata)(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                             collate_fn=_Collate(split), drop_last=train,
                                             persistent_workers=self.num_workers > 0 and train,
                                             # its own generator: making an iterator draws a base seed, which from
                                             # the global one would shift training's random numbers at a resume
                                             generator=torch.Generator().manual_seed(self.seed))
        if train:
            self._train_loader = loader
            self._resume_position()
        return loader

    # The training loader's position goes into checkpoints through the data module's own state: Lightning restores
    # a stateful loader's state only if the loader is made after the restore, and `configure_optimizers` makes it
    # before (to count the steps of a schedule), so the position would be lost.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = state_dict.get("train_loader")
        self._resume_position()

    def _resume_position(self) -> None:
        if self._position is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._position)
            self._position = None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int = 0) -> Any:
        return {"images": batch["images"].to(device, non_blocking=True),
                "labels": batch["labels"].to(device, non_blocking=True), "split": batch["split"]}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> ImageBatch:
        """The decoded batch -> an ImageBatch, augmented (training) and normalised on the device."""
        if not isinstance(batch, dict):
            return batch
        images = batch["images"]
        index = torch.arange(images.shape[0], device=images.device)
        return self.gather(batch["split"], {"images": images, "labels": batch["labels"]}, index, images.device)


def streamed_if_too_large(datamodule: ImageDataModule, data_cfg: dict[str, Any]) -> StreamingImages | None:
    """A `StreamingImages` over shards prepared in the cache folder, when `datamodule`'s training split of a folder
    would decode to more than `data.resident_max_gb` (null: 80% of the memory available, where the cached path
    would refuse it); None when it fits (the resident path, and its speed, stay). Said in one line."""
    from mmtx.cpu import resident_budget
    from mmtx.files import size_text

    source = datamodule.source
    if not hasattr(source, "_files") or "train" not in source.splits():
        return None
    files = source._files("train")
    width, height = (source.image_size,) * 2 if source.image_size else _dims(files[0][0])
    need = len(files) * 3 * width * height  # uint8, decoded
    budget = resident_budget(datamodule.resident_max_gb)
    if budget is None or need <= budget[0]:
        return None
    why = budget[1]
    out = Path(datamodule.cache_dir) / f"{source.cache_name}-shards"
    log.info("data: %s decodes to %s, more than %s: streaming it from shards prepared in %s (once; python -m "
             "mmtx.prepare does the same ahead of time)", source.path, size_text(need), why, out)
    meta = prepare_images(source, out, replace=True)  # the cache follows its files, as the resident cache does
    keep = ("batch_size", "eval_batch_size", "mean", "std", "augment", "mixup", "cutmix", "seed", "root")
    return StreamingImages(str(out), image_size=meta["image_size"], **{k: data_cfg[k] for k in keep if k in data_cfg})

