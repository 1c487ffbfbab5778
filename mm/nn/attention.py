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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.nn.position import apply_rope


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
    """
    if mask is None or not rows_may_be_empty:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    # Rows with no visible key: let them attend everywhere (finite softmax), then zero them.
    # Some SDPA backends return NaN for such rows; this makes every backend give 0.
    keep = mask.any(dim=-1, keepdim=True)  # (.., Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~keep, dropout_p=dropout_p)
    return out * keep.to(out.dtype)


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
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(self.context_dim, 2 * dim, bias=bias)  # fused K, V
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)  # fused Q, K, V: rows [W_q; W_k; W_v]
        self.out = nn.Linear(dim, dim, bias=bias)

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

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache=None,
    ) -> Tensor:
        cached_kv = self.is_cross and cache is not None and cache.k is not None
        self._check(x, context, cached_kv)
        b, tq, _ = x.shape
        if self.is_cross:
            q = self._heads(self.q(x), 1)[0]  # (B, H, Tq, d)
            if cached_kv:
                k, v = cache.k, cache.v  # computed once per context
            else:
                k, v = self._heads(self.kv(context), 2)  # (B, H, Tk, d) each
                if cache is not None:
                    cache.k, cache.v = k, v
        else:
            q, k, v = self._heads(self.qkv(x), 3)  # (B, H, Tq, d) each
            if rope is not None:  # rotate the new queries and keys before they enter the cache
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        tk = k.shape[2]

        is_causal, causal_from = False, None
        if cache is not None and not self.is_cross:
            # A cache is only used for causal decoding; the causal mask also hides unwritten slots.
            causal_from = cache.next_position()  # absolute position of the first new query
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
        p = self.dropout if self.training else 0.0
        user_mask = key_mask is not None or attn_mask is not None  # only these can empty a row
        y = attend(q, k, v, mask, is_causal=is_causal, dropout_p=p, rows_may_be_empty=user_mask)  # (B, H, Tq, d)
        y = y.transpose(1, 2).reshape(b, tq, self.dim)  # concatenate heads
        return self.out(y)

