"""The shared image backbone and its two ways in: continuous patches and VQ codes.

    images (B, C, H, W) ─► PatchEmbed ─┐                       (understanding: bidirectional)
                                       ├─► SharedBackbone ─► (B, N, D)
    codes  (B, h, w)    ─► CodeEmbed  ─┘                       (generation: causal, raster order)

Each backbone block is self-attention → cross-attention to the text states → MLP (mm.nn.Block).
Image tokens get 2D positions: 2D RoPE over their grid (default), a learned table per grid
cell, or both (see GridPositions); with ``cross_pos`` the learned table (unit-normalised) is also
added to every block's cross-attention queries, as DETR adds its query positions at every layer.
Patches and codes may have different grids (e.g. 4-px patches vs. 8× downsampled codes), so each
embedding owns the positions of its grid and returns them with the tokens.

Generation input is [start] + codes[:-1] in raster order; input token n predicts code n, and it
carries the position of cell n (the cell being predicted), so the start token sits at (0, 0).
With a plan (``t2i_plan``), t×t plan tokens (each block's mean colour) come first: [start] + plan +
codes[:-1], each plan token at the middle cell of its block. A coarse-to-fine plan (sides t1 < t2 …)
draws the t1×t1 thumbnail, then the t2×t2 one, then the codes.

The learned *null context* is a few text-like states in the backbone width. The backbone sees it
instead of real text for ITC's unimodal image embedding, for captioning, and for the
unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.errors import MMError
from mm.nn.layers import Block, make_norm
from mm.nn.linear import Linear
from mm.nn.position import LearnedPositions, RoPE2D

IMAGE_POSITIONS = ("rope2d", "learned", "both")


class GridPositions(nn.Module):
    """Positions of an h×w token grid, by flat index: 2D RoPE tables (``rope2d``), an additive
    learned table (``learned``) or both (``both``).

    RoPE alone gives attention relative offsets only; absolute cells reach bidirectional patch
    states through the grid's edges (causal generation also has the start token at (0, 0)).
    ``both`` adds the absolute table and keeps RoPE's relative bias in attention.

    ``cross``: forward also gives each token's row of the table, normalised to unit scale
    (the scale of the normed states it is added to), for the cross-attention queries. Why: a word
    like "top left" must meet the tokens of that cell in cross-attention, a query-key match between
    position and word; from the input embedding alone the position fades with depth. Measured
    (scripts/t2i_position_synthetic.py, BENCHMARKS.md session 13): the cell probe on unseen renders
    reaches 92 % at 800 steps with query positions against 25 % without.
    """

    def __init__(self, kind: str, dim: int, heads: int, height: int, width: int, cross: bool = False):
        super().__init__()
        if kind not in IMAGE_POSITIONS:
            raise MMError(f"image positions must be one of {', '.join(IMAGE_POSITIONS)}, got {kind!r}")
        if cross and kind == "rope2d":
            raise MMError("cross-attention query positions (cross_pos) need a learned table: "
                          "set image_pos to learned or both")
        self.kind, self.cross = kind, cross
        if kind in ("rope2d", "both"):
            self.rope = RoPE2D(dim // heads, height, width)
        if kind in ("learned", "both"):
            self.table = LearnedPositions(height * width, dim)

    def forward(self, x: Tensor, positions: Tensor
                ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
        """x (B, T, D), positions (T,) flat grid indices -> (x [+ learned], rope tables or None,
        unit-scale query positions (T, D) for cross-attention, or None without ``cross``)."""
        query = None
        if self.kind != "rope2d":
            table = self.table(positions)  # (T, D)
            x = x + table
            if self.cross:
                query = F.layer_norm(table, table.shape[-1:])
        rope = self.rope.full(positions) if self.kind != "learned" else None  # full-width (T, d) tables
        return x, rope, query


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> (B, N, D) tokens, by one of two stems.

    ``linear``: each patch flattened and linearly projected (ViT). ``conv``: log2(p) 3×3 stride-2
    convolutions with GELU, then a 1×1 projection (Xiao et al. 2021, "Early convolutions help
    transformers see better"): the same token grid, but each token has seen a 3×3 neighbourhood at
    every scale, so a shape that straddles two patches or fills a quarter of one still has an edge
    and corner detector in front of it. Costs ~1.5 M multiply-adds per 32-px image at p = 8.
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, dim: int, heads: int, pos: str,
                 stem: str = "linear", cross_pos: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise MMError(f"image size {image_size} is not divisible by patch size {patch_size}; "
                          "choose model.patch_size dividing data.image_size")
        if stem not in ("linear", "conv"):
            raise MMError(f"model patch_stem must be 'linear' or 'conv', got {stem!r}")
        if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
            raise MMError(f"the conv patch stem needs a power-of-two patch size >= 2, got {patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = image_size // patch_size
        if stem == "linear":
            self.proj = Linear(channels * patch_size * patch_size, dim)
        else:
            layers, c_in = [], channels
            for i in range(patch_size.bit_length() - 1):  # each halves the resolution
                c_out = max(dim // 2 ** (patch_size.bit_length() - 2 - i), 16)  # ..., D/4, D/2, D
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
                c_in = c_out
            self.stem = nn.Sequential(*layers, nn.Conv2d(c_in, dim, 1))
        self.pos = GridPositions(pos, dim, heads, self.grid, self.grid, cross_pos)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
        """images (B, C, H, W) -> (tokens (B, N, D), RoPE tables or None, query positions (N, D) or None)."""
        b, c, h, w = images.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise MMError(f"images have shape {tuple(images.shape)}; this model expects "
                          f"(B, {self.channels}, {self.image_size}, {self.image_size})")
        p, g = self.patch_size, self.grid
        if hasattr(self, "stem"):
            x = self.stem(images).flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, N, D), row-major
        else:
            x = images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
            x = self.proj(x.reshape(b, g * g, c * p * p))  # (B, N, D), row-major patches
        return self.pos(x, torch.arange(g * g, device=x.device))


class CodeEmbed(nn.Module):
    """VQ code embeddings plus a learned start token (index K) for next-code prediction.

    With a plan (``plan`` = sides (t1, t2, …), each > 0, coarse to fine) the sequence is the t1×t1 plan
    tokens, then the t2×t2 ones …, then the h×w codes: each plan level is a colour thumbnail of the image
    (``plan_tokens``) and plan cell (r, c) carries the grid position of the middle code of the block it
    covers, so RoPE and the learned table place it where its codes will be. Level l's token v is fed as
    id K + 1 + l·PLAN_VOCAB + v: the ids say which thumbnail a token belongs to (a coarse and a fine cell
    can share a middle code); one plan head scores v at every level.
    """

    def __init__(self, codebook_size: int, grid: tuple[int, int], dim: int, heads: int, pos: str,
                 cross_pos: bool = False, plan: int | list[int] | tuple[int, ...] = 0):
        super().__init__()
        self.codebook_size, self.grid, self.plan = codebook_size, tuple(grid), plan_sides(plan)
        self.start_id = codebook_size
        self.plan_offset = codebook_size + 1  # level 0's token v is fed as id K + 1 + v
        self.emb = nn.Embedding(codebook_size + 1 + PLAN_VOCAB * len(self.plan), dim)
        self.pos = GridPositions(pos, dim, heads, *self.grid, cross_pos)
        self.register_buffer("seq_pos", sequence_positions(self.grid, self.plan), persistent=False)  # (P+N,)
        level = torch.cat([torch.full((t * t,), i) for i, t in enumerate(self.plan)]) if self.plan else torch.zeros(0)
        # (P,) the id offset of each plan position: K + 1 + its level · PLAN_VOCAB
        self.register_buffer("plan_ids", (self.plan_offset + level * PLAN_VOCAB).long(), persistent=False)

    @property
    def plan_len(self) -> int:
        return sum(t * t for t in self.plan)

    def plan_id(self, tokens: Tensor, index: int) -> Tensor:
        """Plan tokens (B,) drawn for plan position ``index`` -> the ids fed back (level offset added)."""
        return tokens + self.plan_ids[index]

    def inputs(self, codes: Tensor, plan: Tensor | None = None) -> Tensor:
        """codes (B, h, w) [, plan (B, P) from plan_tokens] -> teacher-forcing inputs (B, P+N): start token +
        plan + codes[:-1]."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise MMError(f"codes have shape {tuple(codes.shape)}; this model expects (B, {self.grid[0]}, "
                          f"{self.grid[1]}) from a VQ tokenizer with the same grid")
        if (plan is None) != (not self.plan):
            raise MMError(f"this model draws a colour plan ({describe_plan(self.plan)}) before the codes: pass "
                          "plan=plan_tokens(images, sides)" if self.plan else "this model has no plan; pass plan=None")
        flat = codes.flatten(1)  # (B, N)
        start = torch.full_like(flat[:, :1], self.start_id)
        if plan is None:
            return torch.cat([start, flat[:, :-1]], dim=1)
        plan = plan.flatten(1)  # (B, P)
        if plan.shape[1] != self.plan_len:
            raise MMError(f"the plan has {plan.shape[1]} tokens; this model's plan ({describe_plan(self.plan)}) "
                          f"has {self.plan_len}")
        return torch.cat([start, plan + self.plan_ids, flat[:, :-1]], dim=1)

    def forward(self, ids: Tensor, steps: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
        """ids (B, t) code, plan or start ids; steps (t,) their indices in the sequence (the element each
        predicts) -> (tokens (B, t, D), RoPE tables or None, query positions (t, D) or None)."""
        return self.pos(self.emb(ids), self.seq_pos[steps])


PLAN_LEVELS = 8  # plan tokens: each colour channel of a block's mean in 8 levels
PLAN_VOCAB = PLAN_LEVELS ** 3


def plan_sides(plan: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """model.t2i_plan -> the plan's sides, coarse to fine: 0 or [] = no plan, t = (t,), [3, 6] = (3, 6)."""
    sides = [plan] if isinstance(plan, int) and not isinstance(plan, bool) else plan
    if not isinstance(sides, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in sides):
        raise MMError(f"model t2i_plan must be an integer >= 0 or a list of sides, e.g. [3, 6]; got {plan!r}")
    sides = () if list(sides) == [0] else tuple(sides)
    if any(t <= 0 for t in sides) or any(a >= b for a, b in itertools.pairwise(sides)):
        raise MMError(f"model t2i_plan sides must be > 0 and increase (coarse to fine), e.g. [3, 6]; got {plan!r}")
    return sides


def describe_plan(sides: tuple[int, ...]) -> str:
    return ", then ".join(f"{t}x{t}" for t in sides)


def sequence_positions(grid: tuple[int, int], plan: int | tuple[int, ...]) -> Tensor:
    """Flat grid cell of each element of the T2I sequence (P+N,): plan cells level by level, then codes
    in raster order."""
    h, w = grid
    parts = []
    for t in plan_sides(plan):
        if h % t or w % t:
            raise MMError(f"a {t}x{t} plan must divide the {h}x{w} code grid; choose model.t2i_plan sides "
                          "dividing both")
        sh, sw = h // t, w // t
        r, c = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
        parts.append(((r * sh + sh // 2) * w + c * sw + sw // 2).flatten())  # (t*t,): each block's middle code
    return torch.cat([*parts, torch.arange(h * w)])


def plan_tokens(images: Tensor, plan: int | tuple[int, ...]) -> Tensor:
    """images (B, C, H, W) in [-1, 1] -> plan ids in [0, PLAN_VOCAB): each block's mean colour, PLAN_LEVELS
    levels per channel (grey images repeat their one channel). One side t gives (B, t, t); sides
    (t1, t2, …) give the thumbnails flattened and concatenated, (B, t1² + t2² + …). A thumbnail needs no
    training and says where something coloured is: what the T2I sequence decides first."""
    if not isinstance(plan, int):
        return torch.cat([plan_tokens(images, t).flatten(1) for t in plan_sides(plan)], dim=1)
    if images.shape[-1] % plan or images.shape[-2] % plan:
        raise MMError(f"a {plan}x{plan} plan must divide the image size {tuple(images.shape[-2:])}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = F.adaptive_avg_pool2d(x[:, :3], plan)  # (B, 3, t, t) in [-1, 1]
    level = ((mean + 1) * (PLAN_LEVELS / 2)).floor().clamp(0, PLAN_LEVELS - 1).long()
    return (level[:, 0] * PLAN_LEVELS + level[:, 1]) * PLAN_LEVELS + level[:, 2]  # (B, t, t)


class SharedBackbone(nn.Module):
    """N pre-norm blocks (self-attn → cross-attn to text → MLP) + final norm, and the null context."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, mlp: str, norm: str,
                 dropout: float, null_context_len: int, t2i_own: tuple[str, ...] = ()):
        super().__init__()
        self.dim, self.heads = dim, heads
        # t2i_own: the parts ("attn", "cross", "mlp") for which the causal (T2I code) stream uses
        # weights of its own (Block's second copies); the rest stays shared.
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, context_dim=dim, mlp=mlp, norm=norm,
                                           dropout=dropout, second=t2i_own) for _ in range(depth)])
        self.norm = make_norm(norm, dim)
        self.null_context = nn.Parameter(torch.randn(null_context_len, dim) * 0.02)
        self.grad_checkpointing = False

    def null(self, batch: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """The null context for a batch: states (B, L, D) and mask (B, L).

        With ``length`` larger than the null context, it is right-padded (mask False) so it can be
        concatenated with real text states of that length (CFG runs both branches in one batch).
        """
        n = self.null_context.shape[0]
        length = n if length is None else length
        if length < n:
            raise ValueError(f"null context has {n} states; cannot fit it into length {length}")
        states = self.null_context.unsqueeze(0).expand(batch, n, self.dim)  # (B, n, D)
        if length > n:
            states = torch.cat([states, states.new_zeros(batch, length - n, self.dim)], dim=1)  # (B, L, D)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=states.device)
        mask[:, :n] = True
        return states, mask

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, context: Tensor | None,
                context_mask: Tensor | None, causal: bool, caches=None, query_pos: Tensor | None = None) -> Tensor:
        """x (B, T, D) image tokens -> (B, T, D) normalised states. ``caches``: one BlockCache per block;
        ``query_pos`` (T, D): added to every cross-attention query (the embeddings' third output).
        ``causal`` marks the T2I code stream: it uses the blocks' second copies of the ``t2i_own`` parts."""
        # Decoding: every block's cache is at the same position, so the causal mask is built once.
        visible = caches[0].self_attn.visible(x.shape[1]) if caches is not None else None  # (T, Tk)
        for i, blk in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(blk, x, context, context_mask, None, causal, rope, None, None,
                                                      query_pos, causal, use_reentrant=False)
            else:
                x = blk(x, context, context_mask, causal=causal, rope=rope, cache=cache, visible=visible,
                        query_pos=query_pos, second=causal)
        return self.norm(x)
