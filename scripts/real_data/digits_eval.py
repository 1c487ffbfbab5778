"""Does a model pretrained on the digits of ``scripts/real_data/digits.py`` work? Two checks and a grid.

    python scripts/real_data/digits_eval.py --model RUN/final --data data/digits_src --out digits_eval/

- **text-to-image**: ``--per-digit`` images for "a handwritten {zero…nine}"; each is shrunk back to
  8×8 and read by a logistic regression fitted on the train split's real scans (its accuracy on
  the real val scans is printed beside it, the ceiling of this reader). Reported: the share read
  as the prompt's digit.
- **captioning**: greedy captions of the val images; a caption is right when the one digit it
  names (as a word or a numeral) is the image's.

Writes ``grid.png`` (one row per digit), ``captions.txt`` and ``digits_eval.json`` into ``--out``.
Needs scikit-learn (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def scans(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) 8×8 scans in 0..16 and (N,) digits, read back from the written images and captions."""
    xs, ys = [], []
    for png in sorted(folder.glob("*.png")):
        xs.append(to_scan(Image.open(png)))
        ys.append(digit_named(png.with_suffix(".txt").read_text()))
    return np.stack(xs), np.array(ys)


def to_scan(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).reshape(-1) * 16 / 255


def digit_named(text: str) -> int | None:
    """The one digit a caption names (word or numeral), else None."""
    found = {WORDS.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in WORDS}
    found |= {int(c) for c in re.findall(r"\d", text)}
    return found.pop() if len(found) == 1 else None


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    from mm.generation import TextToImagePipeline
    from mm.generation.pipeline import to_tensor
    from mm.generation.text import generate_captions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the folder digits.py wrote (train/ and val/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train = scans(data / "train")
    x_val, y_val = scans(data / "val")
    reader = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    reader_val = float((reader.predict(x_val) == y_val).mean())

    pipe = TextToImagePipeline.from_pretrained(args.model)
    prompts = [f"a handwritten {w}" for w in WORDS]
    images = pipe(prompts, num_images_per_prompt=args.per_digit, guidance_scale=args.guidance, seed=0)
    read = reader.predict(np.stack([to_scan(im) for im in images]))
    target = np.repeat(np.arange(10), args.per_digit)
    t2i = float((read == target).mean())
    per_digit = {w: float((read[target == d] == d).mean()) for d, w in enumerate(WORDS)}

    size, cols = images[0].width, min(args.per_digit, 10)
    grid = Image.new("RGB", (cols * (size + 2), 10 * (size + 2)), "white")
    for d in range(10):
        for j in range(cols):
            grid.paste(images[d * args.per_digit + j], (j * (size + 2), d * (size + 2)))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(out / "grid.png")

    model, tokenizer = pipe.model, pipe.tokenizer
    pngs = sorted((data / "val").glob("*.png"))
    x = to_tensor([Image.open(p) for p in pngs], model.config.image_size)  # (N, 3, S, S) in [-1, 1]
    captions = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            captions += generate_captions(model, tokenizer, x[i:i + 64].to(pipe.device))
    named = [digit_named(c) for c in captions]
    caption_acc = float(np.mean([n == y for n, y in zip(named, y_val)]))
    (out / "captions.txt").write_text("".join(f"{p.name}\t{y}\t{c}\n" for p, y, c in zip(pngs, y_val, captions)))

    result = {"t2i_read_as_prompt": t2i, "t2i_per_digit": per_digit, "reader_val_accuracy": reader_val,
              "caption_names_the_digit": caption_acc, "images": len(images), "val_images": len(pngs),
              "guidance": args.guidance}
    (out / "digits_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
