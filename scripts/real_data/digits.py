"""A small real captioned image set that ships offline: scikit-learn's handwritten digits.

    pip install scikit-learn
    python scripts/real_data/digits.py --out data/digits_src        # images + same-named .txt captions
    mm data ingest data/digits_src/train --out data/digits/train
    mm data ingest data/digits_src/val --out data/digits/val

``sklearn.datasets.load_digits`` holds 1,797 real 8×8 scans (values 0–16) of digits written by 43
people (the UCI "Optical Recognition of Handwritten Digits" set); nothing is downloaded. Each scan
is upscaled to ``--size`` px (bicubic, light strokes on black, as scanned) and gets a caption that
names its digit in one of a few phrasings ("a handwritten seven", "the digit 7", ...), chosen by
its index so the set is the same on every machine. The last ``--val`` images are the val split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {w}", "the digit {d}", "a handwritten digit {w}", "the number {w} written by hand")


def caption(digit: int, index: int) -> str:
    return TEMPLATES[index % len(TEMPLATES)].format(w=WORDS[digit], d=digit)


def write(out: Path, size: int, val: int) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    counts = {}
    for i, (scan, digit) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i >= n - val else "train"
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.uint8(np.round(scan * 255 / 16)), "L").resize((size, size), Image.Resampling.BICUBIC)
        grey.convert("RGB").save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption(int(digit), i) + "\n")
        counts[split] = counts.get(split, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train/ and val/ (images + .txt captions)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--val", type=int, default=297, help="images held out for val (default 297)")
    args = parser.parse_args()
    if args.size < 8 or not 0 < args.val < 1797:
        parser.error("--size must be >= 8 and --val between 1 and 1796")
    for split, count in write(Path(args.out), args.size, args.val).items():
        print(f"{split}: {count} images in {Path(args.out) / split}")


if __name__ == "__main__":
    main()
