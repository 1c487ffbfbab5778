"""Which prompt words does a text-to-image model bind? The likelihood probe of mm.eval.t2i_probe
on held-out shapes images (val or test split), printed as JSON. Usage:

    python scripts/t2i_probe.py --model RUN/final --data DATA_ROOT [--max-images 500] [--out probe.json]
        [--bookkeeping 8]

--bookkeeping S adds mm.eval.t2i_probe.bookkeeping with S sampled continuations per image: does the
model know what it has drawn (P(no object) after empty rows, P(a second object) after the first)?
"""

from __future__ import annotations

import argparse
import json

from mm.eval.t2i_probe import bookkeeping, probe


def main(argv=None) -> int:
    from mm.tasks.pretrain import _eval_setup, _take

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an exported pretraining folder (RUN/final)")
    p.add_argument("--data", required=True, help="shapes shards (a data set root uses its test split)")
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="")
    p.add_argument("--bookkeeping", type=int, default=0, help="sampled continuations per image (0 = skip)")
    args = p.parse_args(argv)
    if args.bookkeeping < 0:
        p.error(f"--bookkeeping must be >= 0, got {args.bookkeeping}")
    model, tokenizer, vq, device, loader = _eval_setup(args)
    batches = list(_take(loader, args.max_images, device))  # read once: both probes see the same images
    result = probe(model, tokenizer, vq, batches, args.max_images, device)
    if args.bookkeeping:
        result["bookkeeping"] = bookkeeping(model, tokenizer, vq, batches, args.max_images, device, args.bookkeeping)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
