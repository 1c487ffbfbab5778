"""Position encodings: sinusoidal and learned (added to tokens), 1D and 2D RoPE (rotate q and k).

RoPE (Su et al.) rotates each pair of query/key channels by an angle proportional to the
position, so the dot product q_i · k_j depends only on the offset i - j. We pair channel c with
channel c + d/2 ("rotate half", as in GPT-NeoX/Llama), which needs no interleaving copies.

2D RoPE for an H×W grid of image tokens: half of the pairs rotate with the row index, the other
half with the column index, so scores depend only on the (Δrow, Δcol) offset. Both RoPE kinds
precompute (cos, sin) tables of shape (N, d/2) indexed by a flattened position (for the grid:
row * W + col), so callers index them the same way during training and incremental decoding.
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


class RoPE1D(nn.Module):
    """1D rotary table for positions 0..max_len-1: forward(positions (T,)) -> (cos, sin) each (T, d/2)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"1D RoPE needs an even head dim, got {head_dim}")
        ang = rope_angles(torch.arange(max_len), head_dim // 2, base)  # (L, d/2)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos[positions], self.sin[positions]


class RoPE2D(nn.Module):
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
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos[positions], self.sin[positions]
