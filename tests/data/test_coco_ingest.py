"""`mm data ingest` of a COCO instances file: boxes into the shard json, bad boxes skipped and counted."""

import json
import tarfile

import pytest
from PIL import Image

from mm.cli import main
from mm.data.coco import check_box, fit_boxes

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]


def _coco(tmp_path, annotations):
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(40, 30), (20, 20), (64, 32)]):
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(images / f"im{i}.png")
    data = {"images": [{"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h}
                       for i, (w, h) in enumerate([(40, 30), (20, 20), (64, 32)])],
            "annotations": [{"id": k + 1, **a} for k, a in enumerate(annotations)], "categories": CATEGORIES}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _samples(folder):
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    out[meta["source"]] = meta
    return out


GOOD = [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 8]},
        {"image_id": 1, "category_id": 1, "bbox": [20, 10, 19.5, 20]},  # overshoots by 0.5 px: clipped
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 64, 32]}]
BAD = [{"image_id": 1, "category_id": 3, "bbox": [-5, 2, 4, 4]},  # negative
       {"image_id": 2, "category_id": 3, "bbox": [15, 15, 10, 10]},  # outside the 20x20 image
       {"image_id": 2, "category_id": 3, "bbox": [3, 3, 0, 5]},  # zero width
       {"image_id": 2, "category_id": 7, "bbox": [3, 3, 5, 5]},  # unknown category
       {"image_id": 2, "category_id": 1, "bbox": [1, 2, "x", 4]},  # malformed
       {"image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1}]


def test_coco_ingest_writes_boxes_and_counts_bad_ones(tmp_path, capsys):
    src = _coco(tmp_path, GOOD + BAD)
    out = tmp_path / "shards"
    assert main(["data", "ingest", str(src), "--out", str(out), "--images", str(tmp_path / "images")]) == 0
    printed = capsys.readouterr().out
    assert "ingested 3 samples from coco" in printed
    assert "skipped 6 bad boxes:" in printed
    for reason in ("box_negative", "box_outside_image", "box_empty", "box_unknown_category", "box_malformed",
                   "box_crowd"):
        line = next(x for x in printed.splitlines() if x.strip().startswith(reason))
        assert line.split()[1] == "1"
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["boxes_skipped_total"] == 6 and summary["ingested"] == 3
    assert json.loads((out / "categories.json").read_text()) == [{"id": 1, "name": "dog"}, {"id": 3, "name": "cat"}]
    s = _samples(out)
    assert [o["bbox"] for o in s["im0.png"]["objects"]] == [[5.0, 5.0, 15.0, 13.0], [20.0, 10.0, 39.5, 30.0]]
    assert [o["category"] for o in s["im0.png"]["objects"]] == ["cat", "dog"]
    assert s["im0.png"]["boxes_size"] == [40, 30] and s["im0.png"]["caption"] == "cat, dog"
    assert s["im1.png"]["objects"] == [] and s["im1.png"]["caption"] == "no objects"


def test_coco_ingest_with_resize_moves_boxes_with_the_crop(tmp_path):
    src = _coco(tmp_path, GOOD)  # image 3 is 64x32: resized to 32x16... then 16 px centre crop of 32x16 -> 16x16
    out = tmp_path / "shards"
    assert main(["data", "ingest", str(src), "--out", str(out), "--resize", "16"]) == 0
    s = _samples(out)
    assert s["im2.png"]["boxes_size"] == [16, 16]
    assert s["im2.png"]["objects"][0]["bbox"] == [0.0, 0.0, 16.0, 16.0]  # the full-image box, cropped
    # 40x30 -> 21x16, crop left 2: box [5, 5, 15, 13] * (21/40, 16/30) - (2, 0)
    x0, y0, x1, y1 = s["im0.png"]["objects"][0]["bbox"]
    assert (x0, x1) == pytest.approx((5 * 21 / 40 - 2, 15 * 21 / 40 - 2))
    assert (y0, y1) == pytest.approx((5 * 16 / 30, 13 * 16 / 30))


def test_a_json_that_is_not_coco_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"images": []}))
    assert main(["data", "ingest", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm: error:") and "COCO instances" in err and len(err.splitlines()) == 1


def test_check_box_and_fit_boxes():
    assert check_box([1, 2, 3, 4], 10, 10) == ([1.0, 2.0, 3.0, 4.0], None)
    assert check_box([-0.5, 0, 3, 4], 10, 10)[0] == [0.0, 0.0, 3.0, 4.0]  # rounding overshoot: clipped
    assert check_box([1, 2, 3], 10, 10) == (None, "box_malformed")
    assert check_box([1, 2, float("nan"), 4], 10, 10) == (None, "box_malformed")
    assert check_box([5, 5, 5, 9], 10, 10) == (None, "box_empty")
    assert check_box([5, 5, 12, 9], 10, 10) == (None, "box_outside_image")
    objs, dropped = fit_boxes([{"bbox": [0, 0, 3, 10]}, {"bbox": [10, 0, 30, 20]}], (40, 20), 20)
    assert dropped == 1 and objs[0]["bbox"] == [0.0, 0.0, 20.0, 20.0]  # crop x 10..30
