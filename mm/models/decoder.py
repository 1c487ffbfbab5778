"""TextDecoder: a small causal Transformer over text tokens that cross-attends to image states.

    ids (B, L) ─► token embedding ─► [causal self-attn (1D RoPE) → cross-attn to image states → MLP] × N
               ─► norm ─► logits (B, L, V)       (output projection tied to the token embedding)

logits[:, t] predicts ids[:, t + 1] (the caller shifts). Padding must be on the right: with a
causal mask a real token never sees a later pad token, so no padding mask is needed here and
the loss simply ignores pad targets. Used for captioning and generative VQA answers.

Incremental decoding: ``forward`` accepts one BlockCache per block; the image states' keys and
values are computed at the first call (prefill) and reused, self-attention keys/values go into
a growing or static cache, and the new tokens' positions come from the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mm.errors import MMError
from mm.nn.layers import Block, make_norm
from mm.nn.position import RoPE1D


class TextDecoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int,
                 mlp_ratio: float = 4.0, mlp: str = "gelu", norm: str = "layernorm", dropout: float = 0.0):
        super().__init__()
        self.max_len, self.heads, self.dim = max_len, heads, dim
        self.tok = nn.Embedding(vocab_size, dim)
        self.rope = RoPE1D(dim // heads, max_len)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, context_dim=dim, mlp=mlp, norm=norm,
                                           dropout=dropout) for _ in range(depth)])
        self.norm = make_norm(norm, dim)
        self.grad_checkpointing = False

    def forward(self, ids: Tensor, image_states: Tensor | None, caches=None) -> Tensor:
        """ids (B, t) -> logits (B, t, V). Without caches t is the whole text; with them, the new tokens."""
        if ids.dim() != 2:
            raise ValueError(f"decoder ids have shape {tuple(ids.shape)}; expected (B, L)")
        t = ids.shape[1]
        start = caches[0].self_attn.next_position() if caches is not None else 0
        if caches is None and t > self.max_len:
            raise MMError(f"text of {t} tokens is longer than the decoder's max_len {self.max_len}; "
                          "truncate it or build the model with a larger text_max_len")
        positions = start + torch.arange(t, device=ids.device)  # (t,) absolute positions
        rope = self.rope.full(positions)  # (t, d) full-width tables (mm.nn.position)
        x = self.tok(ids)  # (B, t, D)
        visible = caches[0].self_attn.visible(t) if caches is not None else None  # once for all blocks
        for i, blk in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(blk, x, image_states, None, None, True, rope,
                                                      use_reentrant=False)
            else:
                x = blk(x, image_states, causal=True, rope=rope, cache=cache, visible=visible)
        x = self.norm(x)
        return x @ self.tok.weight.T  # (B, t, V), tied output projection
