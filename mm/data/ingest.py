"""``mm data ingest SRC --out DIR``: real image-caption data into webdataset shards.

Three kinds of source (DESIGN.md §4):
- a folder of images, each with a same-named ``.txt`` caption (``cat.jpg`` + ``cat.txt``);
- a Hugging Face imagefolder: ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and
  ``text`` (metadata files may sit in sub-folders such as ``train/``; names are relative to
  the metadata file, as in HF ``datasets``);
- a CSV or JSONL (or JSON list) file with image path and caption columns; relative paths are
  relative to the file.
- a COCO instances json (detection): images + boxes, see mm.data.coco (``--images DIR`` names
  the image folder); boxes go into the sample json, bad boxes are skipped and counted.

Labels for classification go into the sample json as ``{"label": "..."}``:
- a folder with one sub-folder per class and no ``.txt`` captions (``cat/1.jpg``, ``dog/2.jpg``):
  the label is the name of the image's folder (as HF ``imagefolder``; ``train/cat/1.jpg`` is
  ``cat``); images directly in the root have none (``missing_label``);
- a table or HF ``metadata.jsonl``/``.csv`` with a label column (``--label-column``, default
  ``label``): then the caption is optional. Integers are accepted as class ids ("3").
A bad label skips its sample, counted by reason: ``empty_label``, ``label_not_string`` (null,
a list, a float, true/false), ``label_not_utf8``, ``unknown_label`` (not in ``--classes``).

Every candidate sample is either written or skipped with one reason, counted in the summary
(printed, and saved as ``DIR/ingest_summary.json``). Bad input never stops the run.

Choices a researcher should know:
- captions are whitespace-normalised (newlines and runs of spaces become one space);
- captions that are not valid UTF-8 are SKIPPED (reason ``caption_not_utf8``), not decoded
  with replacement characters: U+FFFD garbage would be learned by the text model, and a
  wrongly-encoded caption usually means the whole file needs re-encoding, which the count
  makes visible. A UTF-8 byte-order mark is accepted;
- 1x1 (tiny) images are valid images and are kept (upscaled when ``--resize`` is given);
- ``--dedup`` compares a SHA-256 of the final pixels (after conversion and resizing), so the
  same picture saved twice, or with different metadata or PNG compression, is written once.
  The first occurrence in source order is kept;
- output order is the source order (sorted paths for folders, row order for tables) for any
  number of ``--workers``: the same input gives byte-identical shards.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mm.data.coco import box_meta, box_summary, coco_source, format_box_summary, is_coco_file, write_categories
from mm.data.images import ImageSkip, encode_image, load_rgb
from mm.errors import MMError

# Image file extensions considered in folders (others are ignored, and counted as such).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp",
                    ".dib", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
SUMMARY = "ingest_summary.json"
RESERVED_JSON = ("caption", "source", "width", "height", "sha256", "label")

# Skip reasons decided before the image is read (image reasons live in mm.data.images).
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
MISSING_IMAGE = "missing_image"
IMAGE_IS_URL = "image_is_url"
UNREADABLE_FILE = "unreadable_file"
BAD_ROW = "bad_metadata_row"
DUPLICATE = "duplicate"
MISSING_LABEL = "missing_label"
EMPTY_LABEL = "empty_label"
LABEL_NOT_STRING = "label_not_string"
LABEL_NOT_UTF8 = "label_not_utf8"
UNKNOWN_LABEL = "unknown_label"


@dataclass
class Item:
    """One candidate sample; small and picklable so worker processes can take it."""

    image: str  # path of the image file (absolute, or relative to the working folder)
    source: str  # the path as the source names it (recorded in the sample's json)
    caption: object = None  # caption value from a table (str, list of str, number or None)
    caption_file: str | None = None  # sidecar .txt (folder sources)
    meta: dict = field(default_factory=dict)  # other table columns, copied into the json
    labelled: bool = False  # the source gives this item a class label (then the caption is optional)
    label: object = None  # its label value, checked by clean_label
    boxes: list | None = None  # COCO source: objects [{bbox xyxy, category, category_id}] (mm.data.coco)
    skip: str | None = None  # a reason already known while listing


@dataclass(frozen=True)
class Options:
    fmt: str = "png"
    quality: int = 95
    resize: int = 0
    max_pixels: int = 89_478_485
    classes: tuple[str, ...] = ()  # fixed class list: other labels are skipped (unknown_label)


# ----------------------------------------------------------------------------- listing sources

def list_source(src: Path, image_column: str, caption_column: str, exclude: Path | None = None,
                label_column: str = "label"):
    """``(kind, items, ignored_files)`` for a source folder or table file."""
    if not src.exists():
        raise MMError(f"ingest source not found: {src}; give a folder of images or a CSV/JSONL file")
    if src.is_file():
        kind = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "json"}.get(src.suffix.lower())
        if kind is None:
            raise MMError(f"unknown source format {src.suffix or src.name!r}; "
                          "use a folder, a .csv, a .jsonl or a .json file")
        rows = list(_read_table(src))
        return kind, _items_from_table(rows, src, image_column, caption_column, strict=True,
                                       label_column=label_column), 0
    files = _walk(src, exclude)
    metadata = [f for f in files if f.name in METADATA_NAMES]
    if metadata:
        return "imagefolder", _items_from_imagefolder(src, files, metadata, image_column, caption_column,
                                                      label_column), 0
    return _items_from_sidecars(src, files)


def _walk(root: Path, exclude: Path | None) -> list[Path]:
    """All visible files under ``root`` in sorted order (hidden files and ``exclude`` skipped)."""
    out = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (here / d).resolve() != exclude))
        out += [here / n for n in sorted(names) if not n.startswith(".")]
    return out


def _items_from_sidecars(src: Path, files: list[Path]):
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise MMError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS)[:5])}, ...) and no metadata.jsonl/"
                      f"metadata.csv in {src}; point ingest at a folder of images with .txt captions")
    captions = {f for f in files if f.suffix == ".txt"}
    if not captions and any(f.parent != src for f in images):  # one sub-folder per class
        items = [Item(image=str(f), source=str(f.relative_to(src)), labelled=True,
                      label=f.parent.name if f.parent != src else None) for f in images]
        return "class_folders", items, len(files) - len(images)
    items = []
    for f in images:
        txt = f.with_suffix(".txt")
        items.append(Item(image=str(f), source=str(f.relative_to(src)),
                          caption_file=str(txt) if txt in captions else None,
                          skip=None if txt in captions else MISSING_CAPTION))
    ignored = len(files) - len(images) - len(captions)
    return "folder", items, ignored


def _items_from_imagefolder(src, files, metadata, image_column, caption_column, label_column) -> list[Item]:
    by_dir: dict[Path, list[Path]] = {}
    for m in metadata:
        by_dir.setdefault(m.parent, []).append(m)
    items, listed, root = [], set(), os.path.normpath(src)
    for folder, ms in sorted(by_dir.items()):
        if len(ms) > 1:
            raise MMError(f"both metadata.jsonl and metadata.csv in {folder}; keep only one")
        rows = [_hf_columns(row, image_column, caption_column) for row in _read_table(ms[0])]
        for item in _items_from_table(rows, ms[0], "__image__", "__caption__", strict=False,
                                      label_column=label_column):
            if item.image and not item.skip:
                item.image = os.path.normpath(item.image)
                if Path(item.image).is_relative_to(root):  # "train/cat.png" from the folder root
                    item.source = str(Path(item.image).relative_to(root))
            listed.add(item.image)
            items.append(item)
    # Images in the folder that no metadata row names have no caption.
    for f in files:
        if f.suffix.lower() in IMAGE_EXTENSIONS and os.path.normpath(f) not in listed:
            items.append(Item(image=str(f), source=str(f.relative_to(src)), skip=MISSING_CAPTION))
    return items


def _hf_columns(row, image_column: str, caption_column: str):
    """Rename an imagefolder row's image/caption columns to fixed names.

    HF names (``file_name``, ``text``) are used unless the row has the user's column names.
    """
    if not isinstance(row, dict):
        return row
    image_key = image_column if image_column in row else "file_name"
    caption_key = caption_column if caption_column in row else "text"
    row = dict(row)
    image, caption = row.pop(image_key, None), row.pop(caption_key, None)
    row["__image__"], row["__caption__"] = image, caption
    return row


def _read_table(path: Path):
    """Rows (dicts) of a CSV/TSV, JSONL or JSON-list file; ``None`` for an unparseable row.

    Files are read with ``surrogateescape`` so a caption with invalid UTF-8 bytes costs that
    row (``caption_not_utf8``), not the whole file.
    """
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                try:
                    yield from reader
                except csv.Error as e:  # broken quoting: the rest of the file cannot be trusted
                    raise MMError(f"{path} near line {reader.line_num + 1}: {e}; "
                                  "fix the CSV or convert it to JSONL") from None
            elif suffix == ".json":
                try:
                    data = json.load(f)
                except ValueError as e:
                    raise MMError(f"{path} is not valid JSON ({e}); use a JSON list of objects or JSONL") from None
                if not isinstance(data, list):
                    raise MMError(f"{path} must hold a JSON list of objects (one per sample)")
                yield from data
            else:
                for line in f:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            yield None
    except OSError as e:
        raise MMError(f"cannot read {path}: {e.strerror or e}") from None


def _items_from_table(rows: list, table: Path, image_column: str, caption_column: str,
                      strict: bool, label_column: str = "label") -> list[Item]:
    dicts = [r for r in rows if isinstance(r, dict)]
    if strict and dicts:
        columns = sorted({k for r in dicts for k in r if k is not None})
        labelled = any(label_column in r for r in dicts)  # a label table needs no captions
        required = [(image_column, "--image-column")] + ([] if labelled else [(caption_column, "--caption-column")])
        for name, flag in required:
            if not any(name in r for r in dicts):
                raise MMError(f"column {name!r} not in {table.name} (columns: {', '.join(columns)}); "
                              f"pass {flag} NAME")
    base = table.parent
    items = []
    for i, row in enumerate(rows):
        where = f"{table.name}:{i + 1}"
        if not isinstance(row, dict):
            items.append(Item(image="", source=where, skip=BAD_ROW))
            continue
        path = row.get(image_column)
        meta = {k: v for k, v in row.items()
                if k not in (image_column, caption_column, label_column, None) and k not in RESERVED_JSON}
        if not isinstance(path, str) or not path.strip():
            items.append(Item(image="", source=where, skip=BAD_ROW))
            continue
        path = path.strip()
        if "://" in path:
            items.append(Item(image=path, source=path, skip=IMAGE_IS_URL))
            continue
        full = Path(path).expanduser()
        full = full if full.is_absolute() else base / full
        items.append(Item(image=str(full), source=path, caption=row.get(caption_column), meta=meta,
                          labelled=label_column in row, label=row.get(label_column)))
    return items


# ----------------------------------------------------------------------------- one sample

def clean_caption(value) -> str:
    """A one-line caption from a table value or sidecar bytes, or :class:`ImageSkip`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ImageSkip(CAPTION_NOT_UTF8) from None
    if isinstance(value, list):  # several captions per image (COCO style): the first
        value = next((v for v in value if isinstance(v, str) and v.strip()), value[0] if value else None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or not isinstance(value, str):
        raise ImageSkip(MISSING_CAPTION)
    try:
        value.encode("utf-8")  # lone surrogates = invalid bytes kept by surrogateescape
    except UnicodeEncodeError:
        raise ImageSkip(CAPTION_NOT_UTF8) from None
    text = " ".join(value.split())
    if not text:
        raise ImageSkip(EMPTY_CAPTION)
    return text


def clean_label(value, classes: tuple[str, ...] = ()) -> str:
    """A class label from a folder name or a table value, or :class:`ImageSkip`."""
    if value is None:
        raise ImageSkip(MISSING_LABEL)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ImageSkip(LABEL_NOT_STRING, repr(value)[:40])
    text = " ".join(str(value).split())
    try:
        text.encode("utf-8")  # lone surrogates = invalid bytes kept by surrogateescape
    except UnicodeEncodeError:
        raise ImageSkip(LABEL_NOT_UTF8) from None
    if not text:
        raise ImageSkip(EMPTY_LABEL)
    if classes and text not in classes:
        raise ImageSkip(UNKNOWN_LABEL, text)
    return text


def _caption(item: Item) -> str:
    """The cleaned caption; for a labelled item a missing or empty one is allowed ("")."""
    raw = _read(item.caption_file) if item.caption_file else item.caption
    try:
        return clean_caption(raw)
    except ImageSkip as e:
        if item.labelled and e.reason in (MISSING_CAPTION, EMPTY_CAPTION):
            return ""
        raise


def process_item(item: Item, opts: Options) -> tuple:
    """``("ok", image_bytes, caption, json_meta, digest)`` or ``("skip", reason, detail)``.

    Runs in worker processes; never raises for bad input.
    """
    try:
        if item.skip:
            raise ImageSkip(item.skip)
        label = clean_label(item.label, opts.classes) if item.labelled else None
        caption = _caption(item)
        im, (width, height) = load_rgb(_read(item.image), opts.max_pixels, opts.resize)
        digest = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
        data = encode_image(im, opts.fmt, opts.quality)
    except ImageSkip as e:
        return ("skip", e.reason, e.detail)
    meta = {"caption": caption, "source": item.source, "width": width, "height": height,
            "sha256": digest, **item.meta}
    if label is not None:
        meta["label"] = label
    if not caption:  # a labelled image without a caption: no caption key, no .txt
        del meta["caption"]
    if item.boxes is not None:  # in pixels of the written image (after --resize)
        meta.update(box_meta(item.boxes, (width, height), opts.resize))
    return ("ok", data, caption, meta, digest)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageSkip(MISSING_IMAGE, path) from None
    except IsADirectoryError:
        raise ImageSkip(MISSING_IMAGE, f"{path} is a folder") from None
    except OSError as e:
        raise ImageSkip(UNREADABLE_FILE, f"{path}: {e.strerror or e}") from None


def _results(items: list[Item], opts: Options, workers: int):
    """Processed items in source order, decoded in ``workers`` processes."""
    if workers <= 1 or len(items) < 2:
        for item in items:
            yield process_item(item, opts)
        return
    from functools import partial

    # spawn, not fork: the caller may hold threads (torch, tokenizers) that fork would copy.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        chunk = max(1, min(32, len(items) // (workers * 8)))
        yield from pool.imap(partial(process_item, opts=opts), items, chunksize=chunk)


# ----------------------------------------------------------------------------- the command

def ingest(src: str | Path, out: str | Path, *, image_column: str = "image", caption_column: str = "caption",
           resize: int = 0, fmt: str = "png", quality: int = 95, samples_per_shard: int = 1000,
           workers: int = 1, dedup: bool = False, max_pixels: int = 89_478_485, images: str | Path = "",
           label_column: str = "label", classes: list[str] | tuple[str, ...] = ()) -> dict:
    """Write shards of ``src`` into ``out``; returns the summary (also saved as JSON)."""
    from mm.data.shards import ShardWriter  # imports webdataset: only when writing

    src, out = Path(src).expanduser(), Path(out).expanduser()
    _check_options(out, resize, quality, samples_per_shard, workers, max_pixels)
    coco = None
    if is_coco_file(src):  # COCO instances json: boxes into the sample json (mm.data.coco)
        rows, coco = coco_source(src, Path(images).expanduser() if images else None)
        kind, items, ignored = "coco", [Item(**row) for row in rows], 0
    else:
        kind, items, ignored = list_source(src, image_column, caption_column, exclude=out.resolve(),
                                           label_column=label_column)
    opts = Options(fmt=fmt, quality=quality, resize=resize, max_pixels=max_pixels,
                   classes=tuple(dict.fromkeys(c.strip() for c in classes if c.strip())))

    skipped, examples, seen, labels = Counter(), {}, set(), Counter()
    written, boxes_dropped = 0, 0
    with ShardWriter(out, prefix="shards", samples_per_shard=samples_per_shard) as writer:
        for item, result in zip(items, _results(items, opts, workers)):
            if result[0] == "ok" and dedup:
                if result[4] in seen:
                    result = ("skip", DUPLICATE, "")
                else:
                    seen.add(result[4])
            if result[0] == "skip":
                skipped[result[1]] += 1
                examples.setdefault(result[1], [])
                if len(examples[result[1]]) < 5:
                    examples[result[1]].append(item.source)
                continue
            _, data, caption, meta, _ = result
            boxes_dropped += meta.get("boxes_dropped", 0)
            sample = {"__key__": f"{written:09d}", fmt: data, "json": meta}
            if caption:
                sample["txt"] = caption
            if "label" in meta:
                labels[meta["label"]] += 1
            writer.write(sample)
            written += 1
    summary = {"source": str(src), "kind": kind, "out": str(out), "ingested": written,
               "skipped_total": sum(skipped.values()), "skipped": dict(sorted(skipped.items())),
               "skipped_examples": dict(sorted(examples.items())), "ignored_files": ignored,
               "shards": len(writer.sizes), "format": fmt, "resize": resize, "dedup": dedup}
    if labels:
        summary["labels"] = dict(sorted(labels.items()))
    if coco is not None:
        summary.update(box_summary(coco, boxes_dropped))
        write_categories(out, coco["categories"])
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def _check_options(out: Path, resize, quality, samples_per_shard, workers, max_pixels) -> None:
    if out.exists() and not out.is_dir():
        raise MMError(f"--out {out} is a file; give a folder for the shards")
    if out.is_dir() and any(out.glob("*.tar")):
        raise MMError(f"{out} already holds shards; choose an empty folder or delete them first")
    for name, value, low in (("--resize", resize, 0), ("--samples-per-shard", samples_per_shard, 1),
                             ("--workers", workers, 1), ("--max-pixels", max_pixels, 1)):
        if value < low:
            raise MMError(f"{name} must be >= {low}, got {value}")
    if not 1 <= quality <= 100:
        raise MMError(f"--quality must be in 1..100, got {quality}")


def format_summary(s: dict) -> str:
    lines = [(f"ingested {s['ingested']} samples from {s['kind']} {s['source']} into "
              f"{s['shards']} shard(s) in {s['out']}"),
             f"skipped {s['skipped_total']}" + (":" if s["skipped"] else "")]
    for reason, n in s["skipped"].items():
        lines.append(f"  {reason:<22} {n:>8}   e.g. {', '.join(s['skipped_examples'][reason][:2])}")
    if s["ignored_files"]:
        lines.append(f"ignored {s['ignored_files']} files that are neither images nor .txt captions")
    if s.get("labels"):
        shown = ", ".join(f"{k} {v}" for k, v in list(s["labels"].items())[:10])
        lines.append(f"labels: {len(s['labels'])} classes ({shown}{', ...' if len(s['labels']) > 10 else ''})")
    lines += format_box_summary(s)
    return "\n".join(lines)


def cli_ingest(args: argparse.Namespace) -> int:
    summary = ingest(args.src, args.out, image_column=args.image_column, caption_column=args.caption_column,
                     resize=args.resize, fmt=args.format, quality=args.quality,
                     samples_per_shard=args.samples_per_shard, workers=args.workers,
                     dedup=args.dedup, max_pixels=args.max_pixels, images=getattr(args, "images", ""),
                     label_column=args.label_column, classes=[c for c in args.classes.split(",") if c.strip()])
    print(format_summary(summary))
    if summary["ingested"] == 0:
        raise MMError(f"no samples ingested from {args.src} (see the reasons above and "
                      f"{Path(args.out) / SUMMARY}); fix the source and run again")
    return 0
