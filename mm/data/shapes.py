"""The built-in shapes data set: procedural image-caption-VQA samples, written as shards.

Every image holds 1–4 non-overlapping objects, one per cell of a 3×3 grid, each a coloured
circle, square, triangle or diamond in one of two sizes, on a plain or lightly textured grey
background. Everything is drawn from a numpy ``Generator`` seeded by ``(seed, split, index)``,
never the global RNG, so a sample is the same whichever process makes it and in whatever order,
and the train/val/test splits are different random streams.

Colours are saturated and backgrounds are grey (no chroma), so ``mm.data.detector`` can find the
objects again exactly; text (captions, questions, held-out prompts) lives in
``mm.data.shapes_text``.

Bounding boxes are ``[x0, y0, x1, y1]`` in pixels with ``x1``/``y1`` exclusive (``x1 - x0`` is
the width), the same convention the detector returns.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mm.errors import MMError

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated colours ~60° apart in hue; the detector tells them apart by hue alone.
COLORS = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 35),
    "green": (40, 175, 60),
    "cyan": (40, 200, 215),
    "blue": (45, 85, 225),
    "purple": (150, 60, 205),
}
SIZES = ("small", "large")
# Row-major: index = 3 * row + column.
CELLS = ("top left", "top center", "top right",
         "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right")
TEXTURES = ("plain", "noise", "stripes", "checker")
SPLITS = {"train": 0, "val": 1, "test": 2}
VERSION = 1  # bump when the generator's output changes, so caches are rebuilt


# ---------------------------------------------------------------------------------------------
# Geometry of an image size


def check_image_size(image_size: int) -> None:
    if image_size < 32 or image_size % 16:
        raise MMError(f"--image-size must be a multiple of 16 and at least 32, got {image_size}")


def cell_bounds(length: int) -> list[int]:
    """Pixel edges of the three grid rows/columns along one axis: [0, a, b, length]."""
    return [round(i * length / 3) for i in range(4)]


def object_sizes(image_size: int) -> dict[str, int]:
    """Side in pixels of a small and a large object. Odd sides keep shapes symmetric."""
    large = image_size // 3 - 1  # fits a cell with one empty column/row to spare
    large -= 1 - large % 2
    small = round(0.6 * large)
    small -= 1 - small % 2
    return {"small": small, "large": large}


def cell_of(x: float, y: float, width: int, height: int) -> str:
    """Grid cell name of the point (x, y)."""
    col = int(np.searchsorted(cell_bounds(width)[1:3], x, side="right"))
    row = int(np.searchsorted(cell_bounds(height)[1:3], y, side="right"))
    return CELLS[3 * row + col]


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of ``shape`` filling a width×height box, as drawn here."""
    im = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(im), shape, (0, 0, width, height), 1)
    return np.asarray(im, dtype=bool)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox, fill) -> None:
    x0, y0, x1, y1 = bbox
    x1, y1 = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(xc, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xc, y0), (x1, yc), (xc, y1), (x0, yc)], fill=fill)
    else:
        raise MMError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------
# Sampling and drawing one scene


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of every other sample and split."""
    return np.random.default_rng([VERSION, seed, SPLITS[split], index])


def sample_background(rng: np.random.Generator) -> dict:
    texture = TEXTURES[rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])]
    return {"level": int(rng.integers(25, 231)), "texture": texture,
            "amplitude": 0 if texture == "plain" else int(rng.integers(4, 11)),
            "period": int(rng.integers(2, 5)), "noise_seed": int(rng.integers(2**31))}


def place_object(rng: np.random.Generator, cell: str, size: int, image_size: int) -> list[int]:
    """A size×size box inside ``cell`` leaving the cell's last column and row empty, so objects
    in neighbouring cells never touch (the detector separates them by connectivity)."""
    idx = CELLS.index(cell)
    b = cell_bounds(image_size)
    r, c = divmod(idx, 3)
    x0 = int(rng.integers(b[c], b[c + 1] - size))  # upper bound exclusive: x0 + size <= edge - 1
    y0 = int(rng.integers(b[r], b[r + 1] - size))
    return [x0, y0, x0 + size, y0 + size]


def make_object(rng, shape: str, color: str, size: str, cell: str, image_size: int) -> dict:
    side = object_sizes(image_size)[size]
    # A little per-object colour jitter, like real paint; the hue stays far from its neighbours.
    rgb = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255)
    return {"shape": shape, "color": color, "size": size,
            "bbox": place_object(rng, cell, side, image_size), "cell": cell,
            "rgb": [int(v) for v in rgb]}


def sample_scene(rng: np.random.Generator, image_size: int) -> dict:
    """Objects (one per distinct cell, listed in reading order) and a background."""
    n = int(rng.integers(1, 5))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    objects = []
    for cell in cells:
        if objects and rng.random() < 0.35:  # repeats make counting captions and questions
            prev = objects[int(rng.integers(len(objects)))]
            shape, color = prev["shape"], prev["color"]
        else:
            shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        size = SIZES[rng.integers(2)]
        objects.append(make_object(rng, shape, color, size, CELLS[cell], image_size))
    return {"objects": objects, "background": sample_background(rng)}


def render_scene(objects: list[dict], background: dict, image_size: int) -> Image.Image:
    """Draw objects (with ``bbox``, ``shape`` and ``rgb`` or ``color``) on a grey background."""
    s = image_size
    level, amp = background["level"], background["amplitude"]
    yy, xx = np.mgrid[0:s, 0:s]
    if background["texture"] == "noise":
        noise = np.random.default_rng(background["noise_seed"]).integers(-amp, amp + 1, (s, s))
    elif background["texture"] == "stripes":
        noise = np.where(((xx + yy) // background["period"]) % 2 == 0, amp, -amp)
    elif background["texture"] == "checker":
        p = background["period"]
        noise = np.where(((xx // p) + (yy // p)) % 2 == 0, amp, -amp)
    else:
        noise = np.zeros((s, s), dtype=np.int64)
    grey = np.clip(level + noise, 0, 255).astype(np.uint8)  # equal R, G, B: zero chroma
    img = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_shape(draw, obj["shape"], obj["bbox"], tuple(obj.get("rgb") or COLORS[obj["color"]]))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no timestamps or text chunks: reproducible
    return buf.getvalue()


def render_spec(spec: dict, image_size: int = 32, seed: int = 0) -> tuple[Image.Image, list[dict]]:
    """Draw an image that satisfies a structured prompt spec (see ``held_out_prompts``).

    ``spec["objects"]`` lists ``{"color", "shape", "count", "cell" (or None), "size" (optional)}``;
    an optional ``spec["relation"]`` = ``{"a": i, "b": j, "relation": "above"|"below"|
    "left of"|"right of"}`` constrains where object groups i and j go. Returns the image and
    the drawn objects. Raises MMError when the spec cannot fit on the 3×3 grid.
    """
    check_image_size(image_size)
    rng = np.random.default_rng([VERSION, seed, 99])
    cells = _cells_for_spec(spec, rng)
    objects = []
    for group, group_cells in zip(spec["objects"], cells):
        for cell in group_cells:
            size = group.get("size") or SIZES[rng.integers(2)]
            objects.append(make_object(rng, group["shape"], group["color"], size, cell, image_size))
    objects.sort(key=lambda o: CELLS.index(o["cell"]))
    background = {"level": int(rng.integers(40, 200)), "texture": "plain", "amplitude": 0,
                  "period": 2, "noise_seed": 0}
    return render_scene(objects, background, image_size), objects


def relation_holds(rel: str, cells_a: list[str], cells_b: list[str]) -> bool:
    """True when every cell of a stands in ``rel`` to every cell of b."""
    ra = [divmod(CELLS.index(c), 3) for c in cells_a]
    rb = [divmod(CELLS.index(c), 3) for c in cells_b]
    if not ra or not rb:
        return False
    test = {"above": lambda p, q: p[0] < q[0], "below": lambda p, q: p[0] > q[0],
            "left of": lambda p, q: p[1] < q[1], "right of": lambda p, q: p[1] > q[1]}[rel]
    return all(test(p, q) for p in ra for q in rb)


def _cells_for_spec(spec: dict, rng: np.random.Generator) -> list[list[str]]:
    groups = spec["objects"]
    total = sum(int(g.get("count", 1)) for g in groups)
    if total < 1 or total > 9:
        raise MMError(f"a shapes spec needs 1..9 objects in all, got {total}")
    rel = spec.get("relation")
    for _ in range(500):  # rejection sampling: tiny search space, always quick
        free = [c for c in CELLS if c not in {g.get("cell") for g in groups}]
        order = list(rng.permutation(free))
        out = []
        for g in groups:
            n = int(g.get("count", 1))
            if g.get("cell"):
                out.append([g["cell"]] * n)
            else:
                out.append([order.pop() for _ in range(n)] if len(order) >= n else [])
        flat = [c for cs in out for c in cs]
        if len(flat) != total or len(set(flat)) != total:
            continue
        if rel and not relation_holds(rel["relation"], out[rel["a"]], out[rel["b"]]):
            continue
        return out
    raise MMError("this shapes spec cannot be laid out on the 3x3 grid; use fewer objects or another relation")


# ---------------------------------------------------------------------------------------------
# Samples, shards, the command and the cache


def make_sample(seed: int, split: str, index: int, image_size: int) -> dict:
    """One webdataset sample: PNG, caption and metadata (caption, objects, qa)."""
    from mm.data.shapes_text import make_captions, make_qa

    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng, image_size)
    objects, background = scene["objects"], scene["background"]
    img = render_scene(objects, background, image_size)
    captions = make_captions(rng, objects, background)
    meta = {
        "caption": captions[0],
        "captions": captions,
        "objects": [{k: o[k] for k in ("shape", "color", "size", "bbox", "cell")} for o in objects],
        "qa": make_qa(rng, objects),
        "image_size": image_size,
        "background": {k: background[k] for k in ("level", "texture")},
        "split": split,
        "index": index,
    }
    return {"__key__": f"{split}-{index:07d}", "png": png_bytes(img), "txt": captions[0], "json": meta}


def write_split(out_dir: Path, split: str, num: int, image_size: int, seed: int,
                samples_per_shard: int) -> dict[str, int]:
    """Write ``num`` samples of ``split`` as shards into ``out_dir`` (sequential: the bytes depend
    only on the arguments, and 32 px samples take well under a millisecond each)."""
    from mm.data.shards import ShardWriter

    with ShardWriter(out_dir, prefix=f"shapes-{split}", samples_per_shard=samples_per_shard) as w:
        for i in range(num):
            w.write(make_sample(seed, split, i, image_size))
    return w.sizes


def held_out_prompts() -> list[dict]:
    """The fixed held-out text-to-image prompts with their specs (see ``mm.data.shapes_text``)."""
    from mm.data.shapes_text import held_out_prompts as prompts

    return prompts()


def write_prompts(path: Path) -> None:
    path.write_text(json.dumps(held_out_prompts(), indent=1))


def _check_args(num_samples: int, image_size: int, seed: int, samples_per_shard: int,
                val_samples: int) -> None:
    if num_samples < 1:
        raise MMError(f"--num-samples must be at least 1, got {num_samples}")
    check_image_size(image_size)
    if seed < 0:
        raise MMError(f"--seed must be >= 0, got {seed}")
    if samples_per_shard < 1:
        raise MMError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if val_samples < 0:
        raise MMError(f"--val-samples must be >= 0, got {val_samples}")


def default_val_samples(num_samples: int) -> int:
    return max(1, num_samples // 10)


def write_dataset(out: Path, num_train: int, num_val: int, image_size: int, seed: int,
                  samples_per_shard: int) -> dict[str, Path]:
    """train/, val/, test/ shard folders and prompts.json under ``out``; val and test have
    ``num_val`` samples each (none when 0)."""
    _check_args(num_train, image_size, seed, samples_per_shard, num_val)
    folders = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_val)):
        if n == 0:
            continue
        folders[split] = out / split
        write_split(folders[split], split, n, image_size, seed, samples_per_shard)
    write_prompts(out / "prompts.json")
    return folders


def cli_shapes(args: argparse.Namespace) -> int:
    """``mm data shapes --out DIR --num-samples N [--image-size 32] [--seed 0] …``"""
    num_val = default_val_samples(args.num_samples) if args.val_samples is None else args.val_samples
    _check_args(args.num_samples, args.image_size, args.seed, args.samples_per_shard, num_val)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MMError(f"--out {out} is a file; give a folder")
    for split in SPLITS:
        if any((out / split).glob("*.tar")):
            raise MMError(f"{out / split} already holds shards; give an empty --out folder or delete it")
    folders = write_dataset(out, args.num_samples, num_val, args.image_size, args.seed,
                            args.samples_per_shard)
    for split, folder in folders.items():
        n = sum(json.loads((folder / "sizes.json").read_text()).values())
        print(f"{split}: {n} samples in {folder}")
    print(f"prompts: {out / 'prompts.json'}")
    return 0


def default_cache() -> Path:
    return Path(os.environ.get("MM_CACHE", "~/.cache/mm")).expanduser() / "shapes"


def ensure_shapes(root: str | Path | None, image_size: int = 32, num_train: int = 20000,
                  num_val: int = 500, seed: int = 0) -> dict[str, Path]:
    """The built-in shapes set (``builtin:shapes``), generated into a cache folder only once.

    Returns ``{"train": folder, "val": folder, "test": folder}`` (val/test absent when
    ``num_val`` is 0). The set is written into a temporary folder beside the final one and
    renamed when complete, so a crash never leaves a half set, and when two processes race the
    loser drops its copy and uses the winner's.
    """
    _check_args(num_train, image_size, seed, 1000, num_val)
    root = Path(root).expanduser() if root else default_cache()
    final = root / f"shapes-v{VERSION}-{image_size}px-seed{seed}-train{num_train}-val{num_val}"
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
        try:
            write_dataset(tmp, num_train, num_val, image_size, seed, samples_per_shard=1000)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    splits = ("train", "val", "test") if num_val else ("train",)
    return {s: final / s for s in splits}
