"""Where images come from: a local ImageFolder, torchvision's CIFAR-10, or a Hugging Face dataset.

Each source lists its splits, fingerprints a split cheaply (so the cache
knows when to rebuild) and decodes a split into one uint8 tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mmtx.data.cache import digest
from mmtx.errors import ConfigError, DataError, MaybeCount, MissingError, optional
from mmtx.files import describe_root, resolve_root

log = logging.getLogger(__name__)



def pil_to_tensor(image: Image.Image, size: int | None) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, size, size): shorter side resized to `size`, centre-cropped."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def read_image(source: str | os.PathLike | io.BytesIO, size: int | None) -> torch.Tensor:
    """One image file (a path or its bytes) -> uint8 (3, size, size), as `pil_to_tensor`. A file that cannot be
    decoded is a DataError saying why: not an image, truncated, or larger than Pillow's limit against
    decompression bombs (`PIL.Image.MAX_IMAGE_PIXELS`, named with its value)."""
    try:
        with Image.open(source) as image:
            return pil_to_tensor(image, size)
    except Image.DecompressionBombError as err:
        raise DataError(f"{err} (Pillow's guard against decompression bombs: it refuses images of over twice "
                        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except Exception as err:  # noqa: BLE001 - PIL's ways of saying "not an image": OSError, SyntaxError, ValueError,
        raise DataError(f"{type(err).__name__}: {err}") from None  # EOFError, struct.error, ...


def decode_images(items: list[tuple[Any, str]], size: int | None, on_bad_file: str, where: str
                  ) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """Decode (source, name) image items: (the images, the positions of the items decoded, the names of those
    skipped). An unreadable item is skipped and counted in one warning naming the first few and why
    (on_bad_file=skip), or stops the run naming it (error)."""
    images, kept, bad, reasons = [], [], [], []
    for i, (item, name) in enumerate(items):
        try:
            images.append(read_image(item, size))
        except DataError as err:
            if on_bad_file == "error":
                raise DataError(f"cannot read image {name}: {err} (set data.source.on_bad_file=skip to skip such "
                                "files)") from None
            bad.append(name)
            reasons.append(f"{name} ({err})")
            continue
        kept.append(i)
    if bad:
        log.warning("skipped %d unreadable file(s) in %s, e.g. %s", len(bad), where, "; ".join(reasons[:3]))
    return images, kept, bad


def stack_images(images: list[torch.Tensor], origin: str, names: list[str] | None = None) -> torch.Tensor:
    """Stack decoded images; when their sizes differ, name the files whose size is not the most common one."""
    sizes = [tuple(t.shape[-2:]) for t in images]
    if len(set(sizes)) > 1:
        common = max(set(sizes), key=sizes.count)
        names = names or [f"#{i}" for i in range(len(images))]
        odd = [f"{name} ({w}x{h})" for name, (h, w) in zip(names, sizes) if (h, w) != common]  # width x height
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        raise DataError(
            f"images in {origin} have different sizes: most are {common[1]}x{common[0]} pixels, but "
            f"{', '.join(odd[:5])}{more}; set data.source.image_size to resize them all"
        )
    return torch.stack(images)


class ImageFolder:
    """A local folder in torchvision's ImageFolder layout: `<path>/<split>/<class>/<image>`.

    Files that cannot be decoded as images are skipped and counted (one
    warning per split naming the first few) with on_bad_file="skip", the
    default; on_bad_file="error" stops at the first one and names it.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, path: str | os.PathLike, image_size: MaybeCount = None, on_bad_file: str = "skip") -> None:
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.source.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        self.path = Path(path).expanduser()
        self.image_size = image_size
        self.on_bad_file = on_bad_file
        if not self.path.is_dir():
            raise MissingError(f"image folder {self.path.resolve()} does not exist (data.source.path)")
        if not self.splits():
            raise MissingError(
                f"image folder {self.path} has no split folder ({', '.join(self.SPLITS)}); "
                "expected <path>/train/<class>/<image>"
            )
        self.cache_name = f"imagefolder-{self.path.name}-{digest(self.path.resolve(), image_size)}"

    def splits(self) -> list[str]:
        return [s for s in self.SPLITS if (self.path / s).is_dir()]

    def classes(self) -> list[str]:
        """Class names: the sub-folders of the training split, sorted (torchvision's order)."""
        split = "train" if (self.path / "train").is_dir() else self.splits()[0]
        root = self.path / split
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise MissingError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
        return classes

    def _files(self, split: str) -> list[tuple[Path, int, int, int]]:
        """(path, label, size, mtime_ns) of every file of a split, in a stable order."""
        root = self.path / split
        classes = self.classes()
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{root} has classes {unknown} that the training split {self.path / 'train'} lacks")
        files = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fname in sorted(filenames):
                    if fname.startswith("."):
                        continue
                    p = Path(dirpath) / fname
                    st = p.stat()
                    files.append((p, label, st.st_size, st.st_mtime_ns))
        if not files:
            raise MissingError(f"{root} holds no images (expected {root}/<class>/<image>)")
        return files

    def fingerprint(self, split: str) -> str:
        files = self._files(split)
        return digest(self.image_size, self.on_bad_file, *((str(p), s, m) for p, _, s, m in files))

    def _check_fits(self, split: str, paths: list[Path]) -> None:
        """Refuse a split whose decoded images would not fit in memory (each decoded, then stacked: twice its
        uint8 size), naming its size, before decoding it."""
        from mmtx.data.memory import refuse_if_too_large

        if self.image_size is not None:
            width = height = self.image_size
        else:  # the images' own size: the first readable one's header
            width = height = 0
            for path in paths[:20]:
                with contextlib.suppress(Exception):
                    with Image.open(path) as image:
                        width, height = image.size
                    break
        need = 2 * len(paths) * 3 * width * height
        refuse_if_too_large(need, f"{self.path / split} ({len(paths):,} images of {width}x{height}, decoded and stacked)",
                            "set data.source.image_size to decode them smaller, or use fewer of them")

    def decode(self, split: str) -> dict[str, Any]:
        files = self._files(split)
        self._check_fits(split, [path for path, *_ in files])
        images, kept, bad = decode_images([(path, str(path)) for path, *_ in files], self.image_size,
                                          self.on_bad_file, str(self.path / split))
        if not images:
            raise MissingError(f"{self.path / split} holds no readable images")
        return {
            "images": stack_images(images, str(self.path / split), [str(files[i][0]) for i in kept]),
            "labels": torch.tensor([files[i][1] for i in kept], dtype=torch.long),
            "classes": self.classes(),
            "skipped": bad,
        }


class TorchvisionCIFAR10:
    """torchvision's CIFAR-10 (the python pickle batches), downloaded into `root` if asked."""

    def __init__(self, root: str | os.PathLike, download: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.download = download
        self.cache_name = f"cifar10-{digest(self.root.resolve())}"

    def splits(self) -> list[str]:
        return ["train", "test"]

    def _dataset(self, split: str):
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.root), train=split == "train", download=self.download)

    def fingerprint(self, split: str) -> str:
        folder = self.root / "cifar-10-batches-py"
        if not folder.is_dir():
            self._dataset(split)  # downloads (or fails naming the root)
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
        return digest(split, *stats)

    def decode(self, split: str) -> dict[str, Any]:
        ds = self._dataset(split)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        return {"images": images, "labels": torch.tensor(ds.targets, dtype=torch.long), "classes": list(ds.classes)}


def cifar10(root: str | None = None, download: bool = True, image_size: MaybeCount = 32, on_bad_file: str = "skip"):
    """CIFAR-10 from wherever it is under the data root.

    Looks for torchvision's files (`<root>/cifar-10-batches-py`), then a
    `<root>/cifar10/` folder in ImageFolder layout; downloads with torchvision
    only when neither is there (and `download` is true). The download goes to a
    temporary folder first: a failed one leaves nothing behind, not even the root.
    """
    base = resolve_root(root)
    if (base / "cifar-10-batches-py").is_dir():
        return TorchvisionCIFAR10(base, download=False)
    if (base / "cifar10" / "train").is_dir():
        return ImageFolder(base / "cifar10", image_size=image_size, on_bad_file=on_bad_file)
    searched = (f"looked for {base.resolve() / 'cifar-10-batches-py'} (torchvision's files) and "
                f"{base.resolve() / 'cifar10' / 'train'} (an ImageFolder) under the data root {describe_root(root)}")
    fixes = ("put CIFAR-10 in one of those places, or point data.root (or $MMTX_DATA_DIR) at the folder that "
             "holds it")
    if not download:
        raise MissingError(f"CIFAR-10 not found: {searched}. To fix: {fixes}, or set data.source.download=true")
    log.info("CIFAR-10 not found under %s; downloading it there", base)
    try:
        _download_cifar10(base)
    except Exception as err:  # urllib's URLError, a refused connection, a bad archive  # noqa: BLE001
        raise MissingError(
            f"CIFAR-10 not found: {searched}, and downloading it failed ({err}). To fix: {fixes}, or run once "
            "where the internet is reachable so torchvision can download it"
        ) from None
    return TorchvisionCIFAR10(base, download=False)


def _download_cifar10(base: Path) -> None:
    """torchvision's download into a temporary folder, moved to `base` once it succeeded."""
    import shutil
    import tempfile

    from torchvision.datasets import CIFAR10

    tmp = Path(tempfile.mkdtemp(prefix="mmtx-cifar10-"))
    try:
        CIFAR10(str(tmp), train=True, download=True)
        base.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "cifar-10-batches-py"), str(base / "cifar-10-batches-py"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def image_folder(path: str, root: str | None = None, image_size: MaybeCount = None, on_bad_file: str = "skip"):
    """An ImageFolder at `path`; a relative path is taken under the data root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = resolve_root(root) / p
    return ImageFolder(p, image_size=image_size, on_bad_file=on_bad_file)


class HFImages:
    """A Hugging Face `datasets` image-classification dataset.

    `path` and `name`/`data_dir` go to `datasets.load_dataset` (for example
    path="imagefolder", data_dir="/data/pets", or path="uoft-cs/cifar10").
    `split_names` maps our split names to the dataset's.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        split_names: dict[str, str] | None = None,
        image_size: MaybeCount = None,
        on_bad_file: str = "skip",
    ) -> None:
        if on_bad_file not in ("skip", "error"):
            raise ConfigError(f"data.source.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        self.on_bad_file = on_bad_file
        self.path, self.name, self.data_dir = path, name, data_dir
        self.image_key, self.label_key = image_key, label_key
        self.split_names = dict(split_names or {"train": "train", "test": "test"})
        self.image_size = image_size
        self.cache_name = f"hf-{Path(path).name}-{digest(path, name, data_dir, image_size)}"

    def splits(self) -> list[str]:
        return list(self.split_names)

    def _dataset(self, split: str):
        datasets = optional("datasets", "datasets", "data=hf_images (a Hugging Face dataset)")

        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise MissingError(f"data.source.data_dir {self.data_dir} does not exist")
        return datasets.load_dataset(self.path, self.name, data_dir=self.data_dir, split=self.split_names[split])

    def fingerprint(self, split: str) -> str:
        return digest(self.image_size, self.on_bad_file, self._dataset(split)._fingerprint)

    def decode(self, split: str) -> dict[str, Any]:
        ds = self._dataset(split)
        for key in (self.image_key, self.label_key):
            if key not in ds.features:
                raise DataError(f"dataset {self.path} has no column {key!r}; columns: {list(ds.features)}")
        feature = ds.features[self.label_key]
        classes = list(feature.names) if hasattr(feature, "names") else sorted(set(ds[self.label_key]))
        to_index = (lambda v: v) if hasattr(feature, "names") else {c: i for i, c in enumerate(classes)}.__getitem__
        datasets = optional("datasets", "datasets", "data=hf_images (a Hugging Face dataset)")

        raw = ds.cast_column(self.image_key, datasets.Image(decode=False))  # bytes: decoded (and skipped) here
        items = [(io.BytesIO(r["bytes"]) if r.get("bytes") else r["path"], r.get("path") or f"{self.path}[{split}][{i}]")
                 for i, r in enumerate(raw[self.image_key])]
        images, kept, bad = decode_images(items, self.image_size, self.on_bad_file, f"{self.path}[{split}]")
        if not images:
            raise MissingError(f"{self.path}[{split}] holds no readable images")
        labels = ds[self.label_key]
        return {
            "images": stack_images(images, f"{self.path}[{split}]"),
            "labels": torch.tensor([to_index(labels[i]) for i in kept], dtype=torch.long),
            "classes": [str(c) for c in classes],
            "skipped": bad,
        }
