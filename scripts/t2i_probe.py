"""Which prompt words does a text-to-image model bind? The likelihood probe of mm.eval.t2i_probe
on held-out shapes images (val or test split), printed as JSON. Usage:

    python scripts/t2i_probe.py --model RUN/final --data DATA_ROOT [--max-images 500] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json

from mm.eval.t2i_probe import probe


def main(argv=None) -> int:
    from mm.tasks.pretrain import _eval_setup

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an exported pretraining folder (RUN/final)")
    p.add_argument("--data", required=True, help="shapes shards (a data set root uses its test split)")
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    model, tokenizer, vq, device, loader = _eval_setup(args)
    result = probe(model, tokenizer, vq, loader, args.max_images, device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
