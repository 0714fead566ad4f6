"""Positional encodings as pure functions of the grid (no state)."""

from __future__ import annotations

import torch


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sin-cos encoding of 1D positions (Vaswani et al., 2017).

    positions: (N,) float. Returns (N, dim): the first half sines, the second
    half cosines, over geometrically spaced frequencies.
    """
    if dim % 2:
        raise ValueError(f"sin-cos encoding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2)
    omega = 1.0 / temperature**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid_h: int, grid_w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos encoding: half the channels encode x, half encode y.

    As in MAE (He et al., 2022). Returns (grid_h * grid_w, dim) in row-major
    patch order; channels [0, dim/2) depend on x (column) only and
    [dim/2, dim) on y (row) only.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos encoding needs dim divisible by 4, got {dim}")
    ys = torch.arange(grid_h, dtype=torch.float32, device=device)
    xs = torch.arange(grid_w, dtype=torch.float32, device=device)
    enc_x = sincos_1d(xs, dim // 2)  # (W, dim/2)
    enc_y = sincos_1d(ys, dim // 2)  # (H, dim/2)
    enc_x = enc_x[None, :, :].expand(grid_h, grid_w, dim // 2)  # (H, W, dim/2)
    enc_y = enc_y[:, None, :].expand(grid_h, grid_w, dim // 2)  # (H, W, dim/2)
    return torch.cat([enc_x, enc_y], dim=-1).reshape(grid_h * grid_w, dim)


def resample_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a learned (N, C) position table to (length, C)."""
    if table.shape[0] == length:
        return table
    x = table.t()[None]  # (N, C) -> (1, C, N)
    x = torch.nn.functional.interpolate(x, size=length, mode="linear", align_corners=True)
    return x[0].t()  # (1, C, length) -> (length, C)


def rotary_tables(length: int, head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """cos and sin of rotary angles for positions 0..length-1: (length, 2, head_dim/2).

    Pair i of a head rotates at frequency base^(-2i/head_dim) (RoFormer, Su et al., 2021).
    """
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head dim, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]  # (L, Dh/2)
    return torch.stack([angles.cos(), angles.sin()], dim=1)  # (L, 2, Dh/2)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of each head of x (B, H, T, Dh) by the angles of `table` (T, 2, Dh/2)."""
    cos, sin = table[:, 0].to(x.dtype), table[:, 1].to(x.dtype)  # (T, Dh/2) each
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh) -> 2 x (B, H, T, Dh/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
