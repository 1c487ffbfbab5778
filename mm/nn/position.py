"""Position encodings: sinusoidal and learned (added to tokens), 1D and 2D RoPE (rotate q and k).

RoPE (Su et al.) rotates each pair of query/key channels by an angle proportional to the
position, so the dot product q_i · k_j depends only on the offset i - j. We pair channel c with
channel c + d/2 ("rotate half", as in GPT-NeoX/Llama), which needs no interleaving copies.

2D RoPE for an H×W grid of image tokens: half of the pairs rotate with the row index, the other
half with the column index, so scores depend only on the (Δrow, Δcol) offset. Both RoPE kinds
precompute (cos, sin) tables of shape (N, d/2) indexed by a flattened position (for the grid:
row * W + col), so callers index them the same way during training and incremental decoding.

The models use the *full-width* form of the same tables (``RoPE*.full(positions)`` → (T, d)):
cos' = [cos, cos] and sin' = [-sin, sin], so that

    rope(x) = x · cos' + swap_halves(x) · sin'       (swap_halves([x1, x2]) = [x2, x1])

which is bit-for-bit ``apply_rope`` (x1·cos + x2·(-sin) is exactly x1·cos - x2·sin) in three
elementwise ops instead of ten, and Attention applies it to the queries and keys together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_1d(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """The original Transformer's table (length, dim): PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(..)."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    pos = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal encodings: forward(positions (T,) or (B, T)) -> (.., dim) to add to tokens."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_1d(max_len, dim), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


class LearnedPositions(nn.Module):
    """A learned vector per position: forward(positions) -> (.., dim)."""

    def __init__(self, max_len: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, dim) * init_std)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


def rope_angles(positions: Tensor, pairs: int, base: float = 10000.0) -> Tensor:
    """Angles (N, pairs): position p times frequencies base^(-i/pairs), i = 0..pairs-1."""
    inv_freq = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)  # (pairs,)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (c, c + d/2) of x (B, H, T, d) by tables cos/sin of shape (T, d/2) or (B, 1, T, d/2)."""
    d2 = x.shape[-1] // 2
    if cos.shape[-1] != d2 or cos.shape[-2] != x.shape[-2]:
        raise ValueError(f"RoPE table of shape {tuple(cos.shape)} does not fit x of shape {tuple(x.shape)}; "
                         f"expected (T, d/2) = ({x.shape[-2]}, {d2})")
    x1, x2 = x[..., :d2], x[..., d2:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def full_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Half tables (.., d/2) -> full-width (cos', sin') = ([cos, cos], [-sin, sin]), each (.., d)."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope_full(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE with full-width tables (see ``full_tables``): x · cos' + swap_halves(x) · sin'.

    The tables broadcast against x (.., d); the result equals ``apply_rope`` bit for bit.
    """
    d2 = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, d2)).flip(-2).flatten(-2)  # [x2, x1]; its backward is a flip too
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class _RoPETables(nn.Module):
    """Holds (L, d/2) cos/sin tables and their full-width forms; indexed by position."""

    def _register(self, ang: Tensor) -> None:
        cos, sin = ang.cos().float(), ang.sin().float()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        cos_full, sin_full = full_tables(cos, sin)
        self.register_buffer("cos_full", cos_full, persistent=False)
        self.register_buffer("sin_full", sin_full, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) -> (cos, sin) each (T, d/2), for ``apply_rope``."""
        return self.cos[positions], self.sin[positions]

    def full(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) -> full-width (cos', sin') each (T, d), for ``apply_rope_full`` / Attention."""
        return self.cos_full[positions], self.sin_full[positions]


class RoPE1D(_RoPETables):
    """1D rotary table for positions 0..max_len-1: forward(positions (T,)) -> (cos, sin) each (T, d/2);
    ``full(positions)`` -> (cos', sin') each (T, d)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"1D RoPE needs an even head dim, got {head_dim}")
        self._register(rope_angles(torch.arange(max_len), head_dim // 2, base))  # (L, d/2)


class RoPE2D(_RoPETables):
    """2D rotary table over an H×W grid, flattened row-major (index = row * W + col).

    The first d/4 channel pairs rotate with the row, the last d/4 with the column.
    forward(positions (T,) flattened indices) -> (cos, sin) each (T, d/2).
    """

    def __init__(self, head_dim: int, height: int, width: int, base: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.height, self.width = height, width
        rows = torch.arange(height).repeat_interleave(width)  # (H*W,) row of each flat index
        cols = torch.arange(width).repeat(height)  # (H*W,)
        pairs = head_dim // 4
        ang = torch.cat([rope_angles(rows, pairs, base), rope_angles(cols, pairs, base)], dim=-1)  # (HW, d/2)
        self._register(ang)
