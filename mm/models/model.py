"""MMModel: text encoder + patch/code embeddings + shared backbone + text decoder + heads.

What the objectives and the sampler call (all tensors batch-first):

    text_states, text_mask = model.encode_text(ids, mask)         # (B, Lt, D), (B, Lt) bool
    model.encode_prompt(ids, mask)  # the same for T2I's context (its own encoder with t2i_text)
    model.text_embedding(ids, mask) / model.pool_text(states, mask) -> (B, E) unit-norm ITC embedding
    model.image_states(images, text_states=None, text_mask=None)  # (B, Li, D); no text = null context
    model.image_embedding(images) / model.pool_image(states)      -> (B, E) unit-norm ITC embedding
    model.itc_logit_scale()                                       # exp(learned log-scale), ≤ 100
    fused = model.fuse(images, text_states, text_mask)             # (B, Li, D) image states with text
    model.itm_logits(fused) -> (B, 2)            model.vqa_logits(fused) -> (B, A)  (after set_vqa_answers(A))
    model.caption_logits(image_states, ids, mask=None) -> (B, L, V); logits[:, t] predicts ids[:, t+1]
    model.t2i_logits(codes (B, h, w), text_states, text_mask) -> (B, h*w, K); row n predicts code n
        (text_states=None uses the null context: the unconditional branch / CFG dropout)
    model.t2i_plan_tokens(images) -> (B, t, t), (B, P) or None   # with t2i_plan: the colour plan drawn
        before the codes; t2i_logits / t2i_states then take plan=, and t2i_states returns (B, P + h*w, D)
    model.null_context(batch, length=None) -> (states, mask)     # to batch CFG branches together

Incremental sampling (cross-attention K/V computed once at prefill; self-attention K/V in a
static (B, H, Tmax, d) cache by default, or a growing one with cache="dynamic"):

    logits, state = model.t2i_prefill(text_states, text_mask)     # (B, K) logits for code 0
    logits = model.t2i_step(codes_n (B,), state)                  # (B, K) logits for the next code
    logits = model.t2i_extend(codes (B, t), state)                # (B, t, K): t codes in one forward
    model.t2i_truncate(state, n)                                  # keep the first n fed tokens (rollback)
    logits, state = model.caption_prefill(image_states, ids (B, t))   # (B, V) for the token after ids
    logits = model.caption_step(ids_n (B,), state)

``save_pretrained(dir)`` writes config.json + model.safetensors; ``MMModel.from_pretrained(dir)``
rebuilds the same model (also a Hugging Face text encoder, from its stored config) with no pickle.
The VQ tokenizer is not part of MMModel: only the codebook size K and the code grid are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.errors import MMError
from mm.models.backbone import PLAN_VOCAB, CodeEmbed, PatchEmbed, SharedBackbone, plan_sides, plan_tokens
from mm.models.decoder import TextDecoder
from mm.models.text_encoder import BuiltinTextEncoder, HFTextEncoder, masked_mean
from mm.nn.attention import Attention
from mm.nn.cache import BlockCache, make_caches
from mm.nn.layers import MLP, POOLS, Block, Pool
from mm.nn.linear import Linear

VQA_FUSIONS = ("fused", "late", "reader", "film")


@dataclass
class MMConfig:
    """Everything needed to rebuild an MMModel; saved as config.json beside the weights."""

    vocab_size: int = 1024  # text tokenizer vocabulary (encoder input and decoder output)
    text_max_len: int = 32
    text_encoder: str = "builtin"  # "builtin" or the local Hugging Face folder it was loaded from
    text_encoder_config: dict | None = None  # HF config dict, filled at load; rebuilds the architecture
    freeze_text_encoder: bool = False  # only the projection to the backbone width trains (either encoder)
    text_width: int = 256  # builtin encoder only
    text_depth: int = 4
    text_heads: int = 4
    width: int = 256  # backbone (and decoder) width D
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # gelu (tanh approximation) | gelu_exact (erf; cheaper on CPU) | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    dropout: float = 0.0
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    image_pos: str = "rope2d"  # rope2d | learned | both (mm.models.backbone.GridPositions)
    patch_stem: str = "linear"  # linear (ViT) | conv (3x3 stride-2 convolutions; mm.models.backbone.PatchEmbed)
    # Add the image tokens' learned positions to every cross-attention query (needs image_pos learned
    # or both; mm.models.backbone.GridPositions): position words bind 3-4x faster.
    cross_pos: bool = False
    # With cross_pos: whether the understanding patches get the query positions too (false: only the T2I
    # code stream, whose position words need them; understanding keeps plain queries).
    cross_pos_patches: bool = True
    # Give the T2I code stream cross-attention weights of its own in every backbone block (self-attention
    # and MLPs stay shared); understanding keeps the first. Sharing all of it cost T2I its shape words.
    t2i_cross: bool = False
    t2i_mlp: bool = False  # the same for the MLPs (a T2I "modality expert" per block, as in VLMo)
    t2i_attn: bool = False  # the same for the self-attention (all three: T2I shares only the text encoder)
    # T2I reads its prompt with a text encoder of its own (same kind and size); understanding keeps the
    # first. One encoder read by both streams cost T2I its shape words (BENCHMARKS.md, session 15).
    t2i_text: bool = False
    codebook_size: int = 512  # K of the VQ tokenizer
    code_grid: list[int] = field(default_factory=lambda: [8, 8])  # (h, w) of the VQ code grid
    decoder_depth: int = 2
    embed_dim: int = 256  # ITC embedding size
    null_context_len: int = 1
    vqa_answers: int = 0  # classifier head size; 0 = no head (set at VQA fine-tuning)
    # Weight init: "gpt" = N(0, 0.02) with residual outputs scaled by 1/sqrt(2 depth) (GPT-2);
    # "torch" = PyTorch's default Linear init (U(+-1/sqrt(fan_in)), ~2x larger at D 192, residual
    # outputs ~6x larger), embeddings N(0, 0.02) as in gpt. Only matters for training from scratch.
    init: str = "gpt"
    # How the ITM and VQA heads read the fused states (B, Li, D): mean | max | attn (a learned
    # probe, mm.nn.layers.Pool). Mean dilutes one small object's patch with the background ones.
    itm_pool: str = "mean"
    vqa_pool: str = "mean"
    # What the VQA classifier reads: "fused" = the pooled fused states only; "late" = also the pooled
    # question states q and their product, [v, q, v*q] (the bilinear late fusion of classic VQA
    # models): the question reaches the answer directly, not only through cross-attention;
    # "reader" = the question tokens run through decoder_depth blocks of their own that cross-attend
    # to the fused patches (ALBEF/BLIP's direction: the question looks at the image), and the
    # classifier reads [v, r], r their masked mean; "film" = the pooled question scales and shifts
    # every fused patch state (FiLM, Perez et al. 2018: h * (1 + gamma(q)) + beta(q)) before the
    # classifier reads their mean and max, so a question word can pick out the one patch it is
    # about (max) or count the patches (mean) instead of being averaged away first.
    vqa_fusion: str = "fused"
    # T2I trained with per-code loss weights w (objectives.t2i_object_weight): the model keeps
    # log w as a (K,) buffer and subtracts it from the code logits, so that sampling draws from
    # the data distribution, not from the weighted one (a weighted NLL's optimum is softmax ∝ w·p).
    t2i_code_weights: bool = False
    # A training-only head that predicts, from each T2I state, which codes are still to come in each
    # of r x r regions of the code grid (objectives.t2i_future; 0 = no head). Sampling never reads it.
    t2i_future_regions: int = 0
    # T2I draws a t x t colour plan first (t = t2i_plan, 0 = none): each block's mean colour in 8 levels
    # per channel (mm.models.backbone.plan_tokens), then the codes. Where objects go and how many there
    # are is decided over t*t clean tokens instead of over the textured codes (BENCHMARKS.md, session 18).
    # A list of sides, e.g. [3, 6], draws the plans coarse to fine: 3x3 places the objects, 6x6 (a
    # silhouette at 8 px per cell) settles their shapes, then the codes.
    t2i_plan: int | list[int] = 0
    # The plan trained with per-token loss weights (objectives.t2i_plan_object_weight), exactly as
    # t2i_code_weights does for the codes: a (PLAN_VOCAB,) log w buffer subtracted from the plan logits.
    t2i_plan_weights: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> MMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MMError(f"model config has unknown keys {unknown}; was it written by a newer mm?")
        return cls(**data)


@dataclass
class DecodeState:
    """What incremental decoding carries between steps: per-block caches and the context mask."""

    caches: list[BlockCache]
    context_mask: Tensor | None


class MMModel(nn.Module):
    def __init__(self, config: MMConfig):
        super().__init__()
        c = self.config = config
        if c.init not in ("gpt", "torch"):
            raise MMError(f"model init must be 'gpt' or 'torch', got {c.init!r}")
        if c.width % c.heads:
            raise MMError(f"model width {c.width} is not divisible by heads {c.heads}")
        plan_sides(c.t2i_plan)  # a one-line error for a bad plan
        if c.vqa_fusion not in VQA_FUSIONS:
            raise MMError(f"model vqa_fusion must be one of {', '.join(VQA_FUSIONS)}, got {c.vqa_fusion!r}")
        for name in ("itm_pool", "vqa_pool"):
            if getattr(c, name) not in POOLS:
                raise MMError(f"model {name} must be one of {', '.join(POOLS)}, got {getattr(c, name)!r}")
        blocks = {"mlp_ratio": c.mlp_ratio, "mlp": c.mlp, "norm": c.norm, "dropout": c.dropout}
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.channels, c.width, c.heads, c.image_pos,
                                      c.patch_stem, c.cross_pos and c.cross_pos_patches)
        self.code_embed = CodeEmbed(c.codebook_size, tuple(c.code_grid), c.width, c.heads, c.image_pos, c.cross_pos,
                                    c.t2i_plan)
        t2i_own = tuple(part for part in ("attn", "cross", "mlp") if getattr(c, f"t2i_{part}"))
        self.backbone = SharedBackbone(c.width, c.depth, c.heads, null_context_len=c.null_context_len,
                                       t2i_own=t2i_own, **blocks)
        self.decoder = TextDecoder(c.vocab_size, c.width, c.decoder_depth, c.heads, c.text_max_len, **blocks)
        self.itc_image = Linear(c.width, c.embed_dim)
        self.itc_text = Linear(c.width, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.itm_pool = Pool(c.itm_pool, c.width, c.heads)
        self.itm_head = Linear(c.width, 2)
        self.t2i_head = Linear(c.width, c.codebook_size)
        self.t2i_plan_head = Linear(c.width, PLAN_VOCAB) if self.code_embed.plan else None
        if c.t2i_code_weights:
            self.register_buffer("t2i_log_weight", torch.zeros(c.codebook_size))  # (K,) log w
        if c.t2i_plan_weights:
            self.register_buffer("t2i_plan_log_weight", torch.zeros(PLAN_VOCAB))  # (V,) log w
        self.t2i_future_head = self._future_head(c.t2i_future_regions) if c.t2i_future_regions else None
        self.vqa_pool = Pool(c.vqa_pool, c.width, c.heads) if c.vqa_answers else None
        self.vqa_reader = self._vqa_reader() if c.vqa_answers else None
        self.vqa_head = self._vqa_head(c.vqa_answers) if c.vqa_answers else None
        self.apply(self._init_weights)  # before the HF encoder exists, so pretrained weights stay
        self.text_encoder = self._text_encoder(blocks)
        self.t2i_text_encoder = self._text_encoder(blocks) if c.t2i_text else None

    def _init_weights(self, m: nn.Module) -> None:
        # GPT-2 style: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2·layers).
        if self.config.init == "torch":  # keep nn.Linear's own init; only embeddings get N(0, 0.02)
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            return
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        residual_out = m.out if isinstance(m, Attention) else m.proj if isinstance(m, MLP) else None
        if residual_out is not None:  # apply() visits children first, so this overrides the above
            nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * max(self.config.depth, 1)))

    def _text_encoder(self, blocks: dict) -> nn.Module:
        c = self.config
        if c.text_encoder == "builtin":
            enc = BuiltinTextEncoder(c.vocab_size, c.text_width, c.text_depth, c.text_heads, c.text_max_len,
                                     c.width, **blocks, freeze=c.freeze_text_encoder)
            enc.apply(self._init_weights)
            return enc
        enc = HFTextEncoder(c.width, c.text_encoder, c.text_encoder_config, freeze=c.freeze_text_encoder)
        c.text_encoder_config = enc.hf_config
        self._init_weights(enc.proj)
        return enc

    def _vqa_reader(self) -> nn.Module | None:
        """The question side of the VQA head: reader blocks, the FiLM projection, or nothing."""
        c = self.config
        if c.vqa_fusion == "film":
            return Linear(c.width, 2 * c.width)  # pooled question -> (gamma, beta)
        if c.vqa_fusion != "reader":
            return None
        return nn.ModuleList([Block(c.width, c.heads, c.mlp_ratio, context_dim=c.width, mlp=c.mlp, norm=c.norm,
                                    dropout=c.dropout) for _ in range(max(c.decoder_depth, 1))])

    def _vqa_head(self, answers: int) -> nn.Module:
        d = self.config.width
        d_in = {"fused": d, "late": 3 * d, "reader": 2 * d, "film": 2 * d}[self.config.vqa_fusion]
        return nn.Sequential(Linear(d_in, 2 * d), nn.GELU(), nn.LayerNorm(2 * d), Linear(2 * d, answers))

    def set_vqa_answers(self, answers: int) -> None:
        """(Re)build the VQA classifier for an answer vocabulary of this size (VQA fine-tuning)."""
        if answers < 1:
            raise MMError(f"the VQA answer vocabulary must have at least 1 answer, got {answers}")
        c = self.config
        self.vqa_pool, self.vqa_reader = Pool(c.vqa_pool, c.width, c.heads), self._vqa_reader()
        self.vqa_head = self._vqa_head(answers)
        for part in (self.vqa_pool, self.vqa_reader, self.vqa_head):
            if part is not None:
                part.to(self.logit_scale.device).apply(self._init_weights)
        self.config.vqa_answers = answers

    def set_grad_checkpointing(self, on: bool = True) -> None:
        self.backbone.grad_checkpointing = self.decoder.grad_checkpointing = on
        for enc in (self.text_encoder, self.t2i_text_encoder):
            if enc is not None:
                enc.set_grad_checkpointing(on)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- text -------------------------------------------------------------------------------

    def encode_text(self, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.text_encoder(ids, mask)  # (B, Lt, D), (B, Lt) bool

    def encode_prompt(self, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The text states T2I cross-attends to: its own encoder's with ``t2i_text``, else encode_text's."""
        enc = self.t2i_text_encoder if self.t2i_text_encoder is not None else self.text_encoder
        return enc(ids, mask)  # (B, Lt, D), (B, Lt) bool

    def pool_text(self, text_states: Tensor, text_mask: Tensor) -> Tensor:
        return F.normalize(self.itc_text(masked_mean(text_states, text_mask)), dim=-1)  # (B, E)

    def text_embedding(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.pool_text(*self.encode_text(ids, mask))

    # ---- understanding: patches through the backbone (bidirectional) --------------------------

    def null_context(self, batch: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        return self.backbone.null(batch, length)

    def image_states(self, images: Tensor, text_states: Tensor | None = None,
                     text_mask: Tensor | None = None) -> Tensor:
        """images (B, C, H, W) -> (B, Li, D); without text the backbone sees the null context."""
        x, rope, qpos = self.patch_embed(images)  # (B, Li, D)
        if text_states is None:
            text_states, text_mask = self.null_context(x.shape[0])
        return self.backbone(x, rope, text_states, text_mask, causal=False, query_pos=qpos)

    def pool_image(self, image_states: Tensor) -> Tensor:
        return F.normalize(self.itc_image(image_states.mean(1)), dim=-1)  # (B, E)

    def image_embedding(self, images: Tensor) -> Tensor:
        return self.pool_image(self.image_states(images))

    def itc_logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def fuse(self, images: Tensor, text_states: Tensor, text_mask: Tensor) -> Tensor:
        return self.image_states(images, text_states, text_mask)

    def itm_logits(self, fused: Tensor) -> Tensor:
        return self.itm_head(self.itm_pool(fused))  # (B, 2): [no match, match]

    def vqa_logits(self, fused: Tensor, text_states: Tensor | None = None, text_mask: Tensor | None = None
                   ) -> Tensor:
        """fused (B, Li, D) -> (B, A); ``vqa_fusion`` late/reader also need the question's states (B, Lt, D)."""
        if self.vqa_head is None:
            raise MMError("this model has no VQA classifier head; call set_vqa_answers(n) before VQA training")
        v = self.vqa_pool(fused)  # (B, D)
        fusion = self.config.vqa_fusion
        if fusion == "fused":
            return self.vqa_head(v)  # (B, A)
        if text_states is None:
            raise MMError(f"this model's VQA head (vqa_fusion={fusion}) reads the question too: pass its text "
                          "states and mask to vqa_logits")
        if fusion == "late":
            q = masked_mean(text_states, text_mask).to(v.dtype)  # (B, D)
            return self.vqa_head(torch.cat([v, q, v * q], dim=-1))  # (B, 3D) -> (B, A)
        if fusion == "film":
            q = masked_mean(text_states, text_mask).to(fused.dtype)  # (B, D)
            gamma, beta = self.vqa_reader(q).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
            f = fused * (1 + gamma) + beta  # (B, Li, D): each patch, scaled by what the question asks
            return self.vqa_head(torch.cat([f.mean(1), f.amax(1)], dim=-1))  # (B, 2D) -> (B, A)
        r = text_states.to(fused.dtype)  # (B, Lt, D): each question token asks the patches
        for blk in self.vqa_reader:
            r = blk(r, fused, key_mask=text_mask)  # self-attention over the question, cross to the patches
        return self.vqa_head(torch.cat([v, masked_mean(r, text_mask)], dim=-1))  # (B, 2D) -> (B, A)

    # ---- captioning / generative answers ------------------------------------------------------

    def caption_logits(self, image_states: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, L, V) next-token logits. Right padding assumed (see TextDecoder); ``mask`` is for the loss."""
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"caption mask has shape {tuple(mask.shape)} but ids have {tuple(ids.shape)}")
        return self.decoder(ids, image_states)

    def _cache_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)  # keys/values come out of autocast matmuls
        return self.logit_scale.dtype

    def caption_prefill(self, image_states: Tensor, ids: Tensor, cache: str = "static",
                        max_len: int | None = None) -> tuple[Tensor, DecodeState]:
        """Run the prompt ids (B, t) (at least a BOS); return logits (B, V) for the next token."""
        b, dev = ids.shape[0], ids.device
        c = self.config
        if max_len is not None and max_len > c.text_max_len:
            raise MMError(f"caption max_len {max_len} is longer than the decoder's text_max_len {c.text_max_len}; "
                          "ask for at most that many tokens")
        caches = make_caches(c.decoder_depth, cache, b, c.heads, max_len or c.text_max_len,
                             c.width // c.heads, dev, self._cache_dtype(dev))
        logits = self.decoder(ids, image_states, caches)
        return logits[:, -1], DecodeState(caches, None)

    def caption_step(self, ids: Tensor, state: DecodeState) -> Tensor:
        """ids (B,) the tokens just chosen -> (B, V) logits for the next ones."""
        return self.decoder(ids.view(-1, 1), None, state.caches)[:, -1]

    # ---- text-to-image: next-code prediction over the VQ grid ---------------------------------

    def set_t2i_code_weights(self, weights: Tensor) -> None:
        """Train T2I with per-code loss weights (K,) > 0 (see ``t2i_code_weights``); logits stay calibrated."""
        self._set_log_weights("t2i_code_weights", "t2i_log_weight", weights, self.config.codebook_size, "code")

    def set_t2i_plan_weights(self, weights: Tensor) -> None:
        """Train the plan with per-token loss weights (PLAN_VOCAB,) > 0 (see ``t2i_plan_weights``)."""
        if self.t2i_plan_head is None:
            raise MMError("plan weights need a model with a T2I plan (model.t2i_plan)")
        self._set_log_weights("t2i_plan_weights", "t2i_plan_log_weight", weights, PLAN_VOCAB, "plan")

    def _set_log_weights(self, flag: str, buffer: str, weights: Tensor, n: int, what: str) -> None:
        if weights.shape != (n,) or not bool((weights > 0).all()):
            raise MMError(f"T2I {what} weights must be {n} positive numbers, got shape {tuple(weights.shape)}")
        if not getattr(self.config, flag):
            self.register_buffer(buffer, torch.zeros(n, device=self.logit_scale.device))
            setattr(self.config, flag, True)
        getattr(self, buffer).copy_(weights.log())

    def _future_head(self, regions: int) -> nn.Module:
        grid = self.config.code_grid
        if not 1 <= regions <= min(grid):
            raise MMError(f"T2I future regions must be in [1, {min(grid)}] for a {grid[0]}x{grid[1]} code grid, "
                          f"got {regions}")
        return Linear(self.config.width, regions * regions * self.config.codebook_size)

    def set_t2i_future(self, regions: int) -> None:
        """Add the future-codes head (``t2i_future_regions``) before training; a no-op if it exists."""
        c = self.config
        if c.t2i_future_regions == regions:
            return
        if c.t2i_future_regions:
            raise MMError(f"the model was trained with t2i future regions {c.t2i_future_regions}, not {regions}")
        head = self._future_head(regions).to(self.t2i_head.weight.device)
        self._init_weights(head)
        self.t2i_future_head, c.t2i_future_regions = head, regions

    def code_logits(self, h: Tensor) -> Tensor:
        logits = self.t2i_head(h)  # (..., K)
        return logits - self.t2i_log_weight.to(logits.dtype) if self.config.t2i_code_weights else logits

    def plan_logits(self, h: Tensor) -> Tensor:
        if self.t2i_plan_head is None:
            raise MMError("this model has no T2I plan (model.t2i_plan is 0)")
        logits = self.t2i_plan_head(h)  # (..., PLAN_VOCAB)
        return logits - self.t2i_plan_log_weight.to(logits.dtype) if self.config.t2i_plan_weights else logits

    def t2i_plan_tokens(self, images: Tensor) -> Tensor | None:
        """images (B, C, H, W) in [-1, 1] -> the plan the model is taught, (B, t, t) for one side t, (B, P)
        for a list of sides; None without a plan."""
        return plan_tokens(images, self.config.t2i_plan) if self.code_embed.plan else None

    def t2i_logits(self, codes: Tensor, text_states: Tensor | None, text_mask: Tensor | None,
                   plan: Tensor | None = None) -> Tensor:
        """codes (B, h, w) -> (B, h*w, K); row n is conditioned on the text, the plan (t2i_plan_tokens) of a
        model with ``t2i_plan`` and codes 0..n-1 (raster order)."""
        n = codes.shape[1] * codes.shape[2]
        return self.code_logits(self.t2i_states(codes, text_states, text_mask, plan)[:, -n:])

    def t2i_states(self, codes: Tensor, text_states: Tensor | None, text_mask: Tensor | None,
                   plan: Tensor | None = None) -> Tensor:
        """codes (B, h, w) -> (B, P+N, D): the backbone states that predict each plan token (P = t*t with
        ``t2i_plan`` = t, the sum over sides for a list, else 0; ``plan`` from t2i_plan_tokens) and each
        code (teacher forcing)."""
        ids = self.code_embed.inputs(codes, plan)  # (B, P+N): start + plan + codes[:-1]
        x, rope, qpos = self.code_embed(ids, torch.arange(ids.shape[1], device=ids.device))
        if text_states is None:
            text_states, text_mask = self.null_context(ids.shape[0])
        return self.backbone(x, rope, text_states, text_mask, causal=True, query_pos=qpos)  # (B, P+N, D)

    def t2i_prefill(self, text_states: Tensor | None, text_mask: Tensor | None, batch: int | None = None,
                    cache: str = "static") -> tuple[Tensor, DecodeState]:
        """Feed the start token with the text (None = null context); return (B, K) logits for code 0
        (a model with ``t2i_plan``: (B, PLAN_VOCAB) logits for plan token 0)."""
        if text_states is None:
            if batch is None:
                raise ValueError("t2i_prefill without text needs batch=")
            text_states, text_mask = self.null_context(batch)
        b, dev = text_states.shape[0], text_states.device
        c = self.config
        n = c.code_grid[0] * c.code_grid[1] + self.code_embed.plan_len
        caches = make_caches(c.depth, cache, b, c.heads, n, c.width // c.heads, dev, self._cache_dtype(dev))
        start = torch.full((b, 1), self.code_embed.start_id, dtype=torch.long, device=dev)
        x, rope, qpos = self.code_embed(start, torch.arange(1, device=dev))
        h = self.backbone(x, rope, text_states, text_mask, causal=True, caches=caches, query_pos=qpos)
        head = self.plan_logits if self.code_embed.plan else self.code_logits
        return head(h[:, -1]), DecodeState(caches, text_mask)

    def t2i_step(self, codes: Tensor, state: DecodeState, plan: bool = False) -> Tensor:
        """codes (B,) just sampled (ids as fed: plan tokens through ``code_embed.plan_id``) -> (B, K)
        logits for the next code, or (B, PLAN_VOCAB) for the next plan token with ``plan``
        (cross-attention K/V are cached)."""
        ids = codes.view(-1, 1)
        pos = state.caches[0].self_attn.next_position() + torch.arange(1, device=ids.device)  # (1,)
        x, rope, qpos = self.code_embed(ids, pos)
        h = self.backbone(x, rope, None, state.context_mask, causal=True, caches=state.caches, query_pos=qpos)
        return self.plan_logits(h[:, -1]) if plan else self.code_logits(h[:, -1])

    def t2i_extend(self, codes: Tensor, state: DecodeState) -> Tensor:
        """codes (B, t) fed after the cached ones -> (B, t, K); row j predicts the code after codes[:, j].

        Speculative decoding feeds a window of draft codes this way, then rolls back with t2i_truncate.
        """
        pos = state.caches[0].self_attn.next_position() + torch.arange(codes.shape[1], device=codes.device)  # (t,)
        x, rope, qpos = self.code_embed(codes, pos)
        h = self.backbone(x, rope, None, state.context_mask, causal=True, caches=state.caches,
                          query_pos=qpos)  # (B, t, D)
        return self.code_logits(h)

    @staticmethod
    def t2i_truncate(state: DecodeState, length: int) -> None:
        """Roll every self-attention cache back to its first ``length`` tokens (the start token is 0)."""
        for c in state.caches:
            c.self_attn.truncate(length)

    # ---- saving / loading ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors into ``directory`` (created if needed)."""
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        save_model(self, str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MMModel:
        """Rebuild the model from config.json and load model.safetensors exactly (strict)."""
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise MMError(f"{d} is not a saved mm model (needs config.json and model.safetensors); "
                          "pass the folder written by save_pretrained, e.g. RUN/final")
        config = MMConfig.from_dict(json.loads((d / "config.json").read_text()))
        model = cls(config)
        load_model(model, str(d / "model.safetensors"), strict=True, device=str(device))
        return model.to(device).eval()
