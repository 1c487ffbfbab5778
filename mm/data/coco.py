"""Detection boxes: COCO instances files into ingest items, and the box checks training shares.

A COCO instances file (``images`` with id/file_name/width/height, ``annotations`` with
image_id/category_id/bbox [x, y, w, h], ``categories`` with id/name) becomes one ingest item per
image; its boxes go into the sample json as

    "objects": [{"bbox": [x0, y0, x1, y1], "category": NAME, "category_id": ID}, ...]

in pixels of the written image (x1 exclusive, as the shapes metadata), with ``boxes_size`` =
[width, height] of that image. ``categories.json`` beside the shards lists the categories
(COCO order, by id) so a detector trained on them knows every class, also those no kept box has.
The caption is the names of the image's categories ("person, dog"; "no objects"), so the shards
also pass the caption checks of the other stages.

A bad box is skipped (the image is kept) and counted by reason, printed as one line per reason
in the ingest summary: ``box_malformed`` (not 4 finite numbers), ``box_negative`` (x or y < 0,
w or h < 0), ``box_empty`` (zero width or height), ``box_outside_image`` (beyond the image by
more than 1 px; up to 1 px is clipped: COCO's float boxes often overshoot by a rounding),
``box_unknown_category`` and ``box_crowd`` (iscrowd regions: mm's mAP has no crowd rule).
With ``--resize`` the boxes follow the resize and centre crop; a box left outside the crop is
dropped and counted (``box_outside_crop``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from mm.errors import MMError

CATEGORIES_FILE = "categories.json"
CLIP_TOLERANCE = 1.0  # pixels a box may overshoot the image before it counts as outside
BOX_REASONS = ("box_malformed", "box_negative", "box_empty", "box_outside_image", "box_unknown_category",
               "box_crowd", "box_outside_crop")


def is_coco_file(path: Path) -> bool:
    """A .json file holding a dict with images, annotations and categories (not a JSON list table)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("{")  # a table file is a JSON list; a dict that is not COCO fails clearly later


def check_box(box, width: float | None, height: float | None) -> tuple[list[float] | None, str | None]:
    """``([x0, y0, x1, y1] clipped, None)`` for a usable xyxy box in an image of this size, else
    ``(None, reason)``. A size of None skips the outside check."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None, "box_malformed"
    x0, y0, x1, y1 = (float(v) for v in box)
    if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
        if min(x0, y0) >= -CLIP_TOLERANCE and x1 >= x0 and y1 >= y0:
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
        else:
            return None, "box_negative"
    if x1 <= x0 or y1 <= y0:
        return None, "box_empty"
    if width is not None and height is not None:
        if x0 >= width or y0 >= height or x1 > width + CLIP_TOLERANCE or y1 > height + CLIP_TOLERANCE:
            return None, "box_outside_image"
        x1, y1 = min(x1, float(width)), min(y1, float(height))
    return [x0, y0, x1, y1], None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MMError(f"cannot read COCO annotations {path} ({e}); pass an instances_*.json file") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise MMError(f"{path} is not a COCO instances file: it needs lists 'images', 'annotations' and 'categories'")
    return data


def categories_of(data: dict) -> list[dict]:
    cats = [c for c in data["categories"] if isinstance(c, dict) and isinstance(c.get("id"), int)]
    if not cats:
        raise MMError("the COCO file has no categories with an integer id; detection needs them")
    return [{"id": c["id"], "name": str(c.get("name", c["id"]))} for c in sorted(cats, key=lambda c: c["id"])]


def coco_images(path: Path, image_root: Path | None) -> tuple[list[dict], list[dict], Counter, dict]:
    """The images of a COCO instances file with their checked boxes.

    Returns (images [{"file", "source", "objects", "coco_id", "size"}], categories, skipped box
    counts by reason, a few example sources per reason). Images are in id order; ``file`` is
    ``file_name`` under ``image_root`` (default: the folder of the json, then its ``images/``).
    """
    data = _read(path)
    cats = categories_of(data)
    names = {c["id"]: c["name"] for c in cats}
    root = image_root or path.parent
    by_image: dict = {}
    for a in data["annotations"]:
        if isinstance(a, dict):
            by_image.setdefault(a.get("image_id"), []).append(a)
    skipped, examples, images = Counter(), {}, []
    listed = [i for i in data["images"] if isinstance(i, dict) and isinstance(i.get("id"), (int, str))]
    for im in sorted(listed, key=lambda i: (isinstance(i["id"], str), i["id"])):
        name = str(im.get("file_name", ""))
        w, h = im.get("width"), im.get("height")
        size = (w, h) if all(isinstance(v, (int, float)) and v > 0 for v in (w, h)) else (None, None)
        objects = []
        for a in by_image.get(im["id"], []):
            reason, box = None, a.get("bbox")
            if a.get("iscrowd"):
                reason = "box_crowd"
            elif a.get("category_id") not in names:
                reason = "box_unknown_category"
            elif isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
                box, reason = check_box([box[0], box[1], box[0] + box[2], box[1] + box[3]], *size)
            else:
                reason = "box_malformed"
            if reason:
                skipped[reason] += 1
                examples.setdefault(reason, [])
                if len(examples[reason]) < 5:
                    examples[reason].append(f"{name} (annotation {a.get('id')})")
                continue
            objects.append({"bbox": box, "category": names[a["category_id"]], "category_id": a["category_id"]})
        file = root / name
        if not file.exists() and (root / "images" / name).exists():
            file = root / "images" / name
        images.append({"file": str(file), "source": name, "objects": objects, "coco_id": im["id"]})
    return images, cats, skipped, examples


def caption_of(objects: list[dict]) -> str:
    seen = list(dict.fromkeys(o["category"] for o in objects))
    return ", ".join(seen) if seen else "no objects"


def fit_boxes(objects: list[dict], size: tuple[int, int], resize: int) -> tuple[list[dict], int]:
    """Boxes of an image of ``size`` after ingest's resize (short side to ``resize``) and centre
    crop (mm.data.images.resize_center_crop): (objects in the written image, boxes dropped)."""
    if not resize:
        return objects, 0
    w, h = size
    scale = resize / min(w, h)
    new_w, new_h = max(resize, round(w * scale)), max(resize, round(h * scale))
    sx, sy = new_w / w, new_h / h
    left, top = (new_w - resize) // 2, (new_h - resize) // 2
    out, dropped = [], 0
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        box = [min(max(x0 * sx - left, 0.0), resize), min(max(y0 * sy - top, 0.0), resize),
               min(max(x1 * sx - left, 0.0), resize), min(max(y1 * sy - top, 0.0), resize)]
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:  # less than a pixel left inside the crop
            dropped += 1
            continue
        out.append({**o, "bbox": box})
    return out, dropped


def write_categories(out: Path, categories: list[dict]) -> None:
    (out / CATEGORIES_FILE).write_text(json.dumps(categories, indent=1))


def read_categories(folder: Path) -> list[str] | None:
    """Category names in id order from ``categories.json`` in ``folder``, or None if absent."""
    p = folder / CATEGORIES_FILE
    if not p.is_file():
        return None
    try:
        return [str(c["name"]) for c in json.loads(p.read_text())]
    except (ValueError, KeyError, TypeError):
        raise MMError(f"{p} is not a list of {{id, name}} categories; re-run `mm data ingest`") from None


def coco_source(src: Path, image_root: Path | None) -> tuple[list[dict], dict]:
    """Ingest candidates of a COCO file: ([{image, source, caption, boxes, meta}], extra) where extra
    holds the categories and the skipped-box counts for the summary."""
    images, cats, skipped, examples = coco_images(src, image_root)
    rows = [{"image": im["file"], "source": im["source"], "caption": caption_of(im["objects"]),
             "boxes": im["objects"], "meta": {"coco_image_id": im["coco_id"]}} for im in images]
    return rows, {"categories": cats, "boxes_skipped": skipped, "boxes_skipped_examples": examples}


def box_meta(objects: list[dict], size: tuple[int, int], resize: int) -> dict:
    """The json fields of a written sample's boxes: objects in its pixels and their frame size."""
    fitted, dropped = fit_boxes(objects, size, resize)
    meta = {"objects": fitted, "boxes_size": [resize, resize] if resize else list(size)}
    if dropped:
        meta["boxes_dropped"] = dropped
    return meta


def box_summary(extra: dict, dropped_by_resize: int) -> dict:
    """Summary fields of a COCO ingest: categories and skipped boxes by reason (with examples)."""
    skipped = Counter(extra["boxes_skipped"])
    if dropped_by_resize:
        skipped["box_outside_crop"] += dropped_by_resize
    return {"categories": len(extra["categories"]), "boxes_skipped_total": sum(skipped.values()),
            "boxes_skipped": dict(sorted(skipped.items())),
            "boxes_skipped_examples": dict(sorted(extra["boxes_skipped_examples"].items()))}


def format_box_summary(s: dict) -> list[str]:
    """One line per skip reason, as the image reasons are printed."""
    if "boxes_skipped" not in s:
        return []
    lines = [f"{s['categories']} categories; skipped {s['boxes_skipped_total']} bad boxes"
             + (":" if s["boxes_skipped"] else "")]
    for reason, n in s["boxes_skipped"].items():
        ex = s["boxes_skipped_examples"].get(reason, [])
        lines.append(f"  {reason:<22} {n:>8}" + (f"   e.g. {', '.join(ex[:2])}" if ex else ""))
    return lines
