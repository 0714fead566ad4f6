"""Positional encodings as pure functions of the grid (no state)."""

from __future__ import annotations

import torch

from mmtx.errors import ConfigError


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sin-cos encoding of 1D positions (Vaswani et al., 2017).

    positions: (N,) float. Returns (N, dim): the first half sines, the second
    half cosines, over geometrically spaced frequencies.
    """
    if dim % 2:
        raise ConfigError(f"sin-cos encoding needs an even dim, got {dim}")
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
        raise ConfigError(f"2D sin-cos encoding needs dim divisible by 4, got {dim}")
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
    """cos and sin of rotary angles for positions 0..length-1: (length, head_dim/2, 2).

    Pair i of a head rotates at frequency base^(-2i/head_dim) (RoFormer, Su et al., 2021).
    """
    if head_dim % 2:
        raise ConfigError(f"rotary positions need an even head dim, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]  # (L, Dh/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (L, Dh/2, 2)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of each head of x (..., T, Dh) by the angles of `table` (T, Dh/2, 2).

    The rotation is one complex multiplication (RoFormer, section 3.4.2; as LLaMA computes it), in
    float32 whatever x's dtype. Its gradient is the inverse rotation, so the backward pass is one
    complex multiplication too (`_Rotate`), without the copies autograd's generic view_as_complex
    backward makes of non-contiguous gradients.
    """
    table = table.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if torch.compiler.is_compiling():  # inductor fuses the real form into one kernel; it has no complex codegen
        return _rotate_real(x, table)
    return _Rotate.apply(x, torch.view_as_complex(table.contiguous()))  # (T, Dh/2) complex


def _rotate_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same rotation in real arithmetic: (even, odd) -> (even cos - odd sin, even sin + odd cos)."""
    cos, sin = table[..., 0], table[..., 1]  # (T, Dh/2) each
    x32 = x.to(table.dtype)
    even, odd = x32[..., 0::2], x32[..., 1::2]  # (..., T, Dh/2) each
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (..., T, Dh/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # -> (..., T, Dh)


def _rotate(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """x (..., T, Dh) times the unit complex numbers `turn` (T, Dh/2), pair by pair (half precision in float32)."""
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if x32.stride(-1) != 1 or any(stride % 2 for stride in x32.stride()[:-1]) or x32.storage_offset() % 2:
        x32 = x32.contiguous()  # view_as_complex needs whole (real, imaginary) pairs in memory
    pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))  # (..., T, Dh) -> (..., T, Dh/2) complex
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)  # -> (..., T, Dh)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(turn)
        return _rotate(x, turn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (turn,) = ctx.saved_tensors
        return _rotate(grad, turn.conj().resolve_conj()), None  # a rotation's transpose is its inverse
