"""Norms, MLPs and the pre-norm Transformer block used by every model in mm.

Block (pre-norm, residual around each sub-layer):

    x = x + SelfAttn(Norm(x))                  # causal or bidirectional, optional RoPE and cache
    x = x + CrossAttn(Norm(x), context)        # only if the block has cross-attention AND a context is given
    x = x + MLP(Norm(x))

A block built with cross-attention skips it when ``context`` is None. The models never rely on
that for classifier-free guidance or ITC: they pass their learned *null context* instead, so the
conditional and unconditional branches use the same computation (and the same weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.nn.attention import Attention, attend
from mm.nn.linear import Linear

POOLS = ("mean", "max", "attn")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with an optional bias (bias=False saves a parameter vector, as in nanoGPT)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


MLPS = ("gelu", "gelu_exact", "swiglu")


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (fc → GELU → proj) or SwiGLU (silu(x W1) * (x W2) → proj).

    ``gelu`` is the tanh approximation (GPT-2; what older mm models were trained with), ``gelu_exact``
    the erf form (BERT/BART), about half the cost of the tanh one on CPU. SwiGLU computes W1 and W2
    in one fused matmul. ``hidden`` is the inner width.
    """

    def __init__(self, dim: int, hidden: int, kind: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if kind not in MLPS:
            raise ValueError(f"mlp must be one of {', '.join(MLPS)}, got {kind!r}")
        self.kind = kind
        self.fc = Linear(dim, hidden * (2 if kind == "swiglu" else 1), bias=bias)
        self.proj = Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu" else "none")
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention → optional cross-attention → MLP.

    forward(x (B, T, D), context (B, Tc, Dc) | None, context_mask (B, Tc) bool | None,
            key_mask (B, T) bool | None, causal, rope (cos, sin) | None, cache BlockCache | None,
            visible (T, Tk) bool | None: the step's causal mask when decoding with a cache, computed
            once for all blocks by the caller (see mm.nn.cache), query_pos (T, D) | None: added to the
            cross-attention queries only (DETR-style query positions; keys and values stay the context's),
            second: use the second copies of the parts the block was built with (``second`` of __init__))
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 mlp: str = "gelu", norm: str = "layernorm", bias: bool = True, dropout: float = 0.0,
                 second: tuple[str, ...] = ()):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, bias=bias, dropout=dropout)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.norm2 = make_norm(norm, dim)
            self.cross = Attention(dim, heads, context_dim=context_dim, bias=bias, dropout=dropout)
        self.norm3 = make_norm(norm, dim)
        hidden = int(dim * mlp_ratio)
        if mlp == "swiglu":
            hidden = int(2 * hidden / 3)  # keep the parameter count of a GELU MLP of the same ratio
        self.mlp = MLP(dim, hidden, mlp, bias=bias, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        # second: the parts ("attn", "cross", "mlp") that get a second copy with its own norm (attn_b
        # and norm1b, cross_b and norm2b, mlp_b and norm3b), used by forward(..., second=True): one
        # stream of a shared backbone gets weights of its own (VLMo / BEiT-3's modality experts).
        unknown = set(second) - {"attn", "cross", "mlp"}
        if unknown:
            raise ValueError(f"second parts must be attn, cross or mlp, got {sorted(unknown)}")
        self.second = frozenset(p for p in second if p != "cross" or self.has_cross)
        if "attn" in self.second:
            self.norm1b, self.attn_b = make_norm(norm, dim), Attention(dim, heads, bias=bias, dropout=dropout)
        if "cross" in self.second:
            self.norm2b = make_norm(norm, dim)
            self.cross_b = Attention(dim, heads, context_dim=context_dim, bias=bias, dropout=dropout)
        if "mlp" in self.second:
            self.norm3b, self.mlp_b = make_norm(norm, dim), MLP(dim, hidden, mlp, bias=bias, dropout=dropout)

    def _part(self, part: str, norm: str, second: bool) -> tuple[nn.Module, nn.Module]:
        """(norm, module) of ``part``: the second copy when asked for and present."""
        if second and part in self.second:
            return getattr(self, norm + "b"), getattr(self, part + "_b")
        return getattr(self, norm), getattr(self, part)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache=None,
        visible: Tensor | None = None,
        query_pos: Tensor | None = None,
        second: bool = False,
    ) -> Tensor:
        self_cache = cache.self_attn if cache is not None else None
        norm, attn = self._part("attn", "norm1", second)
        x = x + self.drop(attn(norm(x), key_mask=key_mask, causal=causal, rope=rope, cache=self_cache,
                               visible=visible))
        cross_cache = cache.cross_attn if cache is not None else None
        cached = cross_cache is not None and cross_cache.k is not None
        if self.has_cross and (context is not None or cached):
            norm, cross = self._part("cross", "norm2", second)
            q = norm(x)
            if query_pos is not None:
                q = q + query_pos.to(q.dtype)  # (T, D) broadcast over the batch
            x = x + self.drop(cross(q, context, key_mask=context_mask, cache=cross_cache))
        norm, mlp = self._part("mlp", "norm3", second)
        return x + mlp(norm(x))


class Pool(nn.Module):
    """(B, L, D) states -> (B, D): ``mean``, ``max`` or ``attn`` over the L positions.

    ``attn`` is a learned probe attending over the states (SigLIP's MAP head without its MLP). Mean
    pooling averages the one patch that holds a small object with every background patch; a probe
    can read that patch alone, and with fused states (patches that have cross-attended to a
    question) it can read the patch the question is about. ``mean`` and ``max`` have no weights, so
    models saved before this option load unchanged.
    """

    def __init__(self, kind: str, dim: int, heads: int):
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {kind!r}")
        self.kind, self.heads = kind, heads
        if kind == "attn":
            self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.norm = nn.LayerNorm(dim)
            self.q, self.kv, self.out = Linear(dim, dim), Linear(dim, 2 * dim), Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "mean":
            return x.mean(1)
        if self.kind == "max":
            return x.amax(1)
        b, n, d = x.shape
        h = self.heads
        k, v = self.kv(self.norm(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, L, d/h) each
        q = self.q(self.probe).view(1, h, 1, d // h).expand(b, -1, -1, -1)  # (B, h, 1, d/h)
        y = attend(q, k, v)  # (B, h, 1, d/h)
        return self.out(y.reshape(b, d))  # (B, D)
