"""A deterministic detector for shapes images, and GenEval-style matching against a prompt spec.

No learning: pixels with clear chroma are objects (backgrounds are grey), each is labelled with
the nearest palette hue, same-colour pixels are grouped into 8-connected components, each is
cut to its core (pixels at least half as chromatic as its 90th percentile, split again: blur
halos can join neighbours), and its shape is the one whose drawing by the generator — crisp or
softened, at the visible size or up to two pixels larger — best explains the component's soft
chroma map (``fit_shape``). Size comes from the box side, the grid cell from the box centre.

On real shapes images this recovers every object exactly. On generated images (blurry, noisy)
it returns whatever it can find and never raises: tiny specks are dropped, colours snap to the
nearest hue, shapes to the best-fitting template. Blur trims thin tips first, so a threshold
alone reads a blurred diamond as a circle; the soft fit does not (2x down/up-sampled held-out
renders: 81 % read at 48 px and 95 % at 64 px, against 59 % and 81 % for a binary IoU).
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from PIL import Image

from mm.data.shapes import CELLS, COLORS, SHAPES, cell_of, object_sizes, relation_holds, shape_mask

# Palette hues in degrees, from the generator's colours.
HUES = {name: 360.0 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLORS.items()}
MIN_CHROMA = 60  # max(R,G,B) - min(R,G,B); palette colours have >= 150, grey backgrounds ~0


def _as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) int array from a PIL image or an array (H, W, 3) in uint8 or float 0..1/0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.int32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # (C, H, W)
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    arr = np.nan_to_num(arr[:, :, :3].astype(np.float64))
    if arr.max() <= 1.0:  # floats in 0..1
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.int32)


def colour_labels(rgb: np.ndarray, min_chroma: int = MIN_CHROMA) -> np.ndarray:
    """(H, W) index into COLORS for every chromatic pixel, -1 for background."""
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    chroma = mx - mn
    r, g, b = (rgb[:, :, i].astype(np.float64) for i in range(3))
    safe = np.maximum(chroma, 1)
    # Standard hue formula (as colorsys), vectorised.
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = 60.0 * h  # degrees
    centres = np.array(list(HUES.values()))
    dist = np.abs(hue[:, :, None] - centres[None, None, :])
    dist = np.minimum(dist, 360.0 - dist)
    labels = dist.argmin(axis=2)
    return np.where(chroma >= min_chroma, labels, -1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (row, col), in scan order."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


@functools.lru_cache(maxsize=4096)
def _template(shape: str, width: int, height: int) -> np.ndarray:
    return shape_mask(shape, width, height)


def _soft_blur(t: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur (the softening a VQ decoder or a resize gives an edge)."""
    k = np.array([0.25, 0.5, 0.25])
    p = np.pad(t, 1)
    rows = k[0] * p[:-2] + k[1] * p[1:-1] + k[2] * p[2:]
    return k[0] * rows[:, :-2] + k[1] * rows[:, 1:-1] + k[2] * rows[:, 2:]


def _cores(comp: np.ndarray, chroma: np.ndarray, shape: tuple[int, int]) -> list[np.ndarray]:
    """The objects in one same-colour component: its pixels at least half as chromatic as its
    core, split again into connected parts. Blur leaves a faint halo of an object's colour
    around it (dropped here: a no-op on crisp images), and the halos of two same-colour objects
    in neighbouring cells can touch and join them into one component."""
    c = chroma[comp[:, 0], comp[:, 1]]
    core = comp[c >= 0.5 * np.percentile(c, 90)]
    mask = np.zeros(shape, dtype=bool)
    mask[core[:, 0], core[:, 1]] = True
    return connected_components(mask)


def _soft_map(chroma: np.ndarray, pix: np.ndarray, box) -> np.ndarray:
    """The component's chroma over its core chroma, clipped to [0, 1], in its box padded by 3 px
    (a region of its own: other objects and the halo of other colours do not enter)."""
    y0, x0, y1, x1 = box
    c = chroma[pix[:, 0], pix[:, 1]].astype(np.float64)
    soft = np.zeros((y1 - y0 + 6, x1 - x0 + 6))
    keep = (pix[:, 0] >= y0 - 3) & (pix[:, 0] < y1 + 3) & (pix[:, 1] >= x0 - 3) & (pix[:, 1] < x1 + 3)
    soft[pix[keep, 0] - y0 + 3, pix[keep, 1] - x0 + 3] = np.clip(c[keep] / max(np.percentile(c, 90), 1), 0, 1)
    return soft


def fit_shape(soft: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float]:
    """The shape whose drawing, crisp or slightly blurred, best explains a soft object map.

    ``soft`` (H, W) in [0, 1] is how much each pixel looks like the object (its chroma over the
    object's core chroma; 0 off the object); ``box`` = (y0, x0, y1, x1) its visible extent.
    Templates of each shape are tried at sides from one pixel under to two over the visible
    side and at centres within a pixel of the visible one: blur (a VQ reconstruction) trims
    thin tips first, so the visible box of a diamond or triangle is smaller than the drawn one,
    and a binary threshold of a blurred diamond looks round. Returns (shape, fit) with
    fit = 1 - squared error / object energy (1 on a crisp drawing of that shape).
    """
    y0, x0, y1, x1 = box
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
    energy = max(float((soft ** 2).sum()), 1e-9)
    best, best_err = SHAPES[0], float("inf")
    for s in range(max(2, side - 1), side + 3):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ty, tx = int(round(cy - (s - 1) / 2)) + dy, int(round(cx - (s - 1) / 2)) + dx
                if ty < 0 or tx < 0 or ty + s > soft.shape[0] or tx + s > soft.shape[1]:
                    continue
                for shape in SHAPES:
                    canvas = np.zeros_like(soft)
                    canvas[ty:ty + s, tx:tx + s] = _template(shape, s, s)
                    err = min(float(((soft - canvas) ** 2).sum()), float(((soft - _soft_blur(canvas)) ** 2).sum()))
                    if err < best_err - 1e-9:
                        best, best_err = shape, err
    return best, 1.0 - best_err / energy


def detect(image, min_area: int | None = None, min_chroma: int = MIN_CHROMA) -> list[dict]:
    """Objects in a shapes image: ``[{"shape","color","size","bbox","cell","area","score"}]``.

    ``image`` is a PIL image or an array (H, W, 3) / (3, H, W), uint8 or floats in 0..1.
    ``bbox`` is ``[x0, y0, x1, y1]`` with exclusive ends; ``score`` is the template fit (1 = a crisp drawing, see fit_shape). Objects
    are listed in reading order of their cells, then left to right.
    """
    try:
        rgb = _as_rgb_array(image)
    except (ValueError, TypeError):
        return []
    height, width = rgb.shape[:2]
    if height < 3 or width < 3:
        return []
    sizes = object_sizes(max(32, min(height, width)))
    if min_area is None:  # a third of a small triangle: keeps real objects, drops specks
        min_area = max(3, int(0.2 * sizes["small"] ** 2))
    size_cut = (sizes["small"] + sizes["large"]) / 2
    labels = colour_labels(rgb, min_chroma)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    names = list(COLORS)
    found = []
    for k, name in enumerate(names):
        mask = labels == k
        if not mask.any():
            continue
        for comp in connected_components(mask):
            for pix in _cores(comp, chroma, mask.shape):
                if len(pix) < min_area:
                    continue
                y0, x0 = pix.min(axis=0)
                y1, x1 = pix.max(axis=0) + 1
                shape, score = fit_shape(_soft_map(chroma, comp, (y0, x0, y1, x1)), (3, 3, 3 + y1 - y0, 3 + x1 - x0))
                found.append({
                    "shape": shape, "color": name,
                    "size": "large" if max(x1 - x0, y1 - y0) >= size_cut else "small",
                    "bbox": [int(x0), int(y0), int(x1), int(y1)],
                    "cell": cell_of((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, width, height),
                    "area": len(pix), "score": round(score, 4),
                })
    found.sort(key=lambda d: (CELLS.index(d["cell"]), d["bbox"][1], d["bbox"][0]))
    return found


def match_spec(detections: list[dict], spec: dict) -> dict:
    """GenEval-style check of detections against a prompt spec (see ``held_out_prompts``).

    Per attribute, over every object group of the spec:
      shape    – an object of that shape was found;
      color    – an object of that colour *and* shape was found (attribute binding);
      count    – exactly ``count`` such objects, and no objects beyond the spec's total;
      position – the group's objects sit in its cell, and the relation between groups holds;
                 None when the spec says nothing about position.
    ``correct`` is True when every checked attribute is.
    """
    groups = spec.get("objects", [])
    found = {(g["color"], g["shape"]): [d for d in detections
                                       if d["color"] == g["color"] and d["shape"] == g["shape"]]
             for g in groups}
    shape_ok = all(any(d["shape"] == g["shape"] for d in detections) for g in groups)
    color_ok = all(found[(g["color"], g["shape"])] for g in groups)
    total = sum(int(g.get("count", 1)) for g in groups)
    count_ok = (all(len(found[(g["color"], g["shape"])]) == int(g.get("count", 1)) for g in groups)
                and len(detections) == total)
    position_ok = None
    if any(g.get("cell") for g in groups) or spec.get("relation"):
        position_ok = True
        for g in groups:
            dets = found[(g["color"], g["shape"])]
            if g.get("cell") and (not dets or any(d["cell"] != g["cell"] for d in dets)):
                position_ok = False
        rel = spec.get("relation")
        if rel:
            a, b = groups[rel["a"]], groups[rel["b"]]
            cells_a = [d["cell"] for d in found[(a["color"], a["shape"])]]
            cells_b = [d["cell"] for d in found[(b["color"], b["shape"])]]
            position_ok = position_ok and relation_holds(rel["relation"], cells_a, cells_b)
    checks = [shape_ok, color_ok, count_ok] + ([position_ok] if position_ok is not None else [])
    return {"color": color_ok, "shape": shape_ok, "count": count_ok, "position": position_ok,
            "correct": all(checks)}
