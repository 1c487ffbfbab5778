"""Benchmark the streaming pipeline: samples/s of decode + augment + tokenise.

Writes two shard sets into a temporary folder — shapes scenes as 32 px PNG and as 256 px JPEG
(with mild noise, so the files are photo-sized) — and measures, in one run:

- raw tar iteration of the shards with webdataset (no decoding): the ceiling;
- ``make_loader`` in train mode with augmentation and a byte-level BPE tokenizer, with 0, 1 and
  2 DataLoader workers, for each output size asked for.

The pipeline figure is the steady state after the first batch (which waits for the worker start
and the shuffle-buffer fill); the time to the first batch is reported beside it.

    /work/venv/bin/python scripts/bench/data.py --json bench_data.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mm.data.pipeline import make_loader
from mm.data.shapes import make_sample
from mm.data.shards import ShardWriter, expand_shards


class BPE:
    """A picklable ``encode(texts, max_len) -> (ids, mask)`` over a `tokenizers` BPE."""

    def __init__(self, captions: list[str], vocab_size: int = 512):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"],
                                                              show_progress=False))
        self.tok = tok

    def encode(self, texts, max_len):
        import torch

        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(list(texts))):
            row = enc.ids[:max_len]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 0


def write_sets(root: Path, n_png: int, n_jpg: int, per_shard: int) -> tuple[Path, Path, list[str]]:
    png, jpg, captions = root / "png32", root / "jpg256", []
    with ShardWriter(png, "shards", per_shard) as w:
        for i in range(n_png):
            s = make_sample(0, "train", i, 32)
            captions.append(s["txt"])
            w.write(s)
    rng = np.random.default_rng(0)
    with ShardWriter(jpg, "shards", max(1, per_shard // 4)) as w:
        for i in range(n_jpg):
            s = make_sample(1, "train", i, 256)
            pixels = np.asarray(Image.open(io.BytesIO(s.pop("png"))), dtype=np.int16)
            pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            s["jpg"] = buf.getvalue()
            w.write(s)
    return png, jpg, captions


def raw_rate(folder: Path) -> dict:
    """Samples/s and MB/s of plain webdataset tar iteration (bytes only, nothing decoded)."""
    import webdataset as wds

    urls = expand_shards(str(folder))
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    t0, n, nbytes = time.perf_counter(), 0, 0
    for sample in pipe:
        n += 1
        nbytes += sum(len(v) for v in sample.values() if isinstance(v, bytes))
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "MB_per_s": nbytes / dt / 1e6, "samples": n}


def pipeline_rate(folder: Path, workers: int, image_size: int, batch_size: int, batches: int,
                  tokenizer) -> dict:
    loader = make_loader([str(folder)], batch_size=batch_size, seed=0, num_workers=workers,
                         image_size=image_size, augment=True, tokenizer=tokenizer, shuffle_buffer=500)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t2 = time.perf_counter()
    del it
    return {"samples_per_s": batches * batch_size / (t2 - t1), "first_batch_s": t1 - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png-samples", type=int, default=4000)
    ap.add_argument("--jpg-samples", type=int, default=1200)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per configuration")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jpg-out", type=int, nargs="+", default=[64, 256], help="output sizes for the JPEG set")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "batch_size": args.batch_size, "batches": args.batches, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="mm-bench-data-") as tmp:
        t = time.perf_counter()
        png, jpg, captions = write_sets(Path(tmp), args.png_samples, args.jpg_samples, args.samples_per_shard)
        tokenizer = BPE(captions)
        print(f"wrote shards in {time.perf_counter() - t:.1f}s")
        for name, folder, sizes in (("png32", png, [32]), ("jpg256", jpg, args.jpg_out)):
            entry = {"raw_tar": raw_rate(folder), "pipeline": {}}
            print(f"{name}: raw tar {entry['raw_tar']['samples_per_s']:.0f} samples/s "
                  f"({entry['raw_tar']['MB_per_s']:.1f} MB/s)")
            for size in sizes:
                for w in args.workers:
                    r = pipeline_rate(folder, w, size, args.batch_size, args.batches, tokenizer)
                    entry["pipeline"][f"out{size}_workers{w}"] = r
                    print(f"{name} -> {size}px, {w} workers: {r['samples_per_s']:.0f} samples/s "
                          f"(first batch {r['first_batch_s']:.2f}s)")
            results["sets"][name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
