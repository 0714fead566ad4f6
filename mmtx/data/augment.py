"""Whole-batch augmentation on the training device.

Every function takes a uint8 batch (B, C, H, W) already on the device and
draws its randomness per sample, so one call replaces B per-image transforms
in DataLoader workers.
"""

from __future__ import annotations

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
    """The training augmentation of an image task: crop, flip, optional RandAugment.

    Mixup/CutMix act on normalised floats and labels, so they live apart
    (`mmtx.data.image.ImageDataModule`).
    """

    def __init__(
        self,
        crop_padding: int = 4,
        hflip: bool = True,
        randaugment: dict | None = None,
    ) -> None:
        super().__init__()
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.randaugment = RandAugment(**randaugment) if randaugment else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = random_crop_flip(images, self.crop_padding, 0.5 if self.hflip else 0.0)
        if self.randaugment is not None:
            images = self.randaugment(images)
        return images
