"""``Linear``: nn.Linear whose fp32 products on a CPU run in oneDNN instead of the default BLAS.

Why: torch's CPU build sends an fp32 ``F.linear`` / ``matmul`` to MKL's sgemm, and on AMD CPUs
MKL takes a slower code path. Measured on the 2-core AMD EPYC (Zen 5) these notes were written on
(BENCHMARKS.md, "Session 14"): a training-size product (4608 × 256 → 1024) runs at ~220 GFLOP/s
in MKL and ~500 in oneDNN; a decode-size one (batch 4, 512 → 2048) reads its weights at 12 GB/s in
MKL and 31 GB/s in oneDNN (47 GB/s with the weights packed once, see ``packed_for_rows``). bf16
products already go to oneDNN inside torch, so only fp32 changes.

``Linear`` is a drop-in subclass: same parameters, same state dict, same ``isinstance``. Its
forward uses oneDNN when all of these hold, and ``F.linear`` otherwise (so CUDA, autocast,
float64, empty batches and tensor subclasses behave exactly as before):

- CPU fp32 input and weight (bf16 too without gradients), no CPU autocast, oneDNN available;
- the backend is "onednn" (the default; ``MM_LINEAR=aten`` in the environment or
  ``set_linear_backend("aten")`` turns it off for a whole process).

With gradients the backward runs in oneDNN too: dx = g W and dW = gᵀ x are products of the
same kind. Inside torch.compile the product is a custom operator (``mm::onednn_linear``, with its
gradient) that inductor calls as an opaque kernel. Results equal F.linear's to fp32 rounding
(summation order differs), not bit for bit.

Decoding calls every layer with the same small number of rows once per code: ``packed_for_rows``
packs the weights (fp32 or bf16) once into oneDNN's blocked layout for exactly that row count.
Measured at 4 rows, 32 layers 512 → 2048: fp32 31 → 47 GB/s, bf16 19 → 46 GB/s (bit-identical to
the plain bf16 product). A packed weight used at another row count is re-laid out on every call,
several times slower, so calls with other row counts keep the plain weight.
"""

from __future__ import annotations

import contextlib
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


def use_onednn(x: Tensor, w: Tensor, dtypes: tuple = (torch.float32,), compiled_ok: bool = False) -> bool:
    """Whether this product may go to oneDNN (see the module docstring); ``compiled_ok``: inside
    torch.compile (whose fake tensors are subclasses)."""
    return (_backend == "onednn" and _HAVE_ONEDNN and x.device.type == "cpu"
            and x.dtype in dtypes and w.dtype == x.dtype and x.numel() > 0
            and (compiled_ok or (type(x) in (Tensor, nn.Parameter) and type(w) in (Tensor, nn.Parameter)))
            and not torch.is_autocast_enabled("cpu") and (compiled_ok or not torch.compiler.is_compiling()))


PACKABLE = (torch.float32, torch.bfloat16)  # bf16 too: packed, a decode-size bf16 product reads 2.4x faster

# weight.data_ptr() -> (rows, the weight packed for them); filled only inside packed_for_rows.
_PACKED: dict[int, tuple[int, Tensor]] = {}


def _product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ wᵀ + b in oneDNN, with w's packed copy when there is one for x's rows."""
    packed = _PACKED.get(w.data_ptr()) if _PACKED else None
    # The shape and stride checks keep a transposed view of a packed weight (a backward's
    # g @ W) from picking up the packed layout.
    if packed is not None and x.numel() == packed[0] * w.shape[1] and w.shape == packed[1].shape \
            and w.stride() == (w.shape[1], 1):
        return _onednn(x, packed[1], b)
    return _onednn(x, w, b)


# The same as an operator torch.compile treats as opaque (inductor cannot lower oneDNN's linear
# op itself), with its gradient: compiled training and decoding keep oneDNN's products, packed or
# not, and fuse what is around them.
_product_op = torch.library.custom_op("mm::onednn_linear", mutates_args=())(_product)


@_product_op.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _save(ctx, inputs, output) -> None:
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _backward(ctx, g: Tensor):
    """dx = g W and dW = gᵀ x: products of the same kind, in oneDNN too."""
    x, w = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])  # (M, N)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _product_op(g2, w.t(), None).view(x.shape)  # (M, N) @ (N, K) -> (M, K)
    if ctx.needs_input_grad[1]:
        dw = _product_op(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K) -> (N, K)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g2.sum(0)
    return dx, dw, db


_product_op.register_autograd(_backward, setup_context=_save)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, in oneDNN where ``use_onednn`` says so (see the module docstring): fp32 always,
    bf16 too when no gradient is needed (the products that can use packed weights)."""
    if bias is not None and bias.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    compiling = torch.compiler.is_compiling()
    if not use_onednn(x, weight, (torch.float32,) if grad else PACKABLE, compiled_ok=compiling):
        return F.linear(x, weight, bias)
    if grad or compiling:  # the operator: its gradient, and opaque to inductor
        return _product_op(x.contiguous(), weight, bias)
    return _product(x.contiguous(), weight, bias)  # no autograd: skip the operator's dispatch


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by ``linear``, so with packed weights
    inside ``packed_for_rows``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def packed_for_rows(module: nn.Module, rows: int):
    """Inside the block, every fp32 or bf16 CPU ``Linear`` of ``module`` called without gradients
    on exactly ``rows`` rows uses its weight packed once for that row count (the decode step).
    The weights must not change inside the block."""
    layers = [m for m in module.modules()
              if isinstance(m, Linear) and use_onednn(m.weight[:1], m.weight, PACKABLE)]
    keys = []
    try:
        with torch.no_grad():
            for m in layers:
                key = m.weight.data_ptr()
                if key not in _PACKED:  # a nested block (or a shared weight) keeps the outer packing
                    _PACKED[key] = (rows, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows))
                    keys.append(key)
        yield len(keys)
    finally:
        for key in keys:
            _PACKED.pop(key, None)
