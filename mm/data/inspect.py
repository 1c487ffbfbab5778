"""``mm data inspect DIR_OR_PATTERN``: what is in a shard set, and what is broken in it.

Reads every sample once, shard by shard in order (webdataset, no shuffling), and reports:
samples and shards (and whether they agree with ``sizes.json``), truncated or unreadable
shards, samples with an unreadable or missing image or a missing caption, caption length in
words, image sizes, VQA question counts and example captions. ``--grid out.png`` writes a
contact sheet of the first N good samples with their captions under the images.
Broken data is counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from mm.data.images import ImageSkip, open_image, to_rgb
from mm.errors import MMError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
THUMB = 128  # contact sheet: image cell side in pixels
CAPTION_LINES = 4


def iter_shard(url: str, errors: list):
    """Samples of one shard (raw bytes per extension); read errors are appended to ``errors``."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True  # keep going: a broken shard must not stop the inspection

    dataset = wds.WebDataset([url], shardshuffle=False, handler=handler, empty_check=False,
                             nodesplitter=None, workersplitter=None)
    yield from dataset


def check_sample(sample: dict) -> tuple[str | None, str | None, object]:
    """``(problem, caption, image)`` for one raw sample; problem is None when it is usable."""
    caption, problem = None, None
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            problem = "bad_json"
    if "txt" in sample:
        try:
            caption = " ".join(sample["txt"].decode("utf-8").split())
        except UnicodeDecodeError:
            problem = problem or "caption_not_utf8"
    if not caption and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = " ".join(meta["caption"].split())
    if not caption and isinstance(meta, dict) and isinstance(meta.get("label"), str) and meta["label"]:
        caption = f"[{meta['label']}]"  # a labelled image without a caption (classification data)
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    image = None
    if key is None:
        problem = "missing_image"
    else:
        try:
            image = open_image(sample[key], max_pixels=1 << 40)
        except ImageSkip:
            problem = "unreadable_image"
    if not caption and problem is None:
        problem = "missing_caption"
    return problem, caption, (image, meta)


def inspect_shards(spec: str, num: int = 16, grid: str | Path = "") -> dict:
    """The report as a dict (see module docstring); writes the contact sheet when ``grid``."""
    from mm.data.shards import expand_shards, read_sizes

    urls = expand_shards(spec)
    sizes = read_sizes(urls)
    problems, image_sizes, words = Counter(), Counter(), []
    examples, cells, broken = [], [], {}
    per_shard, qa_questions, samples = {}, 0, 0
    for url in urls:
        errors, count = [], 0
        for sample in iter_shard(url, errors):
            count += 1
            problem, caption, (image, meta) = check_sample(sample)
            if problem:
                problems[problem] += 1
                continue
            words.append(len(caption.split()))
            image_sizes[f"{image.size[0]}x{image.size[1]}"] += 1
            if isinstance(meta, dict) and isinstance(meta.get("qa"), list):
                qa_questions += len(meta["qa"])
            if len(examples) < num:
                examples.append(caption)
                if grid:
                    cells.append((_thumbnail(image), caption))
        name = Path(url).name
        per_shard[name] = count
        samples += count
        expected = sizes.get(url)
        if errors or (expected is not None and count < expected):
            broken[name] = errors[0] if errors else f"{count} samples, sizes.json says {expected}"
        elif not _tar_complete(url):
            broken[name] = "no end-of-archive marker: the file was cut short"
    report = {
        "shards": len(urls), "samples": samples,
        "sizes_json_samples": None if any(v is None for v in sizes.values()) else sum(sizes.values()),
        "good_samples": len(words), "problems": dict(sorted(problems.items())),
        "broken_shards": broken, "samples_per_shard": per_shard,
        "caption_words": ({"min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words)}
                          if words else None),
        "image_sizes": dict(image_sizes.most_common(5)), "qa_questions": qa_questions,
        "examples": examples, "ingest_skipped": _ingest_skipped(urls),
    }
    if grid:
        if not cells:
            raise MMError(f"no readable samples in {spec} to draw a contact sheet from")
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(cells).save(grid, format="PNG")
        report["grid"] = str(grid)
    return report


def _ingest_skipped(urls: list[str]) -> dict | None:
    """Skip counts from the ``ingest_summary.json`` that ``mm data ingest`` left beside the shards."""
    if not urls or urls[0].startswith("pipe:") or "://" in urls[0]:
        return None
    path = Path(urls[0]).parent / "ingest_summary.json"
    try:
        return json.loads(path.read_text()).get("skipped") if path.exists() else None
    except (ValueError, OSError, AttributeError):
        return None


def _tar_complete(url: str) -> bool:
    """False for a local tar that lacks the two zero blocks every finished tar ends with.

    A tar cut at a member boundary reads without any error; this catches it even without
    ``sizes.json``. Non-local URLs are assumed complete.
    """
    path = Path(url)
    if url.startswith("pipe:") or "://" in url or not path.is_file():
        return True
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _thumbnail(image):
    """An RGB thumbnail fitting THUMB x THUMB; small images are enlarged with crisp pixels."""
    from PIL import Image

    im = to_rgb(image)
    scale = THUMB / max(im.size)
    method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), method)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most CAPTION_LINES lines (… when cut)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1] + " …"
    return lines


def contact_sheet(cells: list) -> Image.Image:
    """A grid of (thumbnail, caption) cells, captions written under the images."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    pad = 6
    cell_w, cell_h = THUMB + 2 * pad, THUMB + 2 * pad + CAPTION_LINES * line_h
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (thumb, caption) in enumerate(cells):
        x0, y0 = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        left, top = x0 + (THUMB - thumb.width) // 2, y0 + (THUMB - thumb.height) // 2
        sheet.paste(thumb, (left, top))
        # A thin frame so white images stay visible on the white sheet.
        draw.rectangle((left - 1, top - 1, left + thumb.width, top + thumb.height), outline=(200, 200, 200))
        for j, line in enumerate(_wrap(draw, caption, font, THUMB)):
            draw.text((x0, y0 + THUMB + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def format_report(r: dict) -> str:
    lines = [f"shards   {r['shards']}", f"samples  {r['samples']}"
             + ("" if r["sizes_json_samples"] in (None, r["samples"])
                else f"  (sizes.json says {r['sizes_json_samples']})"),
             f"good     {r['good_samples']}"]
    for problem, n in r["problems"].items():
        lines.append(f"  {problem:<18} {n}")
    for name, why in r["broken_shards"].items():
        lines.append(f"broken shard {name}: {why}")
    if r.get("ingest_skipped"):
        lines.append("skipped at ingest: " + ", ".join(f"{k} {v}" for k, v in r["ingest_skipped"].items()))
    if r["caption_words"]:
        c = r["caption_words"]
        lines.append(f"caption words  min {c['min']}  mean {c['mean']}  max {c['max']}")
    if r["image_sizes"]:
        lines.append("image sizes    " + ", ".join(f"{k} ({v})" for k, v in r["image_sizes"].items()))
    if r["qa_questions"]:
        lines.append(f"VQA questions  {r['qa_questions']}")
    lines += ["examples:"] + [f"  {c}" for c in r["examples"]]
    if r.get("grid"):
        lines.append(f"contact sheet written to {r['grid']}")
    return "\n".join(lines)


def cli_inspect(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise MMError(f"--num must be >= 1, got {args.num}")
    print(format_report(inspect_shards(args.path, num=args.num, grid=args.grid)))
    return 0
