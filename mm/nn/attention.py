"""Multi-head attention: the four steps of scaled dot-product attention, on torch's SDPA.

For queries X (B, Tq, D) and a context C (B, Tk, Dc) (C = X for self-attention):

    Q = X W_q,  K = C W_k,  V = C W_v          # projections, split into H heads of d = D / H
    scores  = Q Kᵀ / √d                        # (B, H, Tq, Tk)
    weights = softmax(scores) over the keys    # masked keys get weight 0
    out     = weights · V                      # (B, H, Tq, d), heads concatenated → (B, Tq, D) → W_o

Steps 2-4 run inside ``torch.nn.functional.scaled_dot_product_attention`` (one fused kernel,
flash/memory-efficient on GPU). Masks are boolean with True = attend. A query row whose keys
are all masked gets exactly zero attention output (so the module returns W_o's bias for it) and
zero gradients, never NaN: that happens for padding queries or for an empty text context, and
one NaN would poison a whole batch.

Self-attention uses one fused QKV projection (one matmul instead of three); cross-attention
projects queries from x and fused keys/values from the context, whose width may differ.
Incremental decoding passes a cache (mm.nn.cache): self-attention keys/values are appended to
it, cross-attention keys/values are computed once per context and reused at every step.

Decoding runs one token at a time, so its cost is mostly the number of small operations, not
their size. Hence: RoPE rotates queries and keys together with full-width tables (3 ops, see
mm.nn.position); the causal mask of a cached step is computed once per step by the model and
passed to every layer (``visible``); the cross-attention padding mask is prepared once, with
the keys/values, and kept in the cross cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.nn.linear import Linear
from mm.nn.position import apply_rope_full, full_tables


def _mask_error(name: str, mask: Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                      f"expected a torch.bool tensor of shape {expected} (True = attend)")


def build_mask(
    batch: int,
    tq: int,
    tk: int,
    key_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor | None:
    """Combine a key-padding mask (B, Tk) and an attention mask into one (B|1, 1|H, Tq|1, Tk) bool mask.

    ``attn_mask`` may be (Tq, Tk), (B, Tq, Tk) or (B, H, Tq, Tk). Returns None if both are None.
    """
    mask = None
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (batch, tk):
            raise _mask_error("key_mask", key_mask, f"(B, Tk) = ({batch}, {tk})")
        mask = key_mask[:, None, None, :]  # (B, 1, 1, Tk)
    if attn_mask is not None:
        ok = attn_mask.dtype == torch.bool and attn_mask.shape[-2:] == (tq, tk) and (
            attn_mask.dim() == 2
            or (attn_mask.dim() == 3 and attn_mask.shape[0] == batch)
            or (attn_mask.dim() == 4 and attn_mask.shape[0] in (1, batch))
        )
        if not ok:
            raise _mask_error("attn_mask", attn_mask, f"(Tq, Tk), (B, Tq, Tk) or (B, H, Tq, Tk) with "
                              f"B={batch}, Tq={tq}, Tk={tk}")
        if attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # (B, 1, Tq, Tk)
        mask = attn_mask if mask is None else mask & attn_mask
    return mask


def causal_mask(tq: int, tk: int, q_start: Tensor | int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool: query i (at absolute position q_start + i) sees keys 0 … q_start + i."""
    q_pos = torch.arange(tq, device=device) + q_start  # (Tq,)
    return torch.arange(tk, device=device)[None, :] <= q_pos[:, None]  # (Tq, Tk)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
           is_causal: bool = False, dropout_p: float = 0.0, rows_may_be_empty: bool = True) -> Tensor:
    """softmax(Q Kᵀ / √d) V on (B, H, T, d) tensors; a fully masked query row gives zeros.

    ``rows_may_be_empty=False`` (e.g. a causal mask alone: every query sees key 0) skips the guard.

    Training under bf16/fp16 autocast on a CPU computes attention in fp32: there, SDPA's
    half-precision backward has no fast path and takes ~2× the fp32 forward + backward (its
    forward alone is fast, so inference stays in half precision).
    """
    if q.requires_grad and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # or autocast would cast the inputs straight back
            out = attend(q.float(), k.float(), v.float(), mask, is_causal, dropout_p, rows_may_be_empty)
        return out.to(q.dtype)
    sdpa = F.scaled_dot_product_attention
    if (q.shape[-2] <= 16 and q.device.type == "cpu" and q.dtype == torch.bfloat16 and not is_causal
            and dropout_p == 0.0 and not torch.is_grad_enabled()):
        # Decoding in bf16: SDPA's CPU kernel takes 3-5x longer than three plain ops for a few
        # queries (343 vs 111 µs at 1 query x 257 keys, B 4, H 8; BENCHMARKS.md "Session 14").
        sdpa = _few_query_attention
    if mask is None or not rows_may_be_empty:
        return sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    # Rows with no visible key: let them attend everywhere (finite softmax), then zero them.
    # Some SDPA backends return NaN for such rows; this makes every backend give 0.
    keep = mask.any(dim=-1, keepdim=True)  # (.., Tq, 1)
    out = sdpa(q, k, v, attn_mask=mask | ~keep, dropout_p=dropout_p)
    return out * keep.to(out.dtype)


def _few_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                         is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """SDPA written out for a few queries (no causal flag, no dropout): scores and softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (B, H, Tq, d)


class Attention(nn.Module):
    """Multi-head self-attention (``context_dim=None``, fused QKV) or cross-attention.

    forward(x (B, Tq, D), context (B, Tk, Dc) | None, key_mask (B, Tk) bool, attn_mask bool,
            causal, rope=(cos, sin) for the Tq new positions, cache) -> (B, Tq, D)
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.is_cross = context_dim is not None
        self.context_dim = context_dim if context_dim is not None else dim
        self.dropout = dropout
        if self.is_cross:
            self.q = Linear(dim, dim, bias=bias)
            self.kv = Linear(self.context_dim, 2 * dim, bias=bias)  # fused K, V
        else:
            self.qkv = Linear(dim, 3 * dim, bias=bias)  # fused Q, K, V: rows [W_q; W_k; W_v]
        self.out = Linear(dim, dim, bias=bias)

    def _heads(self, t: Tensor, n: int) -> tuple[Tensor, ...]:
        """(B, T, n*D) -> n tensors (B, H, T, d)."""
        b, t_len, _ = t.shape
        t = t.view(b, t_len, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return t.unbind(0)

    def _check(self, x: Tensor, context: Tensor | None, cached: bool) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"attention input has shape {tuple(x.shape)}; expected (B, T, {self.dim})")
        if self.is_cross and not (context is None and cached):
            if context is None:
                raise ValueError("cross-attention needs a context tensor (B, Tk, Dc); got None")
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
                raise ValueError(f"cross-attention context has shape {tuple(context.shape)}; expected "
                                 f"(B, Tk, {self.context_dim}) with B={x.shape[0]} (x is {tuple(x.shape)})")
        elif context is not None:
            raise ValueError("self-attention got a context; build Attention(context_dim=...) for cross-attention")

    def _qkv_rope(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Fused QKV projection, then RoPE on queries and keys at once -> q, k, v (B, H, T, d)."""
        b, t_len, _ = x.shape
        qkv = self.qkv(x).view(b, t_len, 3, self.heads, self.head_dim)  # (B, T, 3, H, d)
        if rope is None:
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rope
        if cos.dim() != 2 or cos.shape[0] != t_len or cos.shape[-1] not in (self.head_dim, self.head_dim // 2):
            raise ValueError(f"RoPE table of shape {tuple(cos.shape)} does not fit {t_len} tokens of head dim "
                             f"{self.head_dim}; expected (T, d) or (T, d/2)")
        if cos.shape[-1] != self.head_dim:
            cos, sin = full_tables(cos, sin)  # half tables (T, d/2) -> (T, d)
        qk = apply_rope_full(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])  # (B, T, 2, H, d)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # rotated before the keys enter a cache
        return q, k, qkv[:, :, 2].transpose(1, 2)

    def _cross_cached(self, context: Tensor | None, key_mask: Tensor | None, tq: int, cache) -> tuple:
        """Cached cross-attention: keys/values (B, H, Tk, d) and the prepared padding mask
        (mask (B, 1, 1, Tk) | None, keep (B, 1, 1, 1) | None), computed at the first step only.

        A context with no visible key attends everywhere and is zeroed by ``keep`` (as in ``attend``);
        when every row has a key, keep is dropped (one host sync per context, not per step).
        """
        if cache.k is None:
            cache.k, cache.v = self._heads(self.kv(context), 2)  # (B, H, Tk, d) each
            mask = build_mask(cache.k.shape[0], tq, cache.k.shape[2], key_mask)  # (B, 1, 1, Tk), validated
            cache.mask = (None, None)
            if mask is not None:
                keep = mask.any(dim=-1, keepdim=True)  # (B, 1, 1, 1)
                cache.mask = (mask, None) if bool(keep.all()) else (mask | ~keep, keep)
        return cache.k, cache.v, cache.mask

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache=None,
        visible: Tensor | None = None,
    ) -> Tensor:
        """``visible`` (Tq, Tk) bool: the causal mask of a cached step, if the caller computed it once
        for all layers (``cache.visible(Tq)`` before any layer's update); otherwise computed here."""
        cached_kv = self.is_cross and cache is not None and cache.k is not None
        self._check(x, context, cached_kv)
        b, tq, _ = x.shape
        p = self.dropout if self.training else 0.0
        if self.is_cross:
            q = self._heads(self.q(x), 1)[0]  # (B, H, Tq, d)
            if cache is not None and attn_mask is None:  # incremental decoding
                k, v, (mask, keep) = self._cross_cached(context, key_mask, tq, cache)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Tq, d)
                if keep is not None:
                    y = y * keep.to(y.dtype)  # a context with no visible key gives zeros
            else:
                k, v = (cache.k, cache.v) if cached_kv else self._heads(self.kv(context), 2)  # (B, H, Tk, d)
                if cache is not None and not cached_kv:
                    cache.k, cache.v = k, v
                mask = build_mask(b, tq, k.shape[2], key_mask, attn_mask)
                y = attend(q, k, v, mask, dropout_p=p)  # (B, H, Tq, d)
            return self.out(y.transpose(1, 2).reshape(b, tq, self.dim))

        q, k, v = self._qkv_rope(x, rope)  # (B, H, Tq, d) each
        tk = k.shape[2]
        is_causal, causal_from = False, None
        if cache is not None:
            # A cache is only used for causal decoding; the causal mask also hides unwritten slots.
            if visible is None:
                visible = cache.visible(tq)  # (Tq, Tk) before this step's keys are written
            k, v = cache.update(k, v)  # all keys so far (B, H, Tk, d); static cache: the whole buffer
            tk = k.shape[2]
        elif causal:
            if key_mask is None and attn_mask is None and tq == tk:
                is_causal = True  # SDPA's built-in causal path, no mask tensor
            else:
                causal_from = tk - tq  # queries are the last Tq positions

        mask = build_mask(b, tq, tk, key_mask, attn_mask)  # validates shapes and dtypes
        if causal_from is not None:
            c = causal_mask(tq, tk, causal_from, x.device)  # (Tq, Tk)
            mask = c if mask is None else mask & c
        if visible is not None:
            if visible.shape != (tq, tk):
                raise ValueError(f"visible mask has shape {tuple(visible.shape)}; expected (Tq, Tk) = ({tq}, {tk})")
            mask = visible if mask is None else mask & visible
        user_mask = key_mask is not None or attn_mask is not None  # only these can empty a row
        y = attend(q, k, v, mask, is_causal=is_causal, dropout_p=p, rows_may_be_empty=user_mask)  # (B, H, Tq, d)
        y = y.transpose(1, 2).reshape(b, tq, self.dim)  # concatenate heads
        return self.out(y)
