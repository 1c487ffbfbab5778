"""Key/value caches for incremental (token-by-token) decoding.

During sampling each step feeds only the new token(s); the keys and values of earlier positions
are kept here instead of being recomputed. Two kinds with one interface
(``next_position()``, ``update(k, v) -> (keys, values)``, ``truncate(n)``, ``reset()``):

- ``KVCache`` grows by concatenation: simple, any length, but a new tensor shape every step.
- ``StaticKVCache`` preallocates (B, H, Tmax, d) buffers and writes the new keys at a position
  index held in a tensor; shapes never change, which is what ``torch.compile`` and CUDA graphs
  need. Unwritten slots are hidden by the causal mask (key j is visible to query i iff j <= i).

Cross-attention keys/values depend only on the context (the text), so ``CrossKVCache`` stores
them once, at the first step, and every later step reuses them (with the context's padding mask,
prepared once too).

``truncate(n)`` rolls a self-attention cache back to its first n positions. Speculative decoding
(mm.generation.sjd) appends a window of draft tokens in one forward, then keeps only the keys of
the tokens it accepted: keys at positions < n depend only on tokens < n (causal), so they stay valid.

``visible(t)`` gives the (t, Tk) causal mask of the next t tokens against the keys the cache will
hold after writing them; the models compute it once per step and pass it to every layer (all
layers' caches are at the same position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class KVCache:
    """Growing self-attention cache: keys/values are concatenated along time."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def next_position(self) -> int:
        """Absolute position of the next token to be written."""
        return 0 if self.k is None else self.k.shape[2]

    def visible(self, t: int) -> Tensor | None:
        """(t, T_so_far + t) causal mask for the next t tokens; None when one token sees everything."""
        start = self.next_position()
        if t == 1:
            return None  # the newest token attends to every key in a growing cache
        q_pos = torch.arange(t, device=self.k.device if self.k is not None else None) + start  # (t,)
        return torch.arange(start + t, device=q_pos.device)[None, :] <= q_pos[:, None]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H, t, d) keys/values; return all of them (B, H, T_so_far, d)."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def truncate(self, length: int) -> None:
        """Keep positions 0 … length-1 (roll back appended draft tokens)."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]

    def reset(self) -> None:
        self.k = self.v = None


class StaticKVCache:
    """Preallocated self-attention cache of fixed shape (B, H, Tmax, d)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros((), dtype=torch.long, device=self.k.device)  # tokens written so far
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=self.k.device)  # (Tmax,) position of each slot

    def next_position(self) -> Tensor:
        """Absolute position of the next token (a 0-dim tensor: no host sync, compile-friendly)."""
        return self.pos.clone()

    def visible(self, t: int) -> Tensor:
        """(t, Tmax) bool: query i (at position pos + i) sees slots 0 … pos + i; later slots are hidden."""
        q_pos = self.pos + self.slots[:t]  # (t,) no host sync
        return self.slots[None, :] <= q_pos[:, None]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, H, t, d) at positions pos … pos+t-1; return the whole buffers."""
        if k.shape[0] != self.k.shape[0] or k.shape[1] != self.k.shape[1] or k.shape[3] != self.k.shape[3]:
            raise ValueError(f"keys of shape {tuple(k.shape)} do not fit a static cache of shape "
                             f"{tuple(self.k.shape)} (B, H, Tmax, d)")
        idx = self.pos + self.slots[:k.shape[2]]  # (t,)
        self.k.index_copy_(2, idx, k.to(self.k.dtype))
        self.v.index_copy_(2, idx, v.to(self.v.dtype))
        self.pos.add_(k.shape[2])
        return self.k, self.v

    def truncate(self, length: int | Tensor) -> None:
        """Keep positions 0 … length-1: later slots are masked out until they are overwritten."""
        self.pos.fill_(length)

    def reset(self) -> None:
        self.pos.zero_()  # old values stay but are masked out until overwritten


class CrossKVCache:
    """Cross-attention keys/values, computed from the context once and reused at every step.

    ``mask`` is the context's prepared padding mask (see mm.nn.attention.Attention._cross_cached).
    """

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.mask: tuple[Tensor | None, Tensor | None] = (None, None)

    def reset(self) -> None:
        self.k = self.v = None
        self.mask = (None, None)


@dataclass
class BlockCache:
    """The caches one Transformer block needs: its self-attention cache and its cross-attention one."""

    self_attn: KVCache | StaticKVCache
    cross_attn: CrossKVCache = field(default_factory=CrossKVCache)

    def reset(self) -> None:
        self.self_attn.reset()
        self.cross_attn.reset()


def make_caches(num_layers: int, kind: str = "static", batch: int = 1, heads: int = 1,
                max_len: int = 0, head_dim: int = 1, device=None, dtype=None) -> list[BlockCache]:
    """One BlockCache per layer; ``kind`` is "static" (needs batch/heads/max_len/head_dim) or "dynamic"."""
    if kind == "static":
        if max_len <= 0:
            raise ValueError(f"a static cache needs max_len > 0, got {max_len}")
        return [BlockCache(StaticKVCache(batch, heads, max_len, head_dim, device, dtype))
                for _ in range(num_layers)]
    if kind == "dynamic":
        return [BlockCache(KVCache()) for _ in range(num_layers)]
    raise ValueError(f"cache kind must be 'static' or 'dynamic', got {kind!r}")
