"""Images -> 2D patch tokens with x/y positional encodings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # timm.layers.trunc_normal_ is this function

from mmtx.batch import ImageBatch, Tokens
from mmtx.errors import ConfigError, Count
from mmtx.nn.pos_embed import resample_1d, sincos_2d


class PatchTokenizer(nn.Module):
    """Split an image into non-overlapping patches and project each to `dim` (ViT, Dosovitskiy et al., 2021).

    Works for any image whose sides are multiples of `patch_size`; the
    positional encodings follow the patch grid of each batch, so a model
    trained at one resolution evaluates at another.

    pos_embed: "sincos" (fixed 2D sin-cos, half the channels encode x and
    half y), "learned" (a learned table for x and one for y, each dim/2
    wide, linearly resampled when the grid differs from `image_size`) or
    "grid" (a learned vector per patch position, as ViT and timm; resampled
    bicubically for another grid).

    stem: "patch" (one linear projection per patch, a strided convolution) or
    "conv" (log2(patch_size) 3x3 convolutions of stride 2 with BatchNorm and
    ReLU, then a 1x1 projection to `dim`: Xiao et al., 2021, "Early
    convolutions help transformers see better"; the same token grid, faster
    and steadier training for a few percent more compute). `patch_size` must
    be a power of two for "conv".
    """

    modality = "image"  # the inputs it reads (mmtx.data.modalities)

    def __init__(
        self,
        dim: Count,
        patch_size: Count = 16,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 224,
        pos_embed: str = "sincos",
        stem: str = "patch",
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim  # the width of its tokens
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise ConfigError(
                f"image size {height}x{width} is not divisible by tokenizer.patch_size={patch_size} "
                "(change data.source.image_size or tokenizer.patch_size)"
            )
        self.patch_size = patch_size
        self.image_size = (height, width)  # the training resolution (mmtx.predict resizes inputs to it)
        self.in_channels = in_channels
        if stem == "patch":
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
            # Patch projection as a linear layer (timm/MAE): xavier on the flattened kernel.
            nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
            nn.init.zeros_(self.proj.bias)
        elif stem == "conv":
            self.proj = conv_stem(in_channels, dim, patch_size, stem_width)
        else:
            raise ConfigError(f"tokenizer.stem must be 'patch' or 'conv', got {stem!r}")
        if pos_embed not in _POS_EMBEDS:
            raise ConfigError(f"tokenizer.pos_embed must be one of {sorted(_POS_EMBEDS)}, got {pos_embed!r}")
        self.pos = _POS_EMBEDS[pos_embed](dim, height // patch_size, width // patch_size)

    def forward(self, batch: ImageBatch) -> Tokens:
        images = batch.image  # (B, C, H, W), float, normalised
        H, W = images.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ConfigError(f"image size {H}x{W} is not divisible by tokenizer.patch_size={p}")
        x = self.proj(images)  # (B, C, H, W) -> (B, D, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, gh*gw, D)
        x = x + self.pos(gh, gw).to(x.dtype)
        return Tokens(x)


class ConvStem(nn.Sequential):
    """The convolutions of `conv_stem`, run on channels-last images: oneDNN's convolutions (CPU) and cuDNN's
    (tensor cores) are faster in NHWC; on 2 CPU cores the stem's forward and backward take 0.78 of the time
    of NCHW (vit_cifar_cpu, batch 128). The same weights and outputs either way."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.contiguous(memory_format=torch.channels_last))


def conv_stem(in_channels: int, dim: int, patch_size: int, width: int | None = None) -> ConvStem:
    """3x3 convolutions of stride 2 (BatchNorm, ReLU), their widths doubling from `width` (None: so that the
    last is `dim`), then a 1x1 convolution to `dim`: (B, C, H, W) -> (B, dim, H / patch_size, W / patch_size),
    the grid of the patch stem."""
    stages = patch_size.bit_length() - 1
    if patch_size < 2 or 2**stages != patch_size:
        raise ConfigError(f"tokenizer.stem=conv needs a power-of-two tokenizer.patch_size >= 2, got {patch_size}")
    layers: list[nn.Module] = []
    width_in = in_channels
    for i in range(stages):
        width_i = (width * 2**i) if width else max(dim // 2 ** (stages - 1 - i), 16)
        layers += [nn.Conv2d(width_in, width_i, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width_i),
                   nn.ReLU(inplace=True)]
        width_in = width_i
    layers.append(nn.Conv2d(width_in, dim, kernel_size=1))
    return ConvStem(*layers)


class SinCos2d(nn.Module):
    """Fixed 2D sin-cos encoding, cached per grid as a non-persistent buffer."""

    def __init__(self, dim: Count, grid_h: int, grid_w: int) -> None:
        super().__init__()
        self.dim = dim
        self.grid = (grid_h, grid_w)
        self.register_buffer("table", sincos_2d(grid_h, grid_w, dim), persistent=False)

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if self.grid != (grid_h, grid_w):
            # A new resolution: recompute (cheap) and keep it for the next batch.
            self.grid = (grid_h, grid_w)
            self.table = sincos_2d(grid_h, grid_w, self.dim, device=self.table.device)
        return self.table  # (gh*gw, D)


class Learned2d(nn.Module):
    """Learned x and y tables (each dim/2 wide), concatenated per patch."""

    def __init__(self, dim: Count, grid_h: int, grid_w: int) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"learned 2D positions need an even dim, got {dim}")
        self.x = nn.Parameter(torch.zeros(grid_w, dim // 2))
        self.y = nn.Parameter(torch.zeros(grid_h, dim // 2))
        trunc_normal_(self.x, std=0.02)
        trunc_normal_(self.y, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"x", "y"}

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        x = resample_1d(self.x, grid_w)  # (gw, D/2)
        y = resample_1d(self.y, grid_h)  # (gh, D/2)
        x = x[None, :, :].expand(grid_h, grid_w, -1)  # (gh, gw, D/2)
        y = y[:, None, :].expand(grid_h, grid_w, -1)  # (gh, gw, D/2)
        return torch.cat([x, y], dim=-1).flatten(0, 1)  # (gh*gw, D)


class LearnedGrid(nn.Module):
    """One learned vector per patch position of the training grid (ViT's own table, `table`: (gh, gw, D)),
    resampled bicubically to another grid as timm does (`timm.layers.resample_abs_pos_embed`), so pretrained
    ViTs keep their positions exactly at their own resolution and fine-tune at another."""

    def __init__(self, dim: Count, grid_h: int, grid_w: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(grid_h, grid_w, dim))
        trunc_normal_(self.table, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"table"}

    def adapt_loaded(self, name: str, tensor: torch.Tensor, source_keys: Sequence[str] = ()) -> torch.Tensor | None:
        """`init_from`: positions learned on another grid, resampled to this one (timm's loading does the same)."""
        if name != "table" or tensor.dim() != 3 or tensor.shape[-1] != self.table.shape[-1]:
            return None
        return resample_grid(tensor, *self.table.shape[:2])

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        return resample_grid(self.table, grid_h, grid_w).reshape(grid_h * grid_w, -1)  # (gh*gw, D)


def resample_grid(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """A (gh0, gw0, D) position table at (grid_h, grid_w): bicubic, no antialiasing, in float32 (as timm's
    `resample_abs_pos_embed` when it loads weights at another resolution)."""
    if table.shape[:2] == (grid_h, grid_w):
        return table
    x = table.permute(2, 0, 1)[None].float()  # (gh0, gw0, D) -> (1, D, gh0, gw0)
    x = nn.functional.interpolate(x, size=(grid_h, grid_w), mode="bicubic", antialias=False, align_corners=False)
    return x[0].permute(1, 2, 0).to(table.dtype)


_POS_EMBEDS = {"sincos": SinCos2d, "learned": Learned2d, "grid": LearnedGrid}
