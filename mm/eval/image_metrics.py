"""Image reconstruction metrics in pure torch: PSNR, SSIM, codebook usage and perplexity.

Images are float tensors (B, C, H, W) with values in [0, ``data_range``] — convert [-1, 1]
images with ``(x + 1) / 2`` first. Per-image values are returned so callers can average over a
whole validation set (the mean of per-image PSNR, as most VQ papers report).

SSIM follows Wang et al. 2004: an 11×11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, means
over the "valid" region (no padding) and over channels. For images smaller than the window the
window shrinks to the image (odd size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,). Identical images give +inf."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM, (B,): mean of the SSIM map over the valid region and channels."""
    _check_pair(x, y)
    _B, C, H, W = x.shape
    size = min(window, H, W)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = gaussian_window(size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, size, size)  # separable 2-D Gaussian per channel

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)  # (B, C, H-size+1, W-size+1)

    x, y = x.double(), y.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def codebook_stats(counts: torch.Tensor) -> tuple[float, float]:
    """From per-code counts (K,): (% of codes used at least once, perplexity = exp(entropy)).

    Perplexity is the effective number of codes: K when all are used equally, 1 when one is.
    """
    counts = counts.double().flatten()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return float((counts > 0).double().mean().item() * 100), float(math.exp(entropy))
