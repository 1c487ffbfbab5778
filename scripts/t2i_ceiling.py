"""The T2I ceiling of a VQ tokenizer: the shapes detector's compositional score on VQ
reconstructions of the held-out prompts' true renders (mm.eval.t2i.t2i_ceiling).

    python scripts/t2i_ceiling.py --vq runs/vq_shapes48/final [--num-prompts 60] [--renders 4]

A text-to-image model decoding through this VQ cannot score above this; DESIGN.md §6 asks for
>= 98 % before a T2I score is read as a measure of the model.
"""

import argparse
import json

import torch

from mm.eval.t2i import t2i_ceiling
from mm.models.vq import VQTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vq", required=True, help="a VQ tokenizer folder (RUN/final of a vq run)")
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--renders", type=int, default=4, help="renders per prompt (different seeds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vq = VQTokenizer.from_pretrained(args.vq).eval()
    with torch.no_grad():
        out = t2i_ceiling(vq, args.num_prompts, vq.cfg.image_size, args.seed, args.renders)
    pct = {k: round(100 * v, 1) for k, v in out.items() if isinstance(v, float)}
    print(json.dumps({"vq": args.vq, "image_size": vq.cfg.image_size, "images": out["images"],
                      "ceiling": pct, "per_tag": {k: round(100 * v, 1) for k, v in out["per_tag"].items()},
                      "raw": round(100 * out["raw"]["overall"], 1)}, indent=1))


if __name__ == "__main__":
    main()
