"""Detection metrics: GIoU by hand, Hungarian matching against brute force, COCO mAP parity with
pycocotools (the library DESIGN.md §6 names) on a synthetic set with an exported results file."""

import contextlib
import io
import itertools
import json

import numpy as np
import pytest
import torch

from mm.eval.detection import (box_iou, coco_eval_files, coco_ground_truth, coco_results, cxcywh_to_xyxy,
                               detection_map, generalized_box_iou, hungarian_match, match_cost, paired_giou,
                               xyxy_to_cxcywh)


def test_box_conversions_round_trip():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.02, 0.1]])
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)
    assert torch.allclose(cxcywh_to_xyxy(b)[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_iou_and_giou_against_hand_computed_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],  # overlap 1, union 7, hull 9
                      [0.0, 0.0, 2.0, 2.0],  # identical
                      [3.0, 0.0, 4.0, 1.0],  # disjoint: union 5, hull 4x2 = 8
                      [0.5, 0.5, 1.5, 1.5]])  # inside: 1/4, hull = a
    iou = box_iou(a, b)[0]
    giou = generalized_box_iou(a, b)[0]
    assert iou.tolist() == pytest.approx([1 / 7, 1.0, 0.0, 0.25])
    assert giou.tolist() == pytest.approx([1 / 7 - 2 / 9, 1.0, 0.0 - 3 / 8, 0.25])
    assert paired_giou(a.expand(4, 4), b).tolist() == pytest.approx(giou.tolist())


def test_giou_gradient_is_finite_for_degenerate_boxes():
    a = torch.tensor([[0.3, 0.3, 0.3, 0.3]], requires_grad=True)  # zero area
    g = paired_giou(a, torch.tensor([[0.3, 0.3, 0.3, 0.3]]))
    g.sum().backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("seed", range(30))
def test_hungarian_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    q, n = int(rng.integers(1, 6)), 0
    n = int(rng.integers(0, q + 1))
    cost = rng.normal(size=(q, n))
    rows, cols = hungarian_match(cost)
    assert len(rows) == n and len(set(rows)) == n and sorted(cols) == list(range(n))
    best = min((sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n)), default=0.0)
    assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)


def test_match_cost_prefers_the_right_query():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])  # 2 classes + no-object
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]])
    targets = torch.tensor([[0.71, 0.69, 0.1, 0.1], [0.2, 0.21, 0.1, 0.1]])
    rows, cols = hungarian_match(match_cost(probs, boxes, torch.tensor([1, 0]), targets))
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def _synthetic(seed: int, images: int = 12, classes: int = 3):
    """Ground truth and noisy detections (misses, duplicates, wrong classes, background boxes)."""
    rng = np.random.default_rng(seed)
    targets, dets = [], []
    for i in range(images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 50, size=(n, 2))
        wh = rng.uniform(2, 20, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, classes, size=n)
        targets.append({"boxes": boxes, "labels": labels})
        keep = rng.random(n) > 0.2
        d = boxes[keep] + rng.normal(0, 0.8, size=(int(keep.sum()), 4))
        lab = labels[keep].copy()
        flip = rng.random(len(lab)) < 0.15
        lab[flip] = rng.integers(0, classes, size=int(flip.sum()))
        extra = int(rng.integers(0, 4))
        bg_xy = rng.uniform(0, 50, size=(extra, 2))
        d = np.concatenate([d, d[:1] + 0.5 if len(d) and i % 3 == 0 else np.zeros((0, 4)),
                            np.concatenate([bg_xy, bg_xy + 8], axis=1)])
        lab = np.concatenate([lab, lab[:1] if len(lab) and i % 3 == 0 else [], rng.integers(0, classes, size=extra)])
        dets.append({"boxes": d, "scores": rng.random(len(d)), "labels": lab.astype(int)})
    return targets, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_results_parity_with_pycocotools(tmp_path, seed):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ["circle", "square", "triangle"]
    targets, dets = _synthetic(seed)
    ids = [100 + 7 * i for i in range(len(targets))]
    ann = coco_ground_truth(targets, ids, names, [(64, 64)] * len(ids))
    res = coco_results(dets, ids, [1, 2, 3])
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps(res))

    ours = coco_eval_files(tmp_path / "ann.json", tmp_path / "res.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "ann.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["map"] == ev.stats[0]  # exactly: same arithmetic, same order
    assert ours["map_50"] == ev.stats[1]
    assert ours["map_75"] == ev.stats[2]
    for k, name in enumerate(names):  # per-class AP@[.5:.95], area "all", maxDets 100
        p = ev.eval["precision"][:, :, k, 0, -1]
        if (p > -1).any():
            assert ours["ap_per_class"][name] == np.mean(p[p > -1])
    # The in-memory path (what validation uses) gives the same numbers as the files.
    direct = detection_map(targets, dets, 3, names)
    assert direct["map"] == pytest.approx(ours["map"], abs=1e-12)
    assert 0.1 < ours["map"] < 0.9  # a non-trivial case


def test_perfect_detections_score_one_and_empty_ones_zero():
    targets, _ = _synthetic(3)
    perfect = [{"boxes": t["boxes"], "scores": np.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    assert detection_map(targets, perfect, 3)["map"] == pytest.approx(1.0)
    empty = [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []} for _ in targets]
    assert detection_map(targets, empty, 3)["map"] == 0.0
