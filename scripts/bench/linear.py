"""Why a decode-size linear layer ran at a quarter of the memory bandwidth: one product, four kernels.

Issue 16 measured 5-8 GB/s for the linear layers of a batch-8 decode step against 28 GB/s of
streaming bandwidth. This probe times the same products through each kernel torch offers on a CPU:

- ``aten``: ``F.linear`` as every model calls it; fp32 goes to MKL's sgemm (on AMD CPUs MKL takes
  a slower code path), bf16 to oneDNN;
- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` with the plain (N, K) weight — what
  ``mm.nn.linear`` calls for fp32 on a CPU;
- ``packed``: the same with the weight packed once for the row count
  (``torch.ops.mkldnn._reorder_linear_weight``) — what ``mm.nn.linear.packed_for_rows`` does while
  decoding.

Decode table: ``--layers`` weights of ``--k`` x ``--n`` (default 32 x 512 x 2048 = 134 MB fp32,
more than the last-level cache, so the weights stream from memory as in a real decode step) at
1, 4, 8, 16 rows; GB/s = weight bytes / time. Training table: GFLOP/s of the three products of a
training step (forward, dx = g W, dW = gᵀ x) at training sizes. The stream bandwidth (``x.sum()``
over 256 MB) is measured in the same run.

    python scripts/bench/linear.py [--threads 2] [--json linear.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def best_time(fn, inner: int, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def stream_gb_s() -> float:
    x = torch.randn(64 * 1024 * 1024)  # 256 MB
    return x.numel() * 4 / best_time(x.sum, 5) / 1e9


def decode_table(layers: int, k: int, n: int, rows_list) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(n, k).to(dtype) for _ in range(layers)]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        for rows in rows_list:
            x = torch.randn(rows, k).to(dtype)
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
            kernels = {"aten": lambda: [F.linear(x, w) for w in ws],
                       "onednn": lambda: [onednn(x, w) for w in ws],
                       "packed": lambda: [onednn(x, p) for p in packed]}
            row = {}
            for name, fn in kernels.items():
                t = best_time(fn, 10)
                row[name] = {"ms": 1e3 * t, "gb_s": nbytes / t / 1e9}
            key = f"{str(dtype).replace('torch.', '')} rows {rows}"
            out[key] = row
            print(f"  {key:18s} " + "  ".join(f"{k_}: {v['ms']:6.2f} ms {v['gb_s']:5.1f} GB/s" for k_, v in row.items()),
                  flush=True)
    return out


def training_table(shapes) -> dict:
    out = {}
    for m, k, n in shapes:
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flops = 2 * m * k * n
        kernels = {"aten fwd": lambda: F.linear(x, w), "aten dx": lambda: g @ w, "aten dW": lambda: g.t() @ x,
                   "onednn fwd": lambda: onednn(x, w), "onednn dx": lambda: onednn(g, w.t()),
                   "onednn dW": lambda: onednn(g.t(), x.t())}
        row = {name: flops / best_time(fn, 3) / 1e9 for name, fn in kernels.items()}
        out[f"{m}x{k}->{n}"] = row
        print(f"  {m}x{k}->{n}: " + "  ".join(f"{k_} {v:4.0f}" for k_, v in row.items()) + " GFLOP/s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN (torch.backends.mkldnn): nothing to compare")
    torch.manual_seed(0)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    res["stream_gb_s"] = stream_gb_s()
    print(f"stream bandwidth {res['stream_gb_s']:.1f} GB/s, {res['threads']} threads", flush=True)
    print(f"decode-size products ({a.layers} weights {a.n} x {a.k}):", flush=True)
    res["decode"] = decode_table(a.layers, a.k, a.n, [int(r) for r in a.rows.split(",")])
    print("training-size products:", flush=True)
    res["training"] = training_table([(4608, 256, 1024), (4608, 1024, 256), (4096, 512, 2048)])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
