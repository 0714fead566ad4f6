"""Images as token sequences for a decoder (iGPT): an image data module's pictures, optionally shrunk, quantized to
a palette of k colours fitted on the training pixels, as [class token; pixel ids in raster order].

The palette and the quantized splits are cached beside the images' own cache (k-means over a few hundred thousand
pixels and quantizing every image take a while, once). Batches are `TokenBatch`es: tokens = the start token and
every pixel id but the last, targets = every pixel id, so a language model's next-token loss is iGPT's.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
import torch.nn.functional as F

from mmtx.batch import TokenBatch
from mmtx.data.base import IndexedSplits
from mmtx.data.cache import load_or_build
from mmtx.errors import ConfigError, Count, MaybeCount
from mmtx.tokenizers.palette import class_token, fit_palette, palette_of, palette_vocab, quantize
from mmtx.tokenizers.text import Vocab

log = logging.getLogger(__name__)


def shrink(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C, size, size) by area averaging (iGPT's downsampling); as they are when
    `size` is None or theirs."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    out = [F.interpolate(part.float(), size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)
           for part in images.split(4096)]
    return torch.cat(out)


class ImageTokensDataModule(IndexedSplits):
    """Palette-token sequences of the images of `images` (an `ImageDataModule`, for its source, cache and splits;
    its augmentation and normalisation are not used). palette_size: k (iGPT: 512); image_size: the side the images
    are shrunk to first (null: as they are); fit_pixels: how many training pixels (a seeded sample) k-means
    learns the palette from; conditional: each sequence starts with its class's token (else `<image>`); hflip:
    training images are mirrored at random (a flip of the token grid)."""

    size_key = "labels"

    def __init__(
        self,
        images: Any,
        palette_size: Count = 512,
        image_size: MaybeCount = None,
        fit_pixels: Count = 200_000,
        conditional: bool = True,
        hflip: bool = True,
        batch_size: Count = 64,
        eval_batch_size: MaybeCount = None,
        device_resident: bool = True,
        seed: int = 0,
        root: str | None = None,
        fixed_vocab: Vocab | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, device_resident, seed)
        self.fixed_vocab = fixed_vocab  # a checkpoint's palette (mmtx.eval): the images are quantized with it
        if not hasattr(images, "splits") or not hasattr(images, "classes"):
            raise ConfigError("data.images must be a labelled image data config (data=imagefolder, cifar10, ...)")
        self.images = images
        self.palette_size, self.image_size, self.fit_pixels = palette_size, image_size, fit_pixels
        self.conditional, self.hflip = conditional, hflip
        self.vocab = None
        self.classes: list[str] = []
        self.grid: tuple[int, int] = (0, 0)

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.images.setup(stage)
        self.classes = list(self.images.classes)
        if self.fixed_vocab is not None:
            self._check_classes()
        source = self.images.source
        splits = sorted(self.images.splits)
        key = "|".join(["image-tokens-v1", source.cache_name, *(source.fingerprint(s) for s in source.splits()),
                        str(self.palette_size), str(self.image_size), str(self.fit_pixels), str(self.seed),
                        str(self.images.val_fraction), str(getattr(self.images, "label_fraction", 1.0)), *splits,
                        self.fixed_vocab.to_json() if self.fixed_vocab is not None else ""])
        name = f"{source.cache_name}-palette{self.palette_size}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
        cached = load_or_build(self.images.cache_dir / name, key, self._build)
        self.vocab = self.fixed_vocab or palette_vocab(cached["palette"], self.classes if self.conditional else ())
        first = 1 + (len(self.classes) if self.conditional else 0)
        for split in splits:
            labels = cached[f"{split}_labels"].long()
            start = (1 + labels) if self.conditional else torch.zeros_like(labels)
            self.splits[split] = {"labels": labels, "ids": cached[f"{split}_ids"], "start": start,
                                  "first": torch.tensor(first)}
        self.grid = tuple(cached["grid"])
        log.info("image tokens: %d-colour palette, %dx%d grids (%d tokens a sample); %s", self.palette_size,
                 *self.grid, self.grid[0] * self.grid[1], {k: self.num_samples(k) for k in self.splits})

    def _build(self) -> dict[str, Any]:
        """The palette (k-means on a seeded sample of training pixels) and every split's ids, int16."""
        train = shrink(self.images.splits["train"]["images"], self.image_size)  # (N, 3, h, w) uint8
        if self.fixed_vocab is not None:
            palette = palette_of(self.fixed_vocab)[0]
            log.info("image tokens: quantizing with the checkpoint's %d-colour palette", len(palette))
        else:
            generator = torch.Generator().manual_seed(self.seed)
            pixels = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])  # (N*h*w, 3)
            pick = torch.randperm(len(pixels), generator=generator)[: self.fit_pixels]
            log.info("fitting a %d-colour palette on %d training pixels (k-means)", self.palette_size, len(pick))
            # Rounded to whole colours: the palette the vocabulary carries (#rrggbb) is the one the ids were made with.
            palette = fit_palette(pixels[pick], self.palette_size, seed=self.seed).round().clamp(0, 255)
        out: dict[str, Any] = {"palette": palette, "grid": list(train.shape[-2:])}
        for split, tensors in self.images.splits.items():
            images = train if split == "train" else shrink(tensors["images"], self.image_size)
            out[f"{split}_ids"] = quantize(images, palette).to(torch.int16)  # (N, h*w)
            out[f"{split}_labels"] = tensors["labels"]
        return out

    def _check_classes(self) -> None:
        """`fixed_vocab` (the checkpoint's) has this data's class tokens, in its order."""
        _, first = palette_of(self.fixed_vocab)
        table = self.fixed_vocab.tokenizer.get_vocab()
        theirs = [t for t, i in sorted(table.items(), key=lambda kv: kv[1]) if 0 < i < first]
        ours = [class_token(c) for c in self.classes] if self.conditional else []
        if theirs != ours:
            raise ConfigError(f"the checkpoint's image tokens are for the classes {theirs or 'of no class'}, and this "
                              f"data has {ours or 'no class tokens (data.conditional=false)'}: evaluate on the data "
                              "it was trained with")

    def runtime_kwargs(self) -> dict[str, dict[str, Any]]:
        self.setup()
        h, w = self.grid
        return {"tokenizer": {"vocab": self.vocab, "max_len": h * w},
                "family": {"image_size": [h, w], "class_names": self.classes, "conditional": self.conditional}}

    def gather(self, split: str, store: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> TokenBatch:
        ids = store["ids"][index].to(device, non_blocking=True).long() + store["first"].to(device)  # (B, h*w) vocab ids
        if split == "train" and self.hflip:
            h, w = self.grid
            flip = torch.rand(len(index), device=device) < 0.5
            grid = ids.view(-1, h, w)  # (B, h*w) -> (B, h, w)
            ids = torch.where(flip[:, None, None], grid.flip(-1), grid).view(-1, h * w)
        start = store["start"][index].to(device, non_blocking=True)[:, None]  # (B, 1)
        return TokenBatch(tokens=torch.cat([start, ids[:, :-1]], dim=1), targets=ids)  # (B, h*w) each
