"""Detection metrics and set matching: box conversions, (generalised) IoU, Hungarian matching, COCO mAP.

Boxes are ``xyxy`` ([x0, y0, x1, y1], x1 exclusive, the shapes convention), ``cxcywh``
(centre and size, what the DETR head predicts, normalised to [0, 1]) or ``xywh`` (COCO files).

    box_iou(a (N, 4), b (M, 4)) -> (N, M)            generalized_box_iou(a, b) -> (N, M)    (torch, xyxy)
    match_cost(probs, boxes, labels, targets)        -> (Q, N) the DETR matching cost
    hungarian_match(cost (Q, N)) -> (query index, target index) of a min-cost assignment (scipy)
    coco_map(gt, dt, num_classes) -> {"map", "map_50", "map_75", "ap_per_class", ...}
    coco_eval_files(ANN.json, RES.json) -> the same from COCO-format files

``coco_map`` reproduces pycocotools' ``COCOeval`` (bbox, area "all", maxDets 100) step for step:
IoU thresholds .50:.05:.95; per image and category the detections sorted by score (stable
mergesort), each matched greedily to the unmatched ground truth of highest IoU ≥ the threshold
(the last one on ties, as pycocotools); then per category over all images: precision made
monotone from the right and read at the 101 recall points 0, .01, …, 1 (``searchsorted`` left,
0 past the last recall). A category without ground truth is left out of the mean. IoU is
computed from ``xywh`` as pycocotools' C code does, so an exported results file scores
bit-for-bit the same (tests/eval/test_detection_metrics.py checks it against the library).
Not reproduced: crowd ("iscrowd") regions, ground truth outside the area range (mm's ingest
drops boxes of zero or negative area) and the small/medium/large area ranges. As in
pycocotools, an unmatched detection of negative area (w·h < 0) is ignored rather than counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mm.errors import MMError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100

# ---------------------------------------------------------------------------------------------
# Boxes (torch, differentiable)


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of broadcast xyxy boxes a (.., 4), b (.., 4)."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (hi - lo).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def _giou(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-12)
    lo = torch.minimum(a[..., :2], b[..., :2])  # the smallest box enclosing both
    hi = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (hi - lo).clamp(min=0)
    hull = (wh[..., 0] * wh[..., 1]).clamp(min=1e-12)
    return iou - (hull - union) / hull


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes a (N, 4) and b (M, 4) -> (N, M)."""
    inter, union = _inter_union(a[:, None], b[None])
    return inter / union.clamp(min=1e-12)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of xyxy boxes a (N, 4), b (M, 4) -> (N, M) in [-1, 1]:
    IoU minus the share of the enclosing box that neither box covers."""
    return _giou(a[:, None], b[None])


def paired_giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of matched pairs a[i], b[i] (N, 4) -> (N,): the loss needs only the diagonal."""
    return _giou(a, b)


# ---------------------------------------------------------------------------------------------
# Set matching


def match_cost(probs: Tensor, boxes: Tensor, labels: Tensor, targets: Tensor, w_class: float = 2.0,
               w_l1: float = 5.0, w_giou: float = 2.0) -> Tensor:
    """DETR's matching cost (Q, N) of queries to one image's targets.

    probs (Q, C+1) class probabilities, boxes (Q, 4) cxcywh, labels (N,), targets (N, 4) cxcywh.
    cost = -w_class·p(target class) + w_l1·L1(boxes) - w_giou·GIoU: the probability, not its log,
    as in DETR, so the class term stays on the scale of the box terms.
    """
    cost_class = -probs[:, labels]  # (Q, N)
    cost_l1 = torch.cdist(boxes, targets, p=1)  # (Q, N)
    cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))  # (Q, N)
    return w_class * cost_class + w_l1 * cost_l1 + w_giou * cost_giou


def hungarian_match(cost: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-cost one-to-one assignment of a (Q, N) cost matrix (Q >= N): (rows, cols), each (N,)."""
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().float().cpu().numpy() if torch.is_tensor(cost) else np.asarray(cost, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if not np.isfinite(c).all():
        raise ValueError("the matching cost has NaN or infinite entries (non-finite predicted boxes?)")
    rows, cols = linear_sum_assignment(c)
    return rows.astype(np.int64), cols.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# COCO mAP (numpy, float64)


def _iou_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(D, G) IoU from xywh boxes with pycocotools' arithmetic (maskApi.c bbIou), so ties and
    threshold edges come out the same."""
    if len(d) == 0 or len(g) == 0:
        return np.zeros((len(d), len(g)))
    d, g = d[:, None, :], g[None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _match_image(ious: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) bool each: which score-sorted detections match a ground truth at each IoU threshold,
    and which are ignored: unmatched ones whose area w·h is negative (pycocotools' area range)."""
    n_dt, n_gt = ious.shape
    hits = np.zeros((len(IOU_THRESHOLDS), n_dt), dtype=bool)
    for t, thr in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(n_gt, dtype=bool)
        for d in range(n_dt):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(n_gt):
                if not taken[g] and ious[d, g] >= best:  # >=: the last of equal IoUs wins
                    best, m = ious[d, g], g
            if m >= 0:
                taken[m], hits[t, d] = True, True
    outside = (areas < 0) | (areas > 1e10)  # area range "all" is [0, 1e10]
    return hits, ~hits & outside[None, :]


def _precision_at_recalls(hits: np.ndarray, ignored: np.ndarray, n_gt: int) -> np.ndarray:
    """hits, ignored (T, D) of score-sorted detections -> (T, 101) interpolated precision (COCO)."""
    tp = np.cumsum(hits, axis=1).astype(float)
    fp = np.cumsum(~hits & ~ignored, axis=1).astype(float)
    out = np.zeros((hits.shape[0], len(RECALL_POINTS)))
    for t in range(hits.shape[0]):
        rc = tp[t] / n_gt
        pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope, monotone from the right
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        ok = idx < len(pr)
        out[t, ok] = pr[idx[ok]]
    return out


def coco_map(gt: list[tuple], dt: list[tuple], num_classes: int, class_names: list[str] | None = None) -> dict:
    """COCO bbox AP over images (see the module docstring).

    gt: per image ``(boxes (N, 4) xywh, labels (N,))``; dt: per image ``(boxes (M, 4) xywh,
    scores (M,), labels (M,))``, same image order. Labels are class indices 0..num_classes-1.
    Returns map (AP@[.5:.95]), map_50, map_75, ap_per_class {name: AP@[.5:.95]} (classes with
    ground truth only) and the counts. Values are fractions in [0, 1]; -1 if no ground truth.
    """
    if len(gt) != len(dt):
        raise ValueError(f"{len(gt)} ground-truth images but {len(dt)} detection images")
    names = class_names or [str(c) for c in range(num_classes)]
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), num_classes))  # (T, R, K)
    for k in range(num_classes):
        scores, hits, ignored, n_gt = [], [], [], 0
        for (g_boxes, g_labels), (d_boxes, d_scores, d_labels) in zip(gt, dt):
            g = np.asarray(g_boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(g_labels) == k]
            sel = np.asarray(d_labels) == k
            d = np.asarray(d_boxes, dtype=np.float64).reshape(-1, 4)[sel]
            s = np.asarray(d_scores, dtype=np.float64)[sel]
            order = np.argsort(-s, kind="mergesort")[:MAX_DETS]
            d, s = d[order], s[order]
            n_gt += len(g)
            scores.append(s)
            h, ig = _match_image(_iou_xywh(d, g), d[:, 2] * d[:, 3])
            hits.append(h)
            ignored.append(ig)
        if n_gt == 0:
            continue  # -1: left out of the mean, as pycocotools does
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        precision[:, :, k] = _precision_at_recalls(np.concatenate(hits, axis=1)[:, order],
                                                   np.concatenate(ignored, axis=1)[:, order], n_gt)

    def mean(p: np.ndarray) -> float:
        return float(np.mean(p[p > -1])) if (p > -1).any() else -1.0

    return {
        "map": mean(precision), "map_50": mean(precision[0]), "map_75": mean(precision[5]),
        "ap_per_class": {names[k]: mean(precision[:, :, k]) for k in range(num_classes)
                         if (precision[:, :, k] > -1).any()},
        "images": len(gt), "ground_truth": int(sum(len(np.asarray(lab)) for _, lab in gt)),
        "detections": int(sum(len(np.asarray(sc)) for _, sc, _ in dt)),
    }


# ---------------------------------------------------------------------------------------------
# COCO-format files


def _read_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise MMError(f"{what} file not found: {path}")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise MMError(f"{what} file {path} is not valid JSON ({e})") from None


def coco_eval_files(annotations: str | Path, results: str | Path) -> dict:
    """AP of a COCO results file ``[{image_id, category_id, bbox [x, y, w, h], score}]`` against a
    COCO instances file (images, annotations, categories), as ``coco_map`` computes it."""
    ann = _read_json(annotations, "annotations")
    res = _read_json(results, "results")
    if not isinstance(ann, dict) or not all(k in ann for k in ("images", "annotations", "categories")):
        raise MMError(f"{annotations} is not a COCO instances file (needs images, annotations, categories)")
    if not isinstance(res, list):
        raise MMError(f"{results} must be a JSON list of detections [{{image_id, category_id, bbox, score}}]")
    cats = sorted(c["id"] for c in ann["categories"])
    index = {c: i for i, c in enumerate(cats)}
    names = {c["id"]: c.get("name", str(c["id"])) for c in ann["categories"]}
    images = sorted(im["id"] for im in ann["images"])
    pos = {im: i for i, im in enumerate(images)}
    gt = [([], []) for _ in images]
    for a in ann["annotations"]:
        gt[pos[a["image_id"]]][0].append(a["bbox"])
        gt[pos[a["image_id"]]][1].append(index[a["category_id"]])
    dt = [([], [], []) for _ in images]
    for r in res:
        if r["image_id"] not in pos:
            raise MMError(f"results name image_id {r['image_id']}, which is not in {annotations}")
        if r["category_id"] not in index:
            continue  # pycocotools evaluates only the annotation file's categories
        d = dt[pos[r["image_id"]]]
        d[0].append(r["bbox"])
        d[1].append(r["score"])
        d[2].append(index[r["category_id"]])
    return coco_map(gt, dt, len(cats), [names[c] for c in cats])


def coco_results(detections: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """The COCO results list for per-image detections ``{"boxes" (M, 4) xyxy px, "scores", "labels"}``."""
    out = []
    for image_id, det in zip(image_ids, detections):
        for box, score, label in zip(np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4),
                                     np.asarray(det["scores"]), np.asarray(det["labels"])):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return out


def coco_ground_truth(targets: list[dict], image_ids: list[int], class_names: list[str],
                      sizes: list[tuple[int, int]]) -> dict:
    """A COCO instances dict for per-image targets ``{"boxes" (N, 4) xyxy px, "labels"}``;
    category ids are 1..C in class order, image sizes (width, height)."""
    anns = []
    for image_id, t in zip(image_ids, targets):
        for box, label in zip(np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4), np.asarray(t["labels"])):
            x0, y0, x1, y1 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": int(label) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": [{"id": int(i), "width": int(w), "height": int(h)} for i, (w, h) in zip(image_ids, sizes)],
            "annotations": anns,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]}


def detection_map(targets: list[dict], detections: list[dict], num_classes: int,
                  class_names: list[str] | None = None) -> dict:
    """``coco_map`` of per-image xyxy targets ``{"boxes", "labels"}`` and detections
    ``{"boxes", "scores", "labels"}`` (pixels or normalised: the same units for both), going
    through xywh exactly as an exported results file does."""
    def xywh(boxes) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)

    gt = [(xywh(t["boxes"]), np.asarray(t["labels"])) for t in targets]
    dt = [(xywh(d["boxes"]), np.asarray(d["scores"]), np.asarray(d["labels"])) for d in detections]
    return coco_map(gt, dt, num_classes, class_names)
