"""PSNR, SSIM and codebook statistics against hand values and a naive reference."""

import math

import numpy as np
import pytest
import torch

from mm.eval.image_metrics import codebook_stats, gaussian_window, psnr, ssim


def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :2] += 0.01  # half the pixels off by 0.01: MSE 5e-5 -> 10 log10(1 / 5e-5)
    out = psnr(x, y)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4)
    assert out[1].item() == pytest.approx(10 * math.log10(1 / 5e-5), abs=1e-4)
    assert psnr(x * 2, y * 2, data_range=2.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_identical_is_infinite():
    x = torch.rand(1, 3, 8, 8)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(3, 3, 24, 24)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def naive_ssim(x: np.ndarray, y: np.ndarray, win: np.ndarray, data_range: float = 1.0) -> float:
    """Loop over every valid window position and channel: the paper's formula, literally."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    k = win.shape[0]
    C, H, W = x.shape
    vals = []
    for c in range(C):
        for i in range(H - k + 1):
            for j in range(W - k + 1):
                a, b = x[c, i:i + k, j:j + k], y[c, i:i + k, j:j + k]
                ma, mb = (win * a).sum(), (win * b).sum()
                va = (win * (a - ma) ** 2).sum()
                vb = (win * (b - mb) ** 2).sum()
                cov = (win * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("size", [14, 7])  # 7 < 11: the window shrinks to the image
def test_ssim_matches_a_naive_reference(size):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, size, size, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, size, size, generator=g)).clamp(0, 1)
    k = min(11, size) - (1 - min(11, size) % 2)
    g1 = gaussian_window(k).numpy()
    win = np.outer(g1, g1)
    out = ssim(x, y)
    for b in range(2):
        ref = naive_ssim(x[b].double().numpy(), y[b].double().numpy(), win)
        assert out[b].item() == pytest.approx(ref, abs=1e-5)
    assert (out < 0.99).all()  # noise lowers it


def test_ssim_orders_by_noise():
    x = torch.rand(1, 3, 16, 16)
    little = ssim(x, (x + 0.02 * torch.randn_like(x)).clamp(0, 1))
    lots = ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
    assert little.item() > lots.item()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_codebook_stats():
    usage, ppl = codebook_stats(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0]))
    assert usage == pytest.approx(50.0)
    assert ppl == pytest.approx(4.0)
    usage, ppl = codebook_stats(torch.tensor([10, 0, 0, 0]))
    assert (usage, ppl) == (pytest.approx(25.0), pytest.approx(1.0))
    assert codebook_stats(torch.zeros(4)) == (0.0, 0.0)
