"""Text encoders: token ids + padding mask → text states (B, Lt, D) in the backbone's width.

Two kinds behind one interface, ``forward(input_ids, attention_mask) -> (states, mask)``:

- ``BuiltinTextEncoder``: a small bidirectional Transformer (1D RoPE, pre-norm blocks) trained
  from scratch on our BPE vocabulary.
- ``HFTextEncoder``: any Hugging Face encoder (e.g. all-MiniLM-L6-v2) loaded from a LOCAL
  folder with ``AutoModel.from_pretrained(folder, local_files_only=True)``; frozen (no gradients,
  always in eval mode) or fine-tuned. When a saved MMModel is reloaded, the encoder is rebuilt
  from its stored Hugging Face config and the weights come from model.safetensors, so the
  original folder is not needed.

Both end with a linear projection to the backbone width D, so the rest of the model never knows
which encoder it has. ``pooled(ids, mask)`` (B, D) is the masked mean of the states, the
pooling MMModel's ITC text embedding uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mm.errors import MMError
from mm.nn.layers import Block, make_norm
from mm.nn.linear import Linear
from mm.nn.position import RoPE1D


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L, D) over the positions where mask (B, L) is True; an empty row gives zeros."""
    w = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (states * w).sum(1) / w.sum(1).clamp(min=1.0)


def _check_ids(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (B, L)")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; they must match")
    return attention_mask.bool()


class BuiltinTextEncoder(nn.Module):
    """Bidirectional Transformer over token ids, trained from scratch."""

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, max_len: int, out_dim: int,
                 mlp_ratio: float = 4.0, mlp: str = "gelu", norm: str = "layernorm", dropout: float = 0.0,
                 freeze: bool = False):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, width)
        self.rope = RoPE1D(width // heads, max_len)
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio, mlp=mlp, norm=norm, dropout=dropout) for _ in range(depth)])
        self.norm = make_norm(norm, width)
        self.proj = Linear(width, out_dim)  # to the backbone width
        self.grad_checkpointing = False
        if freeze:  # all but the projection keep their (random or loaded) values
            for part in (self.tok, self.blocks, self.norm):
                part.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _check_ids(input_ids, attention_mask)  # (B, L) bool
        length = input_ids.shape[1]
        if length > self.max_len:
            raise MMError(f"text of {length} tokens is longer than the encoder's max_len {self.max_len}; "
                          "raise data.text_max_len's model limit or truncate the text")
        x = self.tok(input_ids)  # (B, L, Dt)
        rope = self.rope.full(torch.arange(length, device=x.device))  # (L, d)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, None, None, mask, False, rope, use_reentrant=False)
            else:
                x = blk(x, key_mask=mask, rope=rope)  # padding keys are never attended to
        return self.proj(self.norm(x)), mask  # (B, L, D), (B, L)

    def set_grad_checkpointing(self, on: bool) -> None:
        self.grad_checkpointing = on

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, D) masked mean of the projected states (unnormalised; MMModel adds the ITC head)."""
        return masked_mean(*self(input_ids, attention_mask))


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (``last_hidden_state``) plus a trainable projection to the backbone width."""

    def __init__(self, out_dim: int, path: str = "", hf_config: dict | None = None, freeze: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel  # heavy import, only when this encoder is used

        if hf_config:  # rebuilding a saved MMModel: architecture from config, weights loaded later
            cfg = dict(hf_config)
            self.hf = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        else:
            try:
                self.hf = AutoModel.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise MMError(f"cannot load a Hugging Face text encoder from '{path}' ({first}); "
                              "give a local folder with config.json and weights") from None
        self.hf.float()
        if getattr(self.hf, "pooler", None) is not None:
            self.hf.pooler = None  # unused (we pool ourselves); unused params would break DDP
        self.hf_config = self.hf.config.to_dict()
        self.width = self.hf.config.hidden_size
        self.proj = Linear(self.width, out_dim)
        self.freeze = freeze
        if freeze:
            self.hf.requires_grad_(False)
            self.hf.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.hf.eval()  # a frozen encoder keeps dropout off even while the rest trains
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _check_ids(input_ids, attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self.hf(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # (B, L, Dh)
        return self.proj(h), mask  # (B, L, D), (B, L)

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, D) masked mean of the projected states (mean pooling, as sentence-transformers does)."""
        return masked_mean(*self(input_ids, attention_mask))

    def set_grad_checkpointing(self, on: bool) -> None:
        if on and not self.freeze and hasattr(self.hf, "gradient_checkpointing_enable"):
            self.hf.gradient_checkpointing_enable()
