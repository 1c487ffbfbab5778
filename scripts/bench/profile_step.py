"""Profile what stands between mm and its performance goals (torch.profiler, CPU).

Two profiles, each of one call after warm-up:

- ``train``: one text-to-image training step of mm at the dimensions of
  ``scripts/bench/train_step.py`` (d 256, 6 blocks, 8 heads, MLP 1024, 32 text + 256 image
  tokens, batch 16; batch 4 with ``--quick``), fp32 and bf16 autocast: forward + backward + AdamW;
- ``decode``: 32 decode steps of the cached sampler at the dimensions of
  ``scripts/bench/sample.py`` (d 512, 8 blocks, SwiGLU, RMSNorm, batch 4; d 128 / 2 blocks with
  ``--quick``), without and with classifier-free guidance, and compiled (``decode_compiled``:
  ``sample_codes(compile=True)``'s step, compiled in the untimed warm-up).

For each: the top operators by self CPU time, the share of time in matrix multiplies
(mm/addmm/bmm/linear), attention kernels, and everything else (elementwise, norms, copies,
optimizer), the operator count per step, and the wall time not covered by any operator
(Python and dispatch overhead between kernels).

    /work/venv/bin/python scripts/bench/profile_step.py --json bench_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mm.generation.sampler import SamplingParams, decode_step_fn, guide, seeds_tensor
from mm.models.model import MMConfig, MMModel

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_mkldnn", "mkldnn", "aten::_addmm_activation")
ATTENTION = ("scaled_dot_product", "_flash_attention", "_efficient_attention")


def classify(name: str) -> str:
    if any(k in name for k in ATTENTION):
        return "attention"
    if any(name.startswith(k) or k in name for k in MATMUL):
        return "matmul"
    if "Optimizer" in name or "adamw" in name.lower() or "_foreach" in name:
        return "optimizer"
    return "other"


def summarize(prof, wall_s: float, calls: int, rows: int) -> dict:
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        k = classify(e.key)
        shares[k] = shares.get(k, 0.0) + e.self_cpu_time_total / max(total_us, 1)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"wall_ms": 1000 * wall_s / calls, "op_ms": total_us / 1000 / calls,
            "aten_ops_per_call": n_ops / calls, "shares": shares,
            "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / calls,
                     "share": e.self_cpu_time_total / max(total_us, 1), "calls": e.count / calls} for e in top]}


def run_profiled(fn, calls: int, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - t0
    return summarize(prof, wall, calls, rows)


def profile_train(quick: bool, dtype: str, rows: int) -> dict:
    side, batch, text_len = 16, 4 if quick else 16, 32
    cfg = MMConfig(vocab_size=1024, text_max_len=text_len, text_width=256, text_depth=2, text_heads=8, width=256,
                   depth=6, heads=8, mlp_ratio=4.0, codebook_size=1024, code_grid=[side, side],
                   decoder_depth=1, embed_dim=256)
    torch.manual_seed(0)
    model = MMModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer (mm.train.optim)
    text = torch.randint(3, 1024, (batch, text_len))
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    codes = torch.randint(0, 1024, (batch, side, side))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            states, m = model.encode_prompt(text, mask)
            logits = model.t2i_logits(codes, states, m)  # (B, N, K)
            loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run_profiled(step, 1, rows)


@torch.no_grad()
def profile_decode(quick: bool, cfg_on: bool, rows: int, steps: int = 32, compile: bool = False) -> dict:
    width, depth, heads, vocab = (128, 2, 4, 1024) if quick else (512, 8, 8, 4096)
    cfg = MMConfig(vocab_size=vocab, text_max_len=32, text_width=256, text_depth=2, text_heads=4, width=width,
                   depth=depth, heads=heads, mlp="swiglu", norm="rmsnorm", codebook_size=vocab,
                   code_grid=[16, 16], decoder_depth=1, embed_dim=64)
    torch.manual_seed(0)
    model = MMModel(cfg).eval()
    batch = 4
    ids = torch.randint(5, vocab, (batch, 32))
    states, mask = model.encode_prompt(ids, torch.ones_like(ids, dtype=torch.bool))
    if cfg_on:
        u_states, u_mask = model.null_context(batch, states.shape[1])
        states, mask = torch.cat([states, u_states.to(states.dtype)]), torch.cat([mask, u_mask])
    params = SamplingParams(guidance_scale=3.0 if cfg_on else 1.0, top_k=50)
    seeds, scale = seeds_tensor(0, batch), torch.tensor(3.0)
    positions = torch.arange(256)
    step = decode_step_fn(compile)  # compiled in run_profiled's warm-up call

    def run():
        logits, state = model.t2i_prefill(states, mask)
        if cfg_on:
            logits = guide(logits, scale)
        prev = logits.argmax(-1)
        for n in range(1, steps + 1):
            prev = step(model, prev, state, seeds, positions[n], scale, params, cfg_on)

    out = run_profiled(run, 1, rows)
    out["wall_ms"] /= steps  # per decode step (the prefill is a small part of 32 steps)
    out["op_ms"] /= steps
    out["aten_ops_per_call"] /= steps
    for r in out["top"]:
        r["self_ms"] /= steps
        r["calls"] /= steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="smaller batch and sampler")
    ap.add_argument("--json", default="", help="write the profiles here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick}
    jobs = {"train_fp32": lambda: profile_train(args.quick, "fp32", args.rows),
            "train_bf16": lambda: profile_train(args.quick, "bf16", args.rows),
            "decode": lambda: profile_decode(args.quick, False, args.rows),
            "decode_cfg": lambda: profile_decode(args.quick, True, args.rows),
            "decode_compiled": lambda: profile_decode(args.quick, False, args.rows, compile=True)}
    for name, job in jobs.items():
        r = res[name] = job()
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["shares"].items(), key=lambda kv: -kv[1]))
        per = "step" if name.startswith("train") else "decode step"
        print(f"[{name}] {r['wall_ms']:.1f} ms wall per {per}, {r['op_ms']:.1f} ms in operators, "
              f"{r['aten_ops_per_call']:.0f} aten ops; {shares}", flush=True)
        for t in r["top"][:8]:
            print(f"    {t['op']:50s} {t['self_ms']:8.2f} ms {100 * t['share']:5.1f}%  x{t['calls']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
