"""DETR object detection as an `mm train` stage: targets from shard metadata, set loss, COCO mAP, export.

Targets come from each sample's json ``objects[]``: ``bbox`` [x0, y0, x1, y1] in pixels of the
stored image (shapes shards, or COCO files through ``mm data ingest``) and the class by
``detect.label``: ``shape`` (circle/square/triangle/diamond), ``shape_color`` ("red circle", …)
or ``category`` (the ``category`` field; class list from ``categories.json`` beside the first
training source, else ``detect.classes``). Boxes follow the pipeline's centred square crop and
are normalised to cxcywh in [0, 1]. A bad box (malformed, negative, empty, outside the image,
unknown class) is skipped and counted (``boxes_skipped`` in the metrics); the first of each
reason prints one warning line.

Loss (DETR, Carion et al. 2020), for the last decoder layer and, with ``detect.aux_loss``, every
earlier one, each matched on its own predictions:

    match: Hungarian assignment of queries to targets, cost = -w_c·p(class) + w_l1·L1 - w_g·GIoU
    loss  = w_c·CE(all queries; unmatched → no-object, weighted detect.no_object_weight)
          + w_l1·L1(matched boxes) + w_g·(1 - GIoU(matched boxes)), box terms / #targets in the batch

Against DETR's slow convergence: learned anchor boxes with iterative refinement in the model
(mm.models.detr, DAB-DETR/Deformable DETR) and DN-DETR denoising (``detect.dn_groups`` noised
copies of the targets as extra queries, each trained to restore its target with the same CE +
L1 + GIoU, no matching needed). Validation: COCO mAP@[.5:.95], mAP@.5 and per-class AP
(mm.eval.detection, which matches pycocotools exactly) in pixels of the model input.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mm.config import Config
from mm.errors import MMError
from mm.eval.detection import cxcywh_to_xyxy, detection_map, hungarian_match, match_cost, paired_giou
from mm.models.bundle import model_folder
from mm.models.detr import Detector, DETRConfig

LABELS = ("shape", "shape_color", "category")

# ---------------------------------------------------------------------------------------------
# Classes and targets


def class_names(cfg: Config) -> list[str]:
    """The detector's classes for ``detect.label`` (fixed for shapes; from the data for COCO)."""
    from mm.data.shapes import COLORS, SHAPES

    label = cfg.detect.label
    if cfg.detect.classes:
        return list(cfg.detect.classes)
    if label == "shape":
        return list(SHAPES)
    if label == "shape_color":
        return [f"{c} {s}" for c in COLORS for s in SHAPES]
    from mm.data.coco import read_categories
    from mm.data.shards import expand_shards

    urls = expand_shards(cfg.data.train[0]) if cfg.data.train else []
    names = read_categories(Path(urls[0]).parent) if urls and "://" not in urls[0] else None
    if not names:
        raise MMError("detect.label=category needs the class list: categories.json beside the training shards "
                      "(written by `mm data ingest` of a COCO file) or detect.classes=[a,b,...]")
    return names


def object_class(obj: dict, label: str) -> str | None:
    if label == "shape":
        return obj.get("shape")
    if label == "shape_color":
        return f"{obj.get('color')} {obj.get('shape')}" if obj.get("shape") else None
    return obj.get("category")


def frame_size(meta: dict) -> tuple[float, float] | None:
    """(width, height) of the image the boxes are in: boxes_size (ingest), image_size (shapes)."""
    for key in ("boxes_size",):
        if isinstance(meta.get(key), list) and len(meta[key]) == 2:
            return float(meta[key][0]), float(meta[key][1])
    if isinstance(meta.get("image_size"), (int, float)):
        return float(meta["image_size"]), float(meta["image_size"])
    if isinstance(meta.get("width"), (int, float)) and isinstance(meta.get("height"), (int, float)):
        return float(meta["width"]), float(meta["height"])
    return None


def sample_targets(meta: dict, index: dict[str, int], label: str, skipped: Counter) -> tuple[list, list]:
    """(labels, cxcywh boxes in [0, 1] of the centred square crop) of one sample; bad boxes counted."""
    from mm.data.coco import check_box
    from mm.data.transforms import crop_box

    objects = meta.get("objects") if isinstance(meta, dict) else None
    if not isinstance(objects, list):
        return [], []
    size = frame_size(meta)
    if size is None:
        skipped["box_no_image_size"] += len(objects)
        return [], []
    w, h = size
    cx0, cy0, cx1, _ = crop_box(round(w), round(h), False, 0)  # what load_image keeps
    side = cx1 - cx0
    labels, boxes = [], []
    for obj in objects:
        box, reason = check_box(obj.get("bbox") if isinstance(obj, dict) else None, w, h)
        name = object_class(obj, label) if reason is None else None
        if reason is None and name not in index:
            reason = "box_unknown_category"
        if reason is None:
            x0, y0, x1, y1 = [(v - o) / side for v, o in zip(box, (cx0, cy0, cx0, cy0))]
            x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                reason = "box_outside_crop"
        if reason:
            skipped[reason] += 1
            continue
        labels.append(index[name])
        boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
    return labels, boxes


# ---------------------------------------------------------------------------------------------
# The set loss


def set_loss(outputs: list, targets: list[dict], num_classes: int, w_class: float, w_l1: float, w_giou: float,
             no_object_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over decoder layers of CE + L1 + GIoU after Hungarian matching (see the module docstring).

    outputs: per layer (logits (B, Q, C+1), boxes (B, Q, 4) cxcywh); targets: per image
    {"labels" (N,), "boxes" (N, 4) cxcywh}.
    """
    b, q = outputs[-1][0].shape[:2]
    dev = outputs[-1][0].device
    sizes = [len(t["labels"]) for t in targets]
    tgt_labels = torch.cat([t["labels"] for t in targets]).to(dev)  # (T,)
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(dev)  # (T, 4)
    n_boxes = max(1, sum(sizes))
    weight = torch.ones(num_classes + 1, device=dev)
    weight[-1] = no_object_weight
    total, last = 0.0, {}
    for logits, boxes in outputs:
        with torch.no_grad():  # one cost matrix for the batch, split per image (as DETR)
            cost = match_cost(logits.flatten(0, 1).softmax(-1), boxes.flatten(0, 1), tgt_labels, tgt_boxes,
                              w_class, w_l1, w_giou).view(b, q, -1).cpu()  # (B, Q, T)
        qi, ti, cls = [], [], torch.full((b, q), num_classes, dtype=torch.long, device=dev)
        start = 0
        for i, c in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = hungarian_match(c[i])
            qi.append(torch.as_tensor(rows) + i * q)
            ti.append(torch.as_tensor(cols) + start)
            start += sizes[i]
        qi, ti = torch.cat(qi).to(dev), torch.cat(ti).to(dev)
        cls.view(-1)[qi] = tgt_labels[ti]
        ce = F.cross_entropy(logits.transpose(1, 2), cls, weight)
        pred = boxes.flatten(0, 1)[qi]  # (M, 4) matched predictions
        l1 = F.l1_loss(pred, tgt_boxes[ti], reduction="sum") / n_boxes
        giou = (1 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(tgt_boxes[ti]))).sum() / n_boxes
        total = total + w_class * ce + w_l1 * l1 + w_giou * giou
        last = {"loss_ce": float(ce.detach()), "loss_l1": float(l1.detach()), "loss_giou": float(giou.detach())}
    return total, last


def denoising_loss(dn_outputs: list, dn, w_class: float, w_l1: float, w_giou: float) -> tuple[torch.Tensor, float]:
    """CE + L1 + GIoU of every real denoising query against the target it is a noised copy of
    (no matching: the assignment is known), summed over decoder layers."""
    valid = dn.valid.flatten()  # (B*G*M,)
    labels, targets = dn.labels.flatten()[valid], dn.targets.flatten(0, 1)[valid]  # (V,), (V, 4)
    n = max(1, int(valid.sum()))
    total = 0.0
    for logits, boxes in dn_outputs:
        ce = F.cross_entropy(logits.flatten(0, 1)[valid], labels)
        pred = boxes.flatten(0, 1)[valid]
        l1 = F.l1_loss(pred, targets, reduction="sum") / n
        giou = (1 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(targets))).sum() / n
        total = total + w_class * ce + w_l1 * l1 + w_giou * giou
    return total, float(total.detach()) if torch.is_tensor(total) else 0.0


# ---------------------------------------------------------------------------------------------
# The task


def target_tensors(meta: dict, index: dict[str, int], label: str, skipped: Counter) -> dict:
    """sample_targets as the tensors the loss and mAP take: {"labels" (n,), "boxes" (n, 4) cxcywh}."""
    labels, boxes = sample_targets(meta, index, label, skipped)
    return {"labels": torch.tensor(labels, dtype=torch.long),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


def init_folder(path: str) -> Path | None:
    """The exported model folder of ``run.init_from`` (a model folder or a finished run), or None."""
    if not path:
        return None
    return model_folder(path, "point it at RUN/final of a pretraining (or detection) run, or leave it empty "
                              "to train from scratch")


class DetectTask:
    data_mode = "image"
    uses_text = False

    def __init__(self, cfg: Config):
        self.cfg, d = cfg, cfg.detect
        if d.label not in LABELS:
            raise MMError(f"detect.label is {d.label!r}; use one of {', '.join(LABELS)}")
        self.classes = class_names(cfg)
        self.index = {name: i for i, name in enumerate(self.classes)}
        head = DETRConfig(class_names=self.classes, num_queries=d.num_queries, depth=d.depth,
                          anchor_size=d.anchor_size, dropout=cfg.model.dropout)
        self.model = Detector(self._backbone(), head).train()
        if self.model.image_size != cfg.data.image_size:
            raise MMError(f"the backbone takes {self.model.image_size} px images; set data.image_size="
                          f"{self.model.image_size}")
        if cfg.train.grad_checkpointing:
            self.model.mm.set_grad_checkpointing(True)
        self.skipped: Counter = Counter()
        self._warned: set[str] = set()

    def _backbone(self):
        from mm.models.model import MMModel
        from mm.models.presets import model_from_config

        init = init_folder(self.cfg.run.init_from)
        if init is not None:
            return MMModel.from_pretrained(init)  # the pretrained backbone (a detection head there is not reused)
        m = self.cfg.model
        # From scratch: text parts are built (MMModel is one module) but never run; small sizes keep them cheap.
        return model_from_config(m, vocab_size=256, codebook_size=32, code_grid=[2, 2],
                                 image_size=self.cfg.data.image_size, text_max_len=8)

    # -- trainer hooks --------------------------------------------------------------------------

    def targets(self, batch: dict) -> list[dict]:
        out = []
        for key, meta in zip(batch["key"], batch["meta"]):
            before = sum(self.skipped.values())
            out.append(target_tensors(meta, self.index, self.cfg.detect.label, self.skipped))
            if sum(self.skipped.values()) > before:
                self._warn(key)
        return out

    def _warn(self, key: str) -> None:
        for reason in sorted(set(self.skipped) - self._warned):
            self._warned.add(reason)
            print(f"mm: warning: skipped a bad box ({reason}) in sample {key}; further ones are counted "
                  "as boxes_skipped in the metrics", file=sys.stderr, flush=True)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.cfg.detect
        targets = self.targets(batch)
        dn = self.model.head.denoising(targets, d.dn_groups, d.dn_box_noise, d.dn_label_noise)
        outputs = self.model(batch["image"], dn)
        outputs, dn_outputs = outputs if dn is not None else (outputs, [])
        if not d.aux_loss:
            outputs, dn_outputs = outputs[-1:], dn_outputs[-1:]
        loss, metrics = set_loss(outputs, targets, len(self.classes), d.class_weight, d.l1_weight,
                                 d.giou_weight, d.no_object_weight)
        if dn is not None:
            dn_loss, metrics["loss_dn"] = denoising_loss(dn_outputs, dn, d.class_weight, d.l1_weight, d.giou_weight)
            loss = loss + dn_loss
        metrics["boxes_skipped"] = float(sum(self.skipped.values()))
        return loss, metrics

    @torch.no_grad()
    def validate(self, batches) -> dict[str, float]:
        return evaluate_detector(self.model, batches, self.targets)

    def images(self, batch: dict, max_images: int = 8) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            dets = self.model.detect(batch["image"][:max_images], min_score=0.5)
        finally:
            self.model.train(was)
        return {"detections": draw_grid(to_pil(batch["image"][:max_images]), dets, self.classes)}

    def export(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)


@torch.no_grad()
def evaluate_detector(model: Detector, batches, targets_of) -> dict[str, float]:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75 and AP per class (``ap_NAME``) of ``model`` over image
    batches, boxes xyxy in pixels of the model input; ``targets_of(batch)`` gives each image's
    {"labels", "boxes" cxcywh in [0, 1]}. {} when there are no images."""
    size = float(model.image_size)
    targets, detections = [], []
    for batch in batches:
        for t in targets_of(batch):
            targets.append({"boxes": (cxcywh_to_xyxy(t["boxes"]) * size).numpy(), "labels": t["labels"].numpy()})
        detections += [{k: v.float().numpy() if k != "labels" else v.numpy() for k, v in det.items()}
                       for det in model.detect(batch["image"])]
    if not targets:
        return {}
    m = detection_map(targets, detections, len(model.class_names), model.class_names)
    out = {"map": m["map"], "map_50": m["map_50"], "map_75": m["map_75"], "images": float(m["images"])}
    for name, ap in m["ap_per_class"].items():
        out[f"ap_{name.replace(' ', '_').replace('/', '_')}"] = ap
    return out


# ---------------------------------------------------------------------------------------------
# Drawing and prediction on PIL images (`mm detect`, the demo report)


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


PALETTE = [(255, 255, 255), (255, 80, 80), (80, 255, 80), (80, 160, 255), (255, 220, 60), (255, 80, 255),
           (60, 230, 230), (255, 150, 40)]


def draw_boxes(image, det: dict, names: list[str], min_side: int = 256):
    """A copy of ``image`` (upscaled so its short side is at least ``min_side``) with labelled boxes;
    ``det`` boxes xyxy in the image's pixels."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, -(-min_side // min(image.size)))
    im = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw, font = ImageDraw.Draw(im), ImageFont.load_default()
    for box, score, label in zip(np.asarray(det["boxes"]).reshape(-1, 4), det["scores"], det["labels"]):
        color = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=2)
        text = f"{names[int(label)]} {float(score):.2f}"
        tw = draw.textlength(text, font=font)
        ty = y0 - 12 if y0 >= 12 else y1
        draw.rectangle([x0, ty, x0 + tw + 4, ty + 11], fill=(0, 0, 0))
        draw.text((x0 + 2, ty), text, fill=color, font=font)
    return im


def draw_grid(images: list, dets: list[dict], names: list[str], cols: int = 4, min_side: int = 192):
    from PIL import Image

    tiles = [draw_boxes(im, d, names, min_side) for im, d in zip(images, dets)]
    if not tiles:
        return Image.new("RGB", (min_side, min_side))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + 4) + 4), (255, 255, 255))
    for i, t in enumerate(tiles):
        grid.paste(t, (4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + 4)))
    return grid


def detect_images(detector: Detector, images: list, min_score: float = 0.5) -> list[list[dict]]:
    """One call per batch of PIL images -> per image [{"label", "score", "box" [x0, y0, x1, y1]}]
    best first, boxes in pixels of the original image (the model sees its centred square crop)."""
    from mm.data.transforms import crop_box
    from mm.generation.vqa import images_to_tensor

    dev = next(detector.parameters()).device
    x = images_to_tensor(images, detector.image_size).to(dev)
    out = []
    for im, det in zip(images, detector.detect(x, min_score)):
        x0, y0, x1, _ = crop_box(im.width, im.height, False, 0)
        s = (x1 - x0) / detector.image_size
        out.append([{"label": detector.class_names[int(lab)], "score": float(sc),
                     "box": [round(float(b[0]) * s + x0, 2), round(float(b[1]) * s + y0, 2),
                             round(float(b[2]) * s + x0, 2), round(float(b[3]) * s + y0, 2)]}
                    for b, sc, lab in zip(det["boxes"], det["scores"], det["labels"])])
    return out


def cli_detect(args: argparse.Namespace) -> int:
    """``mm detect --model DIR --image IMG [IMG …] --out BOXES.png [--min-score 0.5]``."""
    from mm.tasks.vqa import _open_image

    if not 0.0 <= args.min_score <= 1.0:
        raise MMError(f"--min-score must be in [0, 1], got {args.min_score}")
    images = [_open_image(p) for p in args.image]
    detector = Detector.from_pretrained(args.model)
    results = detect_images(detector, images, args.min_score)
    names = detector.class_names
    dets = []
    for path, found in zip(args.image, results):
        print(f"{path}: {len(found)} object(s)")
        for r in found:
            x0, y0, x1, y1 = r["box"]
            print(f"  {r['label']:<16} {r['score']:.3f}  [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]")
        dets.append({"boxes": np.array([r["box"] for r in found]).reshape(-1, 4),
                     "scores": [r["score"] for r in found], "labels": [names.index(r["label"]) for r in found]})
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise MMError(f"the folder of --out {out} does not exist; create it first")
    draw_grid(images, dets, names, cols=len(images)).save(out)
    print(f"boxes drawn in {out}")
    return 0
