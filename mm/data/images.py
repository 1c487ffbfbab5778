"""Loading real-world image files safely and turning them into clean RGB training images.

Real image folders contain everything: zero-byte and truncated downloads, HTML saved as
``.jpg``, palette images with a transparent colour, CMYK scans, 16-bit greyscale, phone photos
that are stored sideways with an EXIF orientation tag, animated GIFs and decompression bombs.
:func:`load_rgb` either returns an 8-bit RGB image that looks as the file is meant to look, or
raises :class:`ImageSkip` with a short machine-readable reason that the caller counts.

Rules (the same for every tool that reads images from disk):
- transparency (RGBA, LA, PA, P with a transparent colour) is composited on white;
- 16-bit and 32-bit greyscale (I;16*, I, F) is scaled to 8 bits, not clipped;
- the EXIF orientation is applied, so width and height are the displayed ones;
- animations keep their first frame;
- images with more than ``max_pixels`` pixels are refused before decoding (PIL's own
  DecompressionBombWarning/Error are turned into the same skip).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Skip reasons, as counted in ingest summaries.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_or_corrupt"
BOMB = "decompression_bomb"
UNSUPPORTED_MODE = "unsupported_mode"

ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
WHITE = (255, 255, 255)


class ImageSkip(Exception):
    """The file cannot be used as an image; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image (first frame), or raise :class:`ImageSkip`."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return _decode(data, max_pixels, draft_size=0)[0]


def _decode(data: bytes, max_pixels: int, draft_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded image, stored size before any JPEG draft reduction)."""
    if len(data) == 0:
        raise ImageSkip(EMPTY_FILE)
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that. We set the limit to ours
    # for the duration of this call and turn the warning into an error, so one rule applies.
    # Truncated files must fail, whatever another library set LOAD_TRUNCATED_IMAGES to.
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _open_and_load(data, max_pixels, draft_size)
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


def _open_and_load(data: bytes, max_pixels: int, draft_size: int) -> tuple[Image.Image, tuple[int, int]]:
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip(BOMB, str(e)) from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError; broken headers raise all kinds
        raise ImageSkip(NOT_AN_IMAGE, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:  # also covers formats that do not check on open
        raise ImageSkip(BOMB, f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise ImageSkip(TRUNCATED, f"size {w}x{h}")
    if draft_size and im.format == "JPEG":
        # Decode big JPEGs at a reduced scale (still >= draft_size on both sides): much faster.
        im.draft(im.mode, (draft_size, draft_size))
    try:
        im.seek(0)  # animations: the first frame
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip(BOMB, str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated data: OSError; broken streams: many others
        raise ImageSkip(TRUNCATED, f"{type(e).__name__}: {e}") from None
    return im, (w, h)


def exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF must not cost the image
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparency on white, high bit depths scaled)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if (mode == "P" and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(im)).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV ...
    except Exception as e:  # noqa: BLE001 - a mode PIL cannot convert is a skip reason
        raise ImageSkip(UNSUPPORTED_MODE, f"mode {mode}: {e}") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(im: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit integer or float greyscale image."""
    if im.mode.startswith("I;16"):
        # np.asarray understands the I;16 byte orders; the full 16-bit range maps to 0..255.
        a = np.asarray(im).astype(np.float64) / 257.0
    else:
        a = np.asarray(im).astype(np.float64)
        top = a.max() if a.size else 0.0
        if im.mode == "F" and top <= 1.0:  # float images in [0, 1]
            a = a * 255.0
        elif top > 255.0:  # 16-bit data stored as I (older PIL, TIFF): same scale as I;16
            a = a / 257.0 if top <= 65535.0 else a * (255.0 / top)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size``, then cut the centre ``size`` x ``size`` square."""
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        # reducing_gap: a fast box pre-shrink for big downscales, then an accurate Lanczos.
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


def encode_image(im: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """PNG/JPEG/WebP bytes without metadata; the same pixels always give the same bytes."""
    if fmt not in ENCODE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {sorted(ENCODE_FORMATS)}")
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, optimize=False)
    else:
        im.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def load_rgb(source: str | Path | bytes, max_pixels: int, resize: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The training image from a file: decoded, EXIF-rotated, RGB, optionally resized + cropped.

    Returns ``(image, (width, height))`` where the size is the file's displayed size (after the
    EXIF rotation, before any resizing). Raises :class:`ImageSkip` for unusable files.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    im, (w, h) = _decode(data, max_pixels, draft_size=resize)
    before = im.size
    im = to_rgb(exif_transpose(im))
    if im.size != before:  # a 90/270 degree orientation swaps width and height
        w, h = h, w
    if resize:
        im = resize_center_crop(im, resize)
    # Drop metadata carried over by convert(): e.g. a CMYK ICC profile must not be written
    # into the RGB output file, and EXIF orientation has already been applied.
    im.info = {}
    return im, (w, h)
