"""Decode weights: fp32, bf16, or int8 weight-only (per output channel, symmetric) for sampling.

A decode step at small batch reads every weight once per code, so fewer bytes per weight is
fewer seconds per code (BENCHMARKS.md, "Decoding"):

- ``bf16``: the model in bfloat16 (half the bytes) but the code head, which stays fp32 (see
  ``Fp32Head``).
- ``int8``: as bf16, and every linear layer of the backbone stored as int8 with one bf16 scale per output channel, w ≈ scale[n] · q[n, k], scale = max|w[n]| / 127
  (a quarter of fp32's bytes). On a CPU the product runs in torch's weight-only int8 kernel
  ``aten._weight_int8pack_mm`` (bf16 activations, int8 weights, unpacked on the fly inside the
  kernel); elsewhere, or for input widths it does not support, the weight is dequantised per call.

Samples are not bit-identical to fp32 ones; quality against fp32 on the same seeds is in
BENCHMARKS.md. ``decode_weights`` returns a new model and leaves the fp32 one untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mm.errors import MMError

WEIGHTS = ("fp32", "bf16", "int8")


def int8_kernel_ok(x: Tensor, in_features: int) -> bool:
    # The CPU kernel crashes (segfault, torch 2.13) when the input width is not a multiple of 16.
    return x.device.type == "cpu" and in_features % 16 == 0


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (N, K) and per-output-channel scales (N,)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        # (N,) symmetric, 0 maps to 0. The scale is rounded to its stored dtype *before* the weights
        # are divided by it (a bf16 scale is off by up to 0.4 %, i.e. half a step at |q| = 127), and
        # nudged up so that no |w| / scale exceeds 127.
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0 * (1 + 2**-7)).to(dtype)
        q = (w / scale.float()[:, None]).round().clamp(-127, 127)
        self.register_buffer("weight", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()  # (M, K)
        if int8_kernel_ok(x, self.in_features):
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)  # (M, N)
        else:
            y = x @ (self.weight.to(x.dtype) * self.scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Fp32Head(nn.Module):
    """The code head kept in fp32 in a bf16/int8 model: logits rounded to bf16 (spacing 1/16 at
    |logit| 8-16) shift the sampling distribution, and guidance s·(cond - uncond) amplifies the
    error; measured on the shapes T2I model, a bf16 head moved FID by 15-20 % (BENCHMARKS.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = copy.deepcopy(linear).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.float())


def quantize_int8(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear inside ``module`` by an Int8Linear, in place; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, dtype))
            count += 1
        else:
            count += quantize_int8(child, dtype)
    return count


def decode_weights(model: nn.Module, kind: str) -> nn.Module:
    """The model with decode weights of ``kind`` (fp32 | bf16 | int8): fp32 returns it unchanged."""
    if kind not in WEIGHTS:
        raise MMError(f"decode weights must be one of {', '.join(WEIGHTS)}, got {kind!r}")
    if kind == "fp32":
        return model
    out = copy.deepcopy(model).to(torch.bfloat16).eval()
    if kind == "int8":
        # What every decode step reads: the backbone's blocks. The text encoder runs once per
        # prompt and stays bf16.
        quantize_int8(out.backbone)
    out.t2i_head = Fp32Head(model.t2i_head)  # K·D weights: small next to the blocks
    if getattr(model.config, "t2i_code_weights", False):  # the logit correction stays exact
        out.t2i_log_weight = model.t2i_log_weight.detach().clone()
    if getattr(model.config, "t2i_plan_weights", False):
        out.t2i_plan_log_weight = model.t2i_plan_log_weight.detach().clone()
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a decode step reads (backbone + code head + code embedding)."""
    parts = [model.backbone, model.t2i_head, model.code_embed]
    return sum(t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()])
