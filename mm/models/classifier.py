"""ImageClassifier: the shared backbone over image patches (null text context) + a pooled head.

    images (B, C, H, W) ─► PatchEmbed ─► SharedBackbone (null context, bidirectional) ─► (B, N, D)
                                         ─► mean or max over patches (B, D) ─► LayerNorm ─► Linear ─► (B, K)

Only the image side of MMModel is kept (patch embedding and backbone, under the same attribute
names, so their state-dict keys are MMModel's): a pretrained MMModel folder gives its backbone
with ``load_backbone(dir)`` without building its text encoder or decoder. ``freeze_backbone()``
makes it a linear probe (only the head trains).

``save_pretrained(dir)`` writes config.json (``model_type: mm-classifier``, the architecture and
the class labels) + model.safetensors; ``ImageClassifier.from_pretrained(dir)`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mm.errors import MMError
from mm.models.backbone import PatchEmbed, SharedBackbone
from mm.nn.layers import POOLS, Pool
from mm.nn.linear import Linear

MODEL_TYPE = "mm-classifier"
# MMConfig fields that describe the image side; a pretrained MMModel's config.json gives them.
IMAGE_FIELDS = ("image_size", "channels", "patch_size", "width", "depth", "heads", "mlp_ratio", "mlp",
                "norm", "dropout", "image_pos", "null_context_len", "patch_stem", "cross_pos")


@dataclass
class ClassifierConfig:
    labels: list[str] = field(default_factory=list)  # class names; head output k is labels[k]
    target: str = "label"  # what the labels are (classify.target at training)
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    width: int = 192
    depth: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0
    mlp: str = "gelu"
    norm: str = "layernorm"
    dropout: float = 0.0
    image_pos: str = "rope2d"
    null_context_len: int = 1
    patch_stem: str = "linear"
    cross_pos: bool = False  # as MMConfig.cross_pos: positions on the cross-attention queries
    pool: str = "mean"  # mean | max | attn over the patch states (max finds one small object; mean counts)

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        data = {k: v for k, v in data.items() if k != "model_type"}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MMError(f"classifier config has unknown keys {unknown}; was it written by a newer mm?")
        return cls(**data)

    @classmethod
    def from_mm_config(cls, mm_config: dict, labels: list[str], target: str = "label") -> ClassifierConfig:
        """The image side of an MMModel config (a dict of MMConfig fields) with these labels."""
        fields = {k: mm_config[k] for k in IMAGE_FIELDS if k in mm_config}
        if mm_config.get("cross_pos_patches") is False:  # the model's patches had plain queries
            fields["cross_pos"] = False
        return cls(labels=list(labels), target=target, **fields)


class ImageClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        c = self.config = config
        if c.width % c.heads:
            raise MMError(f"model width {c.width} is not divisible by heads {c.heads}")
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.channels, c.width, c.heads, c.image_pos,
                                      c.patch_stem, c.cross_pos)
        self.backbone = SharedBackbone(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, mlp=c.mlp, norm=c.norm,
                                       dropout=c.dropout, null_context_len=c.null_context_len)
        if c.pool not in POOLS:
            raise MMError(f"classifier pool must be one of {', '.join(POOLS)}, got {c.pool!r}")
        self.pool = Pool(c.pool, c.width, c.heads)
        self.head = self._head(max(1, len(c.labels)))
        # Linear layers keep PyTorch's default init (std ~ 1/sqrt(3·fan_in)), not MMModel's 0.02:
        # at these widths a scratch classifier with the 0.02 init stayed at chance on shapes for
        # 400 steps (shape and count) while the default init learned from the start.

    def _head(self, classes: int) -> nn.Module:
        # LayerNorm first: pooled features of a pretrained backbone have no fixed scale, and a
        # linear probe on raw features trains badly with one learning rate for all of them.
        return nn.Sequential(nn.LayerNorm(self.config.width), Linear(self.config.width, classes))

    def set_labels(self, labels: list[str]) -> None:
        """A fresh head for these classes (the backbone is kept)."""
        if not labels:
            raise MMError("a classifier needs at least one class label")
        self.config.labels = list(labels)
        self.head = self._head(len(labels)).to(self.backbone.null_context.device)

    def freeze_backbone(self) -> None:
        """Linear probe: only the head keeps gradients."""
        for p in [*self.patch_embed.parameters(), *self.backbone.parameters()]:
            p.requires_grad_(False)

    def features(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B, D): the backbone states without text, pooled over patches."""
        x, rope, qpos = self.patch_embed(images)  # (B, N, D)
        context, mask = self.backbone.null(x.shape[0])  # (B, L, D), (B, L): the null text context
        states = self.backbone(x, rope, context, mask, causal=False, query_pos=qpos)  # (B, N, D)
        return self.pool(states)  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, K)

    # ---- loading / saving ----------------------------------------------------------------------

    def load_backbone(self, directory: str | Path) -> None:
        """Copy the patch embedding and backbone weights of a saved MMModel (or classifier) folder."""
        from safetensors import safe_open

        path = Path(directory) / "model.safetensors"
        want = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        with safe_open(str(path), framework="pt") as f:
            missing = sorted(set(want) - set(f.keys()))
            if missing:
                raise MMError(f"{directory} has no image backbone weights ({missing[0]} missing); "
                              "pass RUN/final of a pretraining run")
            state = {k: f.get_tensor(k) for k in want}
        for k, v in state.items():
            if v.shape != want[k].shape:
                raise MMError(f"{directory}: weight {k} has shape {tuple(v.shape)}, this model "
                              f"{tuple(want[k].shape)}; build the classifier from that folder's config.json")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)}
        (d / "config.json").write_text(json.dumps(config, indent=2))
        save_model(self, str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise MMError(f"{d} is not a saved mm classifier (needs config.json and model.safetensors); "
                          "pass RUN/final of `mm train configs/classify/shapes.yaml`")
        data = json.loads((d / "config.json").read_text())
        if data.get("model_type") != MODEL_TYPE:
            raise MMError(f"{d} holds an mm model but not a classifier; train one with "
                          "`mm train configs/classify/shapes.yaml` and pass its RUN/final")
        model = cls(ClassifierConfig.from_dict(data))
        load_model(model, str(d / "model.safetensors"), strict=True, device=str(device))
        return model.to(device).eval()
