"""Scaling curves: training tokens/s against model size, sampling time against image tokens.

1. **Training step vs preset** (debug → tiny → small → base, i.e. width 32 → 640, depth 2 → 12):
   one text-to-image step (text encoder → backbone over the codes → next-code cross-entropy →
   backward → AdamW) of ``create_model(preset)`` at the preset's reference vocabulary, codebook,
   code grid and text length, batch ``--batch``. Image tokens/s and model FLOP/s (FLOPs counted
   by torch.utils.flop_counter for forward + backward) per preset, fp32 and bf16 autocast.
2. **Sampling vs image tokens**: the cached sampler (``mm.generation.sampler.sample_codes``,
   top-k 50, batch 4, no guidance) of one preset (``--sample-preset``, default small) with its
   code grid set to 8×8, 16×16, 24×24 and 32×32 (64 → 1024 tokens); seconds per batch and
   milliseconds per token. Constant ms/token means each step costs the same wherever it is.

Plots (matplotlib, Agg) go to ``--plots`` (default scripts/bench/plots/), each well under 100 KB.

    /work/venv/bin/python scripts/bench/scaling.py --json bench_scaling.json
    /work/venv/bin/python scripts/bench/scaling.py --quick      # debug/tiny/small, tiny sampler
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mm.generation.sampler import SamplingParams, sample_codes, seeds_tensor
from mm.models.presets import create_model, preset_config

PLOTS = Path(__file__).resolve().parent / "plots"


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def t2i_batch(cfg, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = cfg.code_grid
    text = torch.randint(5, cfg.vocab_size, (batch, cfg.text_max_len), generator=g)
    mask = torch.ones(batch, cfg.text_max_len, dtype=torch.bool)
    mask[:, cfg.text_max_len * 3 // 4:] = False  # padded captions, as real batches have
    codes = torch.randint(0, cfg.codebook_size, (batch, h, w), generator=g)
    return {"text": text, "mask": mask, "codes": codes}


def t2i_loss(model, b: dict) -> torch.Tensor:
    states, mask = model.encode_prompt(b["text"], b["mask"])  # (B, Lt, D)
    logits = model.t2i_logits(b["codes"], states, mask)  # (B, N, K)
    return F.cross_entropy(logits.float().flatten(0, 1), b["codes"].flatten())


def step_flops(model, b: dict, dtype: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(dtype):
            loss = t2i_loss(model, b)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_point(preset: str, batch: int, dtype: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = create_model(preset).train()
    cfg = model.config
    b = t2i_batch(cfg, batch)
    flops = batch * step_flops(model, t2i_batch(cfg, 1), dtype)  # FLOPs are linear in the batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast(dtype):
            loss = t2i_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n_img = cfg.code_grid[0] * cfg.code_grid[1]
    return {"preset": preset, "width": cfg.width, "depth": cfg.depth, "params": model.num_params(),
            "image_tokens": n_img, "text_tokens": cfg.text_max_len, "batch": batch, "dtype": dtype,
            "step_s": t, "image_tokens_per_s": batch * n_img / t,
            "all_tokens_per_s": batch * (n_img + cfg.text_max_len) / t, "flops_per_step": flops,
            "gflops_per_s": flops / t / 1e9}


@torch.no_grad()
def sample_point(preset: str, side: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model(preset, code_grid=[side, side]).eval()
    cfg = model.config
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.text_max_len))
    text = model.encode_prompt(ids, torch.ones_like(ids, dtype=torch.bool))
    seeds = seeds_tensor(0, batch)
    params = SamplingParams(guidance_scale=1.0, top_k=50)
    sample_codes(model, text, seeds, params)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_codes(model, text, seeds, params)
        times.append(time.perf_counter() - t0)
    t, n = min(times), side * side
    return {"preset": preset, "image_tokens": n, "batch": batch, "seconds": t, "ms_per_token": 1000 * t / n,
            "tokens_per_s": batch * n / t}


def plot_training(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    ax2 = ax1.twinx()
    for dtype, style in (("fp32", "o-"), ("bf16", "s--")):
        pts = [p for p in points if p["dtype"] == dtype]
        if not pts:
            continue
        x = [p["params"] / 1e6 for p in pts]
        ax1.plot(x, [p["image_tokens_per_s"] for p in pts], style, color="C0", label=f"image tokens/s {dtype}")
        ax2.plot(x, [p["gflops_per_s"] for p in pts], style, color="C3", label=f"GFLOP/s {dtype}")
        for p, xi in zip(pts, x):
            if dtype == "fp32":
                ax1.annotate(f"{p['preset']}\n{p['width']}x{p['depth']}", (xi, p["image_tokens_per_s"]),
                             fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.margins(x=0.2, y=0.2)  # room for the preset labels
    ax1.set_xlabel("parameters (M)")
    ax1.set_ylabel("image tokens/s (train step)", color="C0")
    ax2.set_ylabel("model GFLOP/s", color="C3")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax1.set_title("T2I training step vs preset (width x depth)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sampling(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    ax2 = ax1.twinx()
    x = [p["image_tokens"] for p in points]
    ax1.plot(x, [p["seconds"] for p in points], "o-", color="C0", label="seconds per batch of 4")
    ax2.plot(x, [p["ms_per_token"] for p in points], "s--", color="C3", label="ms per token (batch step)")
    ax1.set_xlabel("image tokens per image")
    ax1.set_ylabel("seconds", color="C0")
    ax2.set_ylabel("ms per token", color="C3")
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax1.set_xticks(x)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax1.set_title(f"Sampling time vs image tokens ({points[0]['preset']} preset, KV cache)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["debug", "tiny", "small", "base"])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per point (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sample-preset", default="small")
    ap.add_argument("--sides", type=int, nargs="+", default=[8, 16, 24, 32], help="code grid sides")
    ap.add_argument("--repeats", type=int, default=2, help="timed sampling runs per point (best)")
    ap.add_argument("--plots", default=str(PLOTS), help="folder for the PNG plots")
    ap.add_argument("--quick", action="store_true", help="debug/tiny/small, fp32, 1 step; tiny sampler, 1 run")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.presets = [p for p in args.presets if p in ("debug", "tiny", "small")]
        args.dtypes, args.steps, args.warmup, args.repeats = "fp32", 1, 1, 1
        args.sample_preset, args.sides = "tiny", [8, 16, 32]
    for p in args.presets + [args.sample_preset]:
        preset_config(p)  # unknown names fail here, before any timing

    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick,
           "train": [], "sample": [], "plots": {}}
    for dtype in args.dtypes.split(","):
        for preset in args.presets:
            r = train_point(preset, args.batch, dtype, args.steps, args.warmup)
            res["train"].append(r)
            print(f"train {dtype} {preset:6s} {r['width']:4d}x{r['depth']:<2d} {r['params'] / 1e6:7.2f}M  "
                  f"{r['step_s'] * 1000:8.1f} ms/step  {r['image_tokens_per_s']:8.0f} image tok/s  "
                  f"{r['gflops_per_s']:6.1f} GFLOP/s", flush=True)
    for side in args.sides:
        r = sample_point(args.sample_preset, side, 4, args.repeats)
        res["sample"].append(r)
        print(f"sample {args.sample_preset} {r['image_tokens']:5d} tokens: {r['seconds']:6.2f} s/batch, "
              f"{r['ms_per_token']:6.2f} ms/token", flush=True)

    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    plot_training(res["train"], plots / "scaling_train.png")
    plot_sampling(res["sample"], plots / "scaling_sample.png")
    res["plots"] = {"train": str(plots / "scaling_train.png"), "sample": str(plots / "scaling_sample.png")}
    for path in res["plots"].values():
        print(f"wrote {path} ({Path(path).stat().st_size / 1024:.0f} KB)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
