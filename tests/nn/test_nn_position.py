"""Position encodings: RoPE scores depend only on the (1D or 2D) offset; sinusoidal values."""

import math

import pytest
import torch

from mm.nn.position import (
    LearnedPositions,
    RoPE1D,
    RoPE2D,
    SinusoidalPositions,
    apply_rope,
    apply_rope_full,
    full_tables,
    sinusoidal_1d,
)


def score(q, k, rope, i, j):
    ci, si = rope(torch.tensor([i]))
    cj, sj = rope(torch.tensor([j]))
    return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()


def test_rope_1d_scores_depend_only_on_relative_offset():
    rope = RoPE1D(16, max_len=64)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    for offset in (0, 1, 5, -3):
        vals = [score(q, k, rope, i, i - offset) for i in range(10, 40, 7)]
        for v in vals[1:]:
            torch.testing.assert_close(v, vals[0], atol=1e-5, rtol=1e-5)
    # and it does depend on the offset
    assert abs(score(q, k, rope, 10, 10) - score(q, k, rope, 10, 5)) > 1e-3


def test_rope_2d_scores_depend_only_on_2d_offset():
    h, w = 6, 7
    rope = RoPE2D(16, h, w)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    flat = lambda r, c: r * w + c
    for dr, dc in [(0, 0), (1, 0), (0, 2), (2, -3)]:
        vals = []
        for r, c in [(3, 3), (4, 5), (3, 4), (5, 6)]:
            if 0 <= r - dr < h and 0 <= c - dc < w:
                vals.append(score(q, k, rope, flat(r, c), flat(r - dr, c - dc)))
        for v in vals[1:]:
            torch.testing.assert_close(v, vals[0], atol=1e-5, rtol=1e-5)
    # the same flat offset with a different 2D offset gives a different score (not 1D RoPE)
    a = score(q, k, rope, flat(2, 6), flat(2, 5))  # (0, 1)
    b = score(q, k, rope, flat(3, 0), flat(2, 6))  # flat offset 1, but (1, -6)
    assert abs(a - b) > 1e-3
    # rows and columns use separate halves: a pure row shift leaves the column channels alone
    c_row, _ = rope(torch.tensor([flat(3, 2)]))
    c_row0, _ = rope(torch.tensor([flat(0, 2)]))
    torch.testing.assert_close(c_row[:, 4:], c_row0[:, 4:])
    assert not torch.allclose(c_row[:, :4], c_row0[:, :4])


def test_rope_preserves_norm_and_checks_shapes():
    rope = RoPE1D(8, 10)
    x = torch.randn(2, 3, 5, 8)
    y = apply_rope(x, *rope(torch.arange(5)))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        apply_rope(x, *rope(torch.arange(4)))
    with pytest.raises(ValueError):
        RoPE2D(6, 2, 2)


def test_sinusoidal_matches_the_formula():
    table = sinusoidal_1d(50, 8)
    p, i = 17, 3
    assert math.isclose(table[p, 2 * i].item(), math.sin(p / 10000 ** (2 * i / 8)), rel_tol=1e-5)
    assert math.isclose(table[p, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / 8)), rel_tol=1e-5)
    torch.testing.assert_close(SinusoidalPositions(50, 8)(torch.tensor([p])), table[p:p + 1])


def test_learned_positions_are_trainable():
    pos = LearnedPositions(10, 4)
    pos(torch.arange(3)).sum().backward()
    assert pos.table.grad[:3].abs().sum() > 0 and pos.table.grad[3:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_width_rope_equals_apply_rope_bit_for_bit(dtype):
    for rope in (RoPE1D(8, 12), RoPE2D(8, 3, 4)):
        x = torch.randn(2, 3, 12, 8).to(dtype)
        pos = torch.arange(12)
        cos, sin = rope.full(pos)  # (T, d)
        assert cos.shape == (12, 8)
        assert torch.equal(apply_rope_full(x, cos, sin), apply_rope(x, *rope(pos)))
        torch.testing.assert_close(full_tables(*rope(pos)), (cos, sin))
