"""``Linear``: nn.Linear whose fp32 products on a CPU run in oneDNN instead of the default BLAS.

Why: torch's CPU build sends an fp32 ``F.linear`` / ``matmul`` to MKL's sgemm, and on AMD CPUs
MKL takes a slower code path. Measured on the 2-core AMD EPYC (Zen 5) these notes were written on
(BENCHMARKS.md, "oneDNN linear"): a training-size product (4608 × 256 → 1024) runs at ~220 GFLOP/s
in MKL and ~500 in oneDNN; a decode-size one (batch 4, 512 → 2048) reads its weights at 12 GB/s in
MKL and 31 GB/s in oneDNN (47 GB/s with the weights packed once, see ``PackedLinear``). bf16
products already go to oneDNN inside torch, so only fp32 changes.

``Linear`` is a drop-in subclass: same parameters, same state dict, same ``isinstance``. Its
forward uses oneDNN when all of these hold, and ``F.linear`` otherwise (so CUDA, autocast,
torch.compile, float64, empty batches and tensor subclasses behave exactly as before):

- CPU fp32 input and weight, no CPU autocast, oneDNN available, not inside torch.compile;
- the backend is "onednn" (the default; ``MM_LINEAR=aten`` in the environment or
  ``set_linear_backend("aten")`` turns it off for a whole process).

With gradients the backward runs in oneDNN too: dx = g Wᵀ and dW = gᵀ x are products of the
same kind. Results equal F.linear's to fp32 rounding (summation order differs), not bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("onednn", "aten")
_backend = os.environ.get("MM_LINEAR", "onednn")
if _backend not in BACKENDS:
    raise ValueError(f"MM_LINEAR must be one of {', '.join(BACKENDS)}, got {_backend!r}")
_HAVE_ONEDNN = torch.backends.mkldnn.is_available()


def set_linear_backend(name: str) -> str:
    """Use "onednn" (default) or "aten" for fp32 CPU products from now on; returns the old one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"linear backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    old, _backend = _backend, name
    return old


def linear_backend() -> str:
    return _backend


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # torch.ops.mkldnn._linear_pointwise: x (..., K) @ w(N, K)ᵀ + b, fused "none" post-op.
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def use_onednn(x: Tensor, w: Tensor) -> bool:
    return (_backend == "onednn" and _HAVE_ONEDNN and x.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32 and x.numel() > 0
            and type(x) in (Tensor, nn.Parameter) and type(w) in (Tensor, nn.Parameter)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(g2, w.t(), None).view(x.shape)  # (M, N) @ (N, K) -> (M, K)
        if ctx.needs_input_grad[1]:
            dw = _onednn(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K) -> (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, in oneDNN where ``use_onednn`` says so (see the module docstring)."""
    if not use_onednn(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x.contiguous(), weight, bias)
    return _onednn(x.contiguous(), weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
