"""Images as discrete tokens (iGPT, Chen et al. 2020): each pixel becomes the id of its nearest colour in a palette
of k colours (k-means over training pixels; iGPT's 512, a "9-bit" palette), in raster order, and back.

The palette lives in the vocabulary itself: a `Vocab` of kind "palette" whose tokens are `<image>` (the start of an
unconditioned image), one token a class (a class-conditioned image starts with its class's token, and
`prompt=cat` encodes to it) and one token a colour written as `#rrggbb`. A checkpoint that carries its vocabulary
(every text-like model's does) therefore carries its palette, and nothing else needs saving.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mmtx.errors import ConfigError, Count
from mmtx.tokenizers.text import Vocab

START = "<image>"


def fit_palette(pixels: torch.Tensor, k: Count, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """k colours (k, 3) float in 0..255 by k-means (Lloyd's iterations from k distinct random pixels) over
    `pixels` (N, 3); a colour that loses all its pixels is re-seeded at a random pixel. Fewer distinct pixels than
    k: they are the palette, padded by repeats."""
    pixels = pixels.float()
    generator = torch.Generator().manual_seed(seed)
    distinct = pixels.unique(dim=0)
    if len(distinct) <= k:
        return distinct[torch.arange(k) % len(distinct)]
    centroids = distinct[torch.randperm(len(distinct), generator=generator)[:k]].clone()
    for _ in range(iters):
        nearest = nearest_colour(pixels, centroids)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, pixels)
        counts = torch.bincount(nearest, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = pixels[torch.randint(len(pixels), (int(empty.sum()),), generator=generator)]
    return centroids


def nearest_colour(pixels: torch.Tensor, palette: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N,) ids of the palette colour (k, 3) nearest to each pixel (N, 3), in chunks (N x k distances at once
    would not fit for a data set's pixels)."""
    palette = palette.float()
    out = []
    for part in pixels.float().split(chunk):
        out.append(torch.cdist(part, palette).argmin(-1))  # (n, k) -> (n,)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def quantize(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> palette ids (B, H*W) in raster order (row by row)."""
    B, C, H, W = images.shape
    pixels = images.permute(0, 2, 3, 1).reshape(-1, C)  # (B, 3, H, W) -> (B*H*W, 3)
    return nearest_colour(pixels, palette).view(B, H * W)


def dequantize(ids: torch.Tensor, palette: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Palette ids (B, H*W) -> uint8 images (B, 3, H, W)."""
    colours = palette.to(ids.device).round().clamp(0, 255).to(torch.uint8)[ids]  # (B, H*W, 3)
    return colours.view(ids.shape[0], height, width, 3).permute(0, 3, 1, 2).contiguous()


def class_token(name: str) -> str:
    """The token of class `name` (spaces as underscores: a token is one word)."""
    return str(name).replace(" ", "_")


def palette_vocab(palette: torch.Tensor, classes: Sequence[str] = ()) -> Vocab:
    """The vocabulary of an image-token model: `<image>`, one token a class, one token a colour (`#rrggbb`), in
    that order: colour i of the palette is id 1 + len(classes) + i."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    colours = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in palette.round().clamp(0, 255).long().tolist()]
    tokens = [START, *(class_token(c) for c in classes), *colours]
    seen: dict[str, int] = {}
    for token in tokens:  # two centroids that round to one colour keep distinct ids: the later one gets a suffix
        name = token
        while name in seen:
            name += "'"
        seen[name] = len(seen)
    tokenizer = Tokenizer(WordLevel(seen, unk_token=START))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return Vocab(tokenizer, "palette")


def palette_of(vocab: Vocab) -> tuple[torch.Tensor, int]:
    """(the palette (k, 3) float, the id of its first colour) of a palette vocabulary."""
    table = vocab.tokenizer.get_vocab()
    colours = sorted((i, t) for t, i in table.items() if t.startswith("#"))
    if not colours:
        raise ConfigError("this vocabulary has no colour tokens: it is not an image-token (palette) vocabulary")
    rgb = [[int(t[k:k + 2], 16) for k in (1, 3, 5)] for _, t in colours]
    return torch.tensor(rgb, dtype=torch.float32), colours[0][0]
