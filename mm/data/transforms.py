"""Per-sample checks and image transforms for the streaming pipeline (PIL + numpy, no torchvision).

Two steps with different costs:

- :func:`check_sample` is cheap (parses headers, never decodes pixels). It decides whether a raw
  sample is usable and, if not, names the reason. The pipeline runs it on every raw sample, also
  while fast-forwarding to ``start_batch``, so batch boundaries do not depend on decoding.
- :func:`load_image` decodes, crops and resizes. Its randomness comes from
  :func:`sample_seed` (sample key, epoch, seed), never from a global RNG, so a resumed stream
  crops every image exactly as the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings

import numpy as np
from PIL import Image

from mm.data.shards import questions_of

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")

# Random-resized-crop jitter: the crop keeps 80–100 % of the centred square's area and bends its
# aspect ratio by at most 10 %. No horizontal flip: captions say "left" and "right".
CROP_AREA = (0.8, 1.0)
CROP_RATIO = (0.9, 1.0 / 0.9)


def sample_seed(*parts) -> int:
    """A stable 63-bit seed from strings/ints (Python's ``hash`` of a str differs per process)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_key(sample: dict) -> str | None:
    return next((k for k in IMAGE_KEYS if k in sample), None)


def _check_image(data: bytes) -> str | None:
    """Reason the image bytes are unusable, or None. Header + CRC checks only, no pixel decode."""
    if len(data) == 0:
        return "empty_file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()  # PNG: walks every chunk and checks its CRC, so truncation shows up
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "decompression_bomb"
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, SyntaxError, OSError, …
        return "not_image"
    # JPEG verify() reads only the header; a cut-off file lacks the end-of-image marker.
    if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "not_image"
    return None


def check_sample(sample: dict, mode: str) -> str | None:
    """Why a raw webdataset sample cannot be used in ``mode`` (a short reason), or None if fine.

    Also parses the optional json and text fields in place (``sample["meta"]``,
    ``sample["caption"]``) so later steps do not parse them twice.
    """
    key = image_key(sample)
    if key is None:
        return "missing_image"
    reason = _check_image(sample[key])
    if reason:
        return reason
    try:
        sample["meta"] = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return "bad_json"
    if not isinstance(sample["meta"], dict):
        return "bad_json"
    try:
        caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    except UnicodeDecodeError:
        return "bad_caption"
    if mode == "caption" and not caption:
        return "missing_caption"
    sample["caption"] = caption
    if mode == "vqa":
        qa = questions_of(sample["meta"])
        if not isinstance(qa, list) or not qa:
            return "no_questions"
        if not all(isinstance(q, dict) and isinstance(q.get("answers", []), list) for q in qa):
            return "bad_json"
    return None


def crop_box(width: int, height: int, augment: bool, seed: int) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) box to resize to the output square.

    Without augmentation: the centred square. With augmentation: a square-ish box of 80–100 % of
    that area at a random place, drawn from ``seed`` only.
    """
    side = min(width, height)
    if not augment:
        x0, y0 = (width - side) / 2, (height - side) / 2
        return x0, y0, x0 + side, y0 + side
    rng = np.random.default_rng(seed)
    area = side * side * rng.uniform(*CROP_AREA)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = min(width, math.sqrt(area * ratio))
    h = min(height, math.sqrt(area / ratio))
    x0 = rng.uniform(0, width - w)
    y0 = rng.uniform(0, height - h)
    return x0, y0, x0 + w, y0 + h


def box_grid_span(bbox, frame: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1): the rows r0..r1-1 and columns c0..c1-1 of an h x w grid laid on the model's
    image that a box (x0, y0, x1, y1; x1/y1 exclusive, in the pixels of the stored ``frame``
    (width, height)) touches, through the centred square crop the model sees."""
    cx0, cy0, cx1, _ = crop_box(round(frame[0]), round(frame[1]), False, 0)
    side, (h, w) = cx1 - cx0, grid
    x0, y0, x1, y1 = ((v - c) / side for v, c in zip(bbox, (cx0, cy0, cx0, cy0)))  # [0, 1]
    # the epsilon absorbs float rounding at cell edges
    r0, r1 = max(math.floor(y0 * h + 1e-6), 0), min(math.ceil(y1 * h - 1e-6), h)
    c0, c1 = max(math.floor(x0 * w + 1e-6), 0), min(math.ceil(x1 * w - 1e-6), w)
    return r0, r1, c0, c1


def load_image(data: bytes, size: int, augment: bool = False, seed: int = 0) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 RGB array (crop, then resize)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the output is much smaller:
            # the box below is then computed on the reduced image. Keeps at least ~1.25x size.
            im.draft("RGB", (math.ceil(size * 1.25), math.ceil(size * 1.25)))
        im = im.convert("RGB") if im.mode != "RGB" else im  # ingest already made shards RGB
        box = crop_box(im.width, im.height, augment, seed)
        if im.size == (size, size) and box == (0, 0, size, size):
            out = im
        else:
            out = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(out, dtype=np.uint8)


def to_tensor(images: list[np.ndarray]):
    """Stack (H, W, 3) uint8 arrays into a float (B, 3, H, W) tensor in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.stack(images))  # (B, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W)
