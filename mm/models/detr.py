"""DETR-style object detection on the shared backbone: learned anchor queries, a small decoder, set outputs.

    images (B, 3, H, W) ──► MMModel.image_states (null text context) ──► memory (B, Li, D)
                                                                          + sine position of each patch
    Q learned queries: content (Q, D) + anchor box (Q, 4) ──► L decoder layers, each:
        self-attention among queries → cross-attention to the memory → MLP   (pre-norm, residual)
        query position = MLP(sine(anchor)), added to the attention inputs
        box head: Δ in logit space, anchor ← sigmoid(logit(anchor) + Δ)      (iterative refinement)
        class head: (C + 1) logits, the last is "no object"
    -> per layer: logits (B, Q, C+1), boxes (B, Q, 4) cxcywh in [0, 1]; the last layer is the
       prediction, the others feed the auxiliary losses.

Why anchors: plain DETR's learned queries carry no spatial prior, so early in training every
query competes for every object and Hungarian matching flips between them; DETR needs hundreds
of epochs. Here each query owns a learned reference box (DAB-DETR, Liu et al. 2022), initialised
on a grid over the image, and every decoder layer only refines it (Deformable DETR's iterative
box refinement, with the refined box detached between layers). A query's position embedding is
computed from its current box, so cross-attention looks where the box is. Queries thus start
spatially spread and matching is stable from the first steps.

Deviations from the papers, kept for simplicity: the query position is added to the input of
the fused-QKV attention (so it also reaches the values), and the patch positions are added to
the memory once (keys and values), not to the keys only; the backbone has relative (RoPE)
positions, so the values then carry where a patch is, which box regression can use.

Exported folder = the MMModel folder (config.json + model.safetensors, loadable as MMModel) plus
detr.json (DETRConfig) and detr.safetensors (the detection head).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mm.errors import MMError
from mm.models.model import MMModel
from mm.nn.attention import Attention
from mm.nn.layers import MLP, make_norm
from mm.nn.linear import Linear

CONFIG_FILE = "detr.json"
WEIGHTS_FILE = "detr.safetensors"


@dataclass
class DETRConfig:
    """The detection head; saved as detr.json beside the backbone's config.json."""

    class_names: list[str] = field(default_factory=list)  # class index -> name; no-object is extra
    num_queries: int = 16
    depth: int = 3  # decoder layers (each gives an auxiliary output)
    heads: int = 0  # 0 = the backbone's
    mlp_ratio: float = 4.0
    anchor_size: float = 0.2  # initial anchor w, h (fraction of the image)
    dropout: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_dict(cls, data: dict) -> DETRConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MMError(f"detection config has unknown keys {unknown}; was it written by a newer mm?")
        return cls(**data)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_embed(coords: Tensor, dim: int) -> Tensor:
    """coords (.., k) in [0, 1] -> (.., k*dim) sin/cos features, dim/2 frequencies per coordinate.

    Frequencies go from π to 64π (periods 2 down to 1/32 of the image), so the embedding tells
    apart positions a fraction of a pixel apart at 32 px.
    """
    n = dim // 2
    freqs = math.pi * 2.0 ** torch.linspace(0, 6, n, device=coords.device, dtype=coords.dtype)  # (n,)
    ang = coords[..., None] * freqs  # (.., k, n)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)  # (.., k*2n)


def grid_anchors(n: int, size: float) -> Tensor:
    """(n, 4) cxcywh anchors: centres on the smallest square grid with >= n cells, row by row."""
    g = math.ceil(math.sqrt(n))
    idx = torch.arange(n)
    cx = (idx % g + 0.5) / g
    cy = (idx // g + 0.5) / g
    wh = torch.full((n,), size)
    return torch.stack([cx, cy, wh, wh], dim=-1)


@dataclass
class Denoising:
    """DN-DETR's denoising queries for one batch: G noised copies of each image's M (padded) targets.

    content (B, G*M, D) label embeddings of the noised labels, boxes (B, G*M, 4) noised cxcywh
    anchors, labels/targets (B, G*M) / (B, G*M, 4) what each should reconstruct, valid (B, G*M)
    real (not padding) slots, mask (B, Q+G*M, Q+G*M) the self-attention mask (True = attend).
    """

    content: Tensor
    boxes: Tensor
    labels: Tensor
    targets: Tensor
    valid: Tensor
    mask: Tensor


class DecoderLayer(nn.Module):
    """Pre-norm: x += SelfAttn(norm(x) + pos); x += CrossAttn(norm(x) + pos, memory); x += MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = make_norm("layernorm", dim), make_norm("layernorm", dim), \
            make_norm("layernorm", dim)
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.cross_attn = Attention(dim, heads, context_dim=dim, dropout=dropout)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: Tensor, pos: Tensor, memory: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x) + pos, attn_mask=attn_mask)  # (B, Q, D)
        x = x + self.cross_attn(self.norm2(x) + pos, memory)  # (B, Q, D)
        return x + self.mlp(self.norm3(x))


class DETRHead(nn.Module):
    """Queries, decoder, class and box heads over backbone states (B, Li, D) of a g×g patch grid."""

    def __init__(self, cfg: DETRConfig, width: int, backbone_heads: int, grid: int):
        super().__init__()
        if cfg.num_classes < 1:
            raise MMError("a detector needs at least one class name")
        if cfg.num_queries < 1 or cfg.depth < 1:
            raise MMError(f"detect.num_queries and detect.depth must be >= 1, got {cfg.num_queries}, {cfg.depth}")
        heads = cfg.heads or backbone_heads
        if width % heads or width % 8:
            raise MMError(f"detector width {width} must be divisible by 8 and by its {heads} heads")
        self.cfg, self.width, self.grid = cfg, width, grid
        self.content = nn.Parameter(torch.randn(cfg.num_queries, width) * 0.02)  # (Q, D)
        a = grid_anchors(cfg.num_queries, cfg.anchor_size)
        self.anchors = nn.Parameter(inverse_sigmoid(a))  # (Q, 4) in logit space: learned anchor boxes
        self.memory_pos = Linear(width, width)  # sine(cx, cy) of each patch -> D
        self.memory_norm = make_norm("layernorm", width)
        self.label_embed = nn.Embedding(cfg.num_classes, width)  # content of denoising queries
        self.query_pos = nn.Sequential(Linear(2 * width, width), nn.GELU(), Linear(width, width))
        self.layers = nn.ModuleList([DecoderLayer(width, heads, cfg.mlp_ratio, cfg.dropout)
                                     for _ in range(cfg.depth)])
        self.norm = make_norm("layernorm", width)
        self.class_head = Linear(width, cfg.num_classes + 1)
        self.box_head = nn.Sequential(Linear(width, width), nn.GELU(), Linear(width, width), nn.GELU(),
                                      Linear(width, 4))
        nn.init.zeros_(self.box_head[-1].weight)  # start as the anchors: refinement begins at zero
        nn.init.zeros_(self.box_head[-1].bias)
        centres = (torch.arange(grid) + 0.5) / grid
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("patch_xy", torch.stack([cx.flatten(), cy.flatten()], -1), persistent=False)  # (Li, 2)

    def denoising(self, targets: list[dict], groups: int, box_noise: float, label_noise: float) -> Denoising | None:
        """Noised copies of the targets (DN-DETR, Li et al. 2022), or None if no image has a target.

        Each group holds every target once: its centre moved by up to ``box_noise``·(w/2, h/2), its
        size scaled by 1 ± ``box_noise``, its label replaced by a random one with probability
        ``label_noise``. The decoder learns to recover the true box and class from a nearby
        anchor, which plain DETR only learns after Hungarian matching has settled.
        """
        m = max((len(t["labels"]) for t in targets), default=0)
        if m == 0 or groups < 1:
            return None
        b, q, dev = len(targets), self.cfg.num_queries, self.anchors.device
        labels = torch.zeros(b, m, dtype=torch.long, device=dev)
        boxes = torch.full((b, m, 4), 0.5, device=dev)
        valid = torch.zeros(b, m, dtype=torch.bool, device=dev)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            labels[i, :n], boxes[i, :n], valid[i, :n] = t["labels"].to(dev), t["boxes"].to(dev), True
        labels, boxes, valid = labels.repeat(1, groups), boxes.repeat(1, groups, 1), valid.repeat(1, groups)
        flip = torch.rand(labels.shape, device=dev) < label_noise
        noisy_labels = torch.where(flip, torch.randint_like(labels, self.cfg.num_classes), labels)
        shift = (torch.rand_like(boxes) * 2 - 1) * box_noise  # (B, G*M, 4) in [-noise, noise]
        noisy = boxes.clone()
        noisy[..., :2] = boxes[..., :2] + shift[..., :2] * boxes[..., 2:] / 2
        noisy[..., 2:] = boxes[..., 2:] * (1 + shift[..., 2:])
        noisy = noisy.clamp(1e-3, 1 - 1e-3)
        # Matching queries never see denoising ones (they would read the answers); each denoising
        # group sees itself and the matching queries; padding slots are no key for anyone.
        t = q + groups * m
        group = torch.cat([torch.full((q,), -1), torch.arange(groups * m) // m]).to(dev)  # (T,)
        allow = (group[:, None] == group[None, :]) | ((group[:, None] >= 0) & (group[None, :] < 0))  # (T, T)
        keys = torch.cat([torch.ones(b, q, dtype=torch.bool, device=dev), valid], 1)  # (B, T)
        mask = allow[None] & keys[:, None, :] | torch.eye(t, dtype=torch.bool, device=dev)[None]  # (B, T, T)
        return Denoising(self.label_embed(noisy_labels), noisy, labels, boxes, valid, mask)

    def forward(self, states: Tensor, dn: Denoising | None = None) -> tuple[list, list]:
        """states (B, Li, D) -> (per decoder layer (logits (B, Q, C+1), boxes (B, Q, 4) cxcywh),
        the same for the denoising queries, [] without ``dn``)."""
        b, q = states.shape[0], self.cfg.num_queries
        if states.shape[1] != self.grid * self.grid:
            raise ValueError(f"detector expects {self.grid * self.grid} image states, got {states.shape[1]}")
        pos = self.memory_pos(sine_embed(self.patch_xy.to(states.dtype), self.width // 2))  # (Li, D)
        memory = self.memory_norm(states) + pos  # (B, Li, D)
        x = self.content.unsqueeze(0).expand(b, -1, -1)  # (B, Q, D)
        ref = self.anchors.sigmoid().unsqueeze(0).expand(b, -1, -1)  # (B, Q, 4) cxcywh
        mask = None
        if dn is not None:
            x = torch.cat([x, dn.content.to(x.dtype)], 1)  # (B, T, D), T = Q + G*M
            ref = torch.cat([ref, dn.boxes.to(ref.dtype)], 1)  # (B, T, 4)
            mask = dn.mask
        outputs, dn_outputs = [], []
        for layer in self.layers:
            qpos = self.query_pos(sine_embed(ref, self.width // 2))  # (B, T, 4 * D/2) -> (B, T, D)
            x = layer(x, qpos, memory, mask)
            h = self.norm(x)
            boxes = (inverse_sigmoid(ref) + self.box_head(h).float()).sigmoid()  # (B, T, 4)
            logits = self.class_head(h).float()  # (B, T, C+1)
            outputs.append((logits[:, :q], boxes[:, :q]))
            if dn is not None:
                dn_outputs.append((logits[:, q:], boxes[:, q:]))
            ref = boxes.detach()  # Deformable DETR: each layer's box loss trains that layer only
        return outputs, dn_outputs


class Detector(nn.Module):
    """The shared backbone (an MMModel) plus a DETRHead.

    ``detector(images)`` -> list over decoder layers of (logits, boxes); ``detector.detect(images)``
    -> per image {"boxes" (Q, 4) xyxy pixels, "scores" (Q,), "labels" (Q,)}, best first.
    """

    def __init__(self, mm: MMModel, cfg: DETRConfig):
        super().__init__()
        self.mm, self.cfg = mm, cfg
        c = mm.config
        self.head = DETRHead(cfg, c.width, c.heads, c.image_size // c.patch_size)

    @property
    def class_names(self) -> list[str]:
        return self.cfg.class_names

    @property
    def image_size(self) -> int:
        return self.mm.config.image_size

    def forward(self, images: Tensor, dn: Denoising | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per decoder layer (logits, boxes) of the Q queries; with ``dn`` (training) a pair
        (those, the denoising queries' outputs)."""
        outputs, dn_outputs = self.head(self.mm.image_states(images), dn)  # null text context: vision only
        return (outputs, dn_outputs) if dn is not None else outputs

    @torch.no_grad()
    def detect(self, images: Tensor, min_score: float = 0.0) -> list[dict]:
        """Per image: every query's best real class, its probability, the box in pixels of the
        model's input (x1 exclusive); sorted by score, those below ``min_score`` dropped."""
        logits, boxes = self(images)[-1]
        probs = logits.softmax(-1)[..., :-1]  # (B, Q, C): no-object left out
        scores, labels = probs.max(-1)  # (B, Q)
        from_unit = float(self.image_size)
        out = []
        for s, lab, bx in zip(scores, labels, boxes):
            cx, cy, w, h = bx.unbind(-1)
            xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1) * from_unit
            order = s.argsort(descending=True)
            keep = order[s[order] >= min_score]
            out.append({"boxes": xyxy[keep].cpu(), "scores": s[keep].cpu(), "labels": lab[keep].cpu()})
        return out

    # ---- saving / loading ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        d = Path(directory)
        self.mm.save_pretrained(d)
        (d / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        save_model(self.head, str(d / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Detector:
        """The detector of an exported folder (or of a finished run folder's ``final/``), in eval mode."""
        from safetensors.torch import load_model

        d = Path(directory).expanduser()
        if not (d / CONFIG_FILE).is_file() and (d / "final" / CONFIG_FILE).is_file():
            d = d / "final"
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise MMError(f"{directory} is not an exported detector (no {CONFIG_FILE} / {WEIGHTS_FILE}); pass "
                          "RUN/final of `mm train configs/detect/shapes.yaml`")
        try:
            cfg = DETRConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
        except (ValueError, TypeError) as e:
            raise MMError(f"{d / CONFIG_FILE} is not a valid detection config ({e})") from None
        det = cls(MMModel.from_pretrained(d, device=device), cfg)
        load_model(det.head, str(d / WEIGHTS_FILE), device=str(device))
        return det.to(device).eval()
