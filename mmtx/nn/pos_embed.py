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
