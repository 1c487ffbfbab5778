"""Benchmark the VQ image tokenizer: images/s of ``encode`` (image -> codes) and ``decode`` (codes -> image).

The tokenizers are built from shipped configs with random weights (speed does not depend on the
weights): the demo's (``configs/demo/vq.yaml``, 32 px, 16 channels), the shapes one
(``configs/vq/shapes.yaml``, 32 px, 32 channels) and the real-photo one (``configs/vq/real.yaml``,
128 px, 64 channels, factor 8, middle attention). Each in fp32 and under bf16 autocast; the
figure is the median over ``--repeats`` timed calls after one warm-up call, in inference mode.

    /work/venv/bin/python scripts/bench/vq.py --json bench_vq.json
    /work/venv/bin/python scripts/bench/vq.py --quick          # 32 px configs only, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {  # name -> (config file, batch size)
    "demo": ("configs/demo/vq.yaml", 64),
    "shapes": ("configs/vq/shapes.yaml", 64),
    "real128": ("configs/vq/real.yaml", 8),
}


def build(config_file: str):
    from mm.config import load_config
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    cfg = load_config(ROOT / config_file)
    torch.manual_seed(0)
    return VQTokenizer(VQTokenizerConfig.from_mm_config(cfg)).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(vq, batch: int, dtype: str, repeats: int) -> dict:
    size = vq.cfg.image_size
    images = torch.rand(batch, 3, size, size) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        codes = vq.encode(images)  # (B, h, w)
        t_enc = timed(lambda: vq.encode(images), repeats)
        t_dec = timed(lambda: vq.decode(codes), repeats)
    return {"image_size": size, "grid": list(codes.shape[1:]), "batch": batch,
            "encode_images_per_s": batch / t_enc, "decode_images_per_s": batch / t_dec,
            "encode_s": t_enc, "decode_s": t_dec}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="32 px configs only, 2 repeats")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs = [c for c in args.configs if c != "real128"] or ["demo"]
        args.repeats = 2
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick, "configs": {}}
    for name in args.configs:
        config_file, batch = CONFIGS[name]
        vq = build(config_file)
        params = sum(p.numel() for p in vq.parameters())
        entry = {"config": config_file, "params": params}
        for dtype in args.dtypes.split(","):
            r = entry[dtype] = bench_one(vq, batch, dtype, args.repeats)
            print(f"{name:8s} {dtype:5s} {r['image_size']:4d}px -> {r['grid'][0]}x{r['grid'][1]} codes, batch {batch}: "
                  f"encode {r['encode_images_per_s']:8.0f} img/s, decode {r['decode_images_per_s']:8.0f} img/s",
                  flush=True)
        results["configs"][name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
