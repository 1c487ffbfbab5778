"""How high can retrieval R@1 go on the shapes test split? An estimate of the ceiling.

Shapes captions describe an image only in part ("a yellow diamond in the top left" is also true
of other images with a yellow diamond there), and retrieval counts only an image's own caption
as its positive. A perfect model therefore ties the true pairs and, on average, ranks the right
one first with probability 1/n, n = the number of candidates the caption is true of.

This script collects, for each test image, the captions that are TRUE of it by running the
caption templates (mm.data.shapes_text) many times with fresh random draws, then reports

    text->image ceiling = mean over distinct test captions of 1 / #test images it is true of
    image->text ceiling = mean over test images of 1 / #test captions true of it

    python scripts/shapes_retrieval_ceiling.py [--samples 500] [--draws 400]

The draws give a lower bound on each image's set of true captions (so an upper bound on the
ceiling); the script prints the fraction of images whose own caption it recovered.
"""

from __future__ import annotations

import argparse

import numpy as np

from mm.data import shapes_text
from mm.data.shapes import make_sample

MAKERS = (shapes_text._caption_listing, shapes_text._caption_positions, shapes_text._caption_relation)
LEVELS = (50, 130, 200)  # background words dark / gray / light: the level is not kept in the metadata


def true_captions(meta: dict, draws: int, seed: int = 1) -> set[str]:
    rng = np.random.default_rng(seed)
    background = {"texture": meta["background"]["texture"], "level": 0}
    found = set()
    for _ in range(draws):
        for maker in MAKERS:
            for level in LEVELS:
                background["level"] = level
                text = maker(rng, meta["objects"], background)
                if text:
                    found.add(text)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=500, help="test images (the demo evaluates 500)")
    ap.add_argument("--draws", type=int, default=400, help="template draws per image")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = ap.parse_args()
    metas = [make_sample(args.seed, "test", i, 32)["json"] for i in range(args.samples)]
    truth = [true_captions(m, args.draws) for m in metas]
    captions = list(dict.fromkeys(m["caption"] for m in metas))
    per_text = [sum(c in t for t in truth) for c in captions]
    per_image = [sum(c in t for c in captions) for t in truth]
    recovered = np.mean([m["caption"] in t for m, t in zip(metas, truth)])
    print(f"{args.samples} test images, {len(captions)} distinct captions; own caption recovered for "
          f"{100 * recovered:.1f}% of images")
    print(f"captions true of more than one image: {100 * np.mean([n > 1 for n in per_text]):.1f}%")
    print(f"R@1 ceiling text->image: {100 * np.mean([1 / max(1, n) for n in per_text]):.1f}%")
    print(f"R@1 ceiling image->text: {100 * np.mean([1 / max(1, n) for n in per_image]):.1f}%")


if __name__ == "__main__":
    main()
