"""Whole-batch augmentation on the training device.

Every function takes a uint8 batch (B, C, H, W) already on the device and
draws its randomness per sample, so one call replaces B per-image transforms
in DataLoader workers.
"""

from __future__ import annotations

from mmtx.errors import Natural

import math

import torch
import torch.nn.functional as F
from torch import nn


def random_crop_flip(images: torch.Tensor, padding: int, flip_p: float = 0.5) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to the input size at a random offset, and mirror
    left-right with probability `flip_p`, each drawn per sample.

    The same transform as torchvision's RandomCrop(size, padding) (fill 0) then
    RandomHorizontalFlip(flip_p), done as a single gather from the padded batch:
    the flip is folded into the column index.
    """
    B, C, H, W = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * padding + 1, (B, 1), device=device)
    ox = torch.randint(0, 2 * padding + 1, (B, 1), device=device)
    flip = torch.rand(B, 1, device=device) < flip_p
    cols_h = torch.arange(W, device=device)
    rows = oy + torch.arange(H, device=device)  # (B, H)
    cols = ox + torch.where(flip, cols_h.flip(0), cols_h)  # (B, W)
    flat = rows[:, :, None] * (W + 2 * padding) + cols[:, None, :]  # (B, H, W) indices into the padded plane
    flat = flat.view(B, 1, H * W).expand(B, C, H * W)
    out = padded.view(B, C, -1).gather(2, flat)  # (B, C, H*W)
    return out.view(B, C, H, W)


def random_resized_crop_flip(images: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """torchvision's RandomResizedCrop(input size, scale, ratio) then RandomHorizontalFlip(flip_p), drawn per sample
    and done for the whole batch by one bilinear `grid_sample` (the flip folded into each sample's sampling grid;
    no antialiasing, which a box resized up to the input's size does not need).

    Each box is drawn as torchvision draws it: up to 10 tries of an area fraction in `scale` and a log-uniform
    aspect ratio in `ratio`, the first that fits; else the whole image cut to the nearest allowed ratio. uint8 in,
    uint8 out (rounded), the input's size."""
    B, C, H, W = images.shape
    device = images.device
    tries = 10
    area = H * W * torch.empty(B, tries, device=device).uniform_(*scale)
    log_ratio = torch.empty(B, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # No try fits: the whole image, cut to the nearest ratio allowed (torchvision's fallback).
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    none = ~fits.any(dim=1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    top = torch.floor(torch.rand(B, device=device) * (H - h + 1))
    left = torch.floor(torch.rand(B, device=device) * (W - w + 1))
    left = torch.where(none, torch.full_like(left, (W - fw) // 2), left)
    top = torch.where(none, torch.full_like(top, (H - fh) // 2), top)
    flip = torch.rand(B, device=device) < flip_p
    # Where each output pixel samples the box, in input pixels (F.interpolate's half-pixel rule, kept inside the
    # box as cropping first would keep it), then in grid_sample's -1..1 coordinates; a flip reverses the columns.
    cols = left[:, None] + (torch.arange(W, device=device) + 0.5) * (w / W)[:, None] - 0.5
    cols = torch.minimum(cols, (left + w - 1)[:, None]).maximum(left[:, None])
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = top[:, None] + (torch.arange(H, device=device) + 0.5) * (h / H)[:, None] - 0.5
    rows = torch.minimum(rows, (top + h - 1)[:, None]).maximum(top[:, None])
    grid = torch.stack([((cols + 0.5) / W * 2 - 1)[:, None, :].expand(B, H, W),
                        ((rows + 0.5) / H * 2 - 1)[:, :, None].expand(B, H, W)], dim=-1)  # (B, H, W, [x, y])
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(images.dtype)


class RandAugment(nn.Module):
    """torchvision's RandAugment (Cubuk et al., 2020), drawn per group of samples.

    torchvision applies one draw of operations to a whole batched tensor;
    applying it to groups of `group_size` samples keeps the per-sample
    variety that matters for regularisation while staying batched.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, group_size: int = 8) -> None:
        super().__init__()
        from torchvision.transforms import v2

        self.op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.group_size = group_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.op(g) for g in images.split(self.group_size)])


class BatchAugment(nn.Module):
    """The training augmentation of an image task: a crop (padded and shifted, `crop_padding`, CIFAR's; or random
    resized, `resized_crop`, ImageNet's), a flip, optional RandAugment; and, on the normalised images, random
    erasing (`random_erasing`: the probability, timm's RandomErasing with per-pixel noise, DeiT's).

    Mixup/CutMix act on normalised floats and labels, so they live apart
    (`mmtx.data.image.ImageDataModule`).
    """

    def __init__(
        self,
        crop_padding: Natural = 4,
        hflip: bool = True,
        randaugment: dict | None = None,
        resized_crop: dict | None = None,
        random_erasing: float = 0.0,
    ) -> None:
        super().__init__()
        from mmtx.errors import ConfigError

        if resized_crop is not None:
            unknown = set(resized_crop) - {"scale", "ratio"}
            if unknown:
                raise ConfigError(f"data.augment.resized_crop has no key {sorted(unknown)[0]!r} (it takes scale and "
                                  "ratio, as torchvision's RandomResizedCrop)")
            resized_crop = {k: tuple(float(x) for x in v) for k, v in resized_crop.items()}
            if resized_crop.get("scale", (0.08, 1.0))[0] <= 0 or resized_crop.get("scale", (0.08, 1.0))[1] > 1:
                raise ConfigError(f"data.augment.resized_crop.scale={list(resized_crop['scale'])}: give the crop's "
                                  "share of the image area as [low, high] within (0, 1]")
        if not 0.0 <= random_erasing <= 1.0:
            raise ConfigError(f"data.augment.random_erasing={random_erasing} is a probability: give 0 to 1")
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.resized_crop = resized_crop
        self.randaugment = RandAugment(**randaugment) if randaugment else None
        self.random_erasing = random_erasing
        self._eraser = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flip = 0.5 if self.hflip else 0.0
        if self.resized_crop is not None:
            images = random_resized_crop_flip(images, flip_p=flip, **self.resized_crop)
        else:
            images = random_crop_flip(images, self.crop_padding, flip)
        if self.randaugment is not None:
            images = self.randaugment(images)
        return images

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """Random erasing of normalised images (B, C, H, W), in place: each sample, with probability
        `random_erasing`, gets a rectangle of normal noise (timm's RandomErasing, mode 'pixel')."""
        if self.random_erasing <= 0:
            return images
        if self._eraser is None or self._eraser.device != images.device:
            from timm.data.random_erasing import RandomErasing

            self._eraser = RandomErasing(probability=self.random_erasing, mode="pixel", device=images.device)
        return self._eraser(images)
