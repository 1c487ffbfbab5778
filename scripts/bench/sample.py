"""Benchmark image-code sampling: mm's cached sampler vs Hugging Face ``LlamaForCausalLM.generate``.

Both models get the same dimensions (width, depth, heads, SwiGLU MLP of the same inner width,
RMSNorm, vocabulary = codebook size) and random weights; the numbers measure the machinery, not
the quality. Measured, in one run:

1. tokens/s at batch 4, a 32-token prompt, 256 new tokens, top-k sampling, KV cache:
   HF gets the prompt as input_ids (prefill) and ``generate(do_sample=True, top_k=…)``;
   mm encodes the 32-token prompt with its text encoder (cross-attention context, keys/values
   computed once) and samples a 16×16 grid of codes without guidance.
   mm runs in each of the ``--settings`` (default: eager fp32, ``compile=True`` fp32, and bf16
   weights with ``compile=True``); HF runs in fp32 and with bf16 weights. The headline ratio
   is mm's best fp32 setting ÷ HF fp32 (same precision); the bf16 ratio is mm's best bf16
   setting ÷ HF bf16. Compilation happens in the warm-up call and is not timed (its time is
   reported separately).
2. the cost of classifier-free guidance: mm's time with guidance 3 (2B rows in one batch)
   divided by its time without, in the headline setting.
3. per-token time late vs early: a 32×32 grid (1024 codes), median step time over 16 steps
   ending at code 1024 divided by the one around code 64, windows interleaved over 5 rounds so
   load drift on a shared machine cancels (a cache that re-reads a growing prefix grows here),
   in the headline setting.

    /work/venv/bin/python scripts/bench/sample.py --json bench_sample.json          # full
    /work/venv/bin/python scripts/bench/sample.py --quick                           # smoke run (eager only)
    /work/venv/bin/python scripts/bench/sample.py --settings eager,bf16             # no compilation

Goals (issues 6 and 9): ≥ 3× the HF tokens/s, CFG ≤ 1.4×, late/early ≤ 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from mm.generation.sampler import SamplingParams, decode_step_fn, sample_codes, seeds_tensor
from mm.models.model import MMConfig, MMModel


def dims(quick: bool) -> dict:
    if quick:
        return {"width": 128, "depth": 2, "heads": 4, "vocab": 1024}
    return {"width": 512, "depth": 8, "heads": 8, "vocab": 4096}


def mlp_hidden(width: int) -> int:
    return int(2 * (4 * width) / 3)  # mm's SwiGLU inner width for mlp_ratio 4 (same parameter count as GELU)


def build_mm(d: dict, grid: int, prompt_len: int, device) -> MMModel:
    cfg = MMConfig(vocab_size=d["vocab"], text_max_len=prompt_len, text_width=256, text_depth=2, text_heads=4,
                   width=d["width"], depth=d["depth"], heads=d["heads"], mlp="swiglu", norm="rmsnorm",
                   codebook_size=d["vocab"], code_grid=[grid, grid], decoder_depth=1, embed_dim=64)
    return MMModel(cfg).to(device).eval()


def build_hf(d: dict, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["width"], intermediate_size=mlp_hidden(d["width"]),
                      num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                      num_key_value_heads=d["heads"], max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to(device).eval()
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_mm(model, batch: int, prompt_len: int, params: SamplingParams, device, compile=False,
            step_times: list | None = None) -> float:
    """Seconds for one call: text encoding + prefill + all codes (+ per-step timestamps)."""
    ids = torch.randint(5, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones(batch, prompt_len, dtype=torch.bool, device=device)
    seeds = seeds_tensor(0, batch, device)

    def tick():
        if step_times is not None:
            sync(device)
            step_times.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        sample_codes(model, text, seeds, params, compile=compile, progress=tick if step_times is not None else None)
    sync(device)
    return time.perf_counter() - t0


def time_hf(model, batch: int, prompt_len: int, new_tokens: int, top_k: int, device) -> float:
    ids = torch.randint(5, model.config.vocab_size, (batch, prompt_len), device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)
    sync(device)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    return time.perf_counter() - t0


@torch.no_grad()
def per_token_times(model, batch: int, prompt_len: int, params: SamplingParams, device, positions,
                    compile=False, steps: int = 16, rounds: int = 5) -> dict[int, float]:
    """Median seconds per decode step around each position (static cache), rounds interleaved.

    The cache position is set directly (its unwritten slots are masked anyway), so each window
    costs ``steps`` decode steps; alternating the windows cancels slow drifts of machine load.
    """
    ids = torch.randint(5, model.config.vocab_size, (batch, prompt_len), device=device)
    text = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
    _, state = model.t2i_prefill(*text)
    step = decode_step_fn(compile)
    seeds, prev = seeds_tensor(0, batch, device), torch.zeros(batch, dtype=torch.long, device=device)
    n_codes = model.config.code_grid[0] * model.config.code_grid[1]
    pos = torch.arange(n_codes, device=device)
    scale = torch.ones((), device=device)
    out: dict[int, list[float]] = {p: [] for p in positions}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        for p in positions:
            start = max(1, min(p - steps // 2, n_codes - steps))
            for c in state.caches:
                c.self_attn.pos.fill_(start)
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                prev = step(model, prev, state, seeds, pos[start + i], scale, params, False)
            sync(device)
            if r:
                out[p].append((time.perf_counter() - t0) / steps)
    return {p: statistics.median(v) for p, v in out.items()}


def best_of(fn, repeats: int, warmup: list | None = None) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, lazy init, compilation)
    if warmup is not None:
        warmup.append(time.perf_counter() - t0)
    return min(fn() for _ in range(repeats))


# name -> (weight dtype, compile): what a user can pick (model.to(torch.bfloat16); sample_codes(compile=True))
SETTINGS = {"eager": (torch.float32, False), "compile": (torch.float32, True),
            "bf16": (torch.bfloat16, False), "bf16+compile": (torch.bfloat16, True)}


def as_dtype(model, dtype):
    """A copy of the model with weights in ``dtype`` (the fp32 model stays as it is)."""
    import copy

    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, short runs (a smoke test)")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", default="",
                    help=f"mm settings to time, comma-separated, of {', '.join(SETTINGS)} "
                         "(default: eager,compile,bf16+compile; --quick: eager)")
    ap.add_argument("--compile", action="store_true", help="same as --settings compile")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.compile:
        args.settings = "compile"
    args.settings = args.settings or ("eager" if args.quick else "eager,compile,bf16+compile")
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    d = dims(args.quick)
    batch, prompt_len, top_k = 4, 32, 50
    grid = 8 if args.quick else 16  # 64 or 256 new tokens
    new_tokens = grid * grid
    repeats = 1 if args.quick else args.repeats

    mm = build_mm(d, grid, prompt_len, device)
    hf = build_hf(d, device)
    plain = SamplingParams(guidance_scale=1.0, top_k=top_k)
    guided = SamplingParams(guidance_scale=3.0, top_k=top_k)
    settings = {}
    for name in args.settings.split(","):
        dtype, comp = SETTINGS[name]
        model, warm = as_dtype(mm, dtype), []
        t = best_of(lambda: time_mm(model, batch, prompt_len, plain, device, comp), repeats, warm)
        settings[name] = {"seconds": t, "tokens_per_s": batch * new_tokens / t, "warmup_s": warm[0],
                          "dtype": str(dtype).replace("torch.", ""), "compile": comp}
        print(f"mm {name:13s} {1000 * t / new_tokens:6.1f} ms/step {batch * new_tokens / t:7.0f} tok/s "
              f"(warm-up {warm[0]:.1f} s)", flush=True)
    t_hf = best_of(lambda: time_hf(hf, batch, prompt_len, new_tokens, top_k, device), repeats)
    hf_bf16 = as_dtype(hf, torch.bfloat16)
    t_hf_bf16 = best_of(lambda: time_hf(hf_bf16, batch, prompt_len, new_tokens, top_k, device), repeats)
    print(f"HF fp32 {batch * new_tokens / t_hf:7.0f} tok/s, bf16 {batch * new_tokens / t_hf_bf16:7.0f} tok/s",
          flush=True)

    def best(dtype: str) -> str | None:
        names = [n for n, v in settings.items() if v["dtype"] == dtype]
        return min(names, key=lambda n: settings[n]["seconds"]) if names else None

    head = best("float32") or best("bfloat16")
    head_dtype, head_compile = SETTINGS[head]
    t_mm = settings[head]["seconds"]
    cfg_model = as_dtype(mm, head_dtype)
    t_cfg = best_of(lambda: time_mm(cfg_model, batch, prompt_len, guided, device, head_compile), repeats)

    # Per-token time early vs late on a 32x32 grid (16x16 in --quick), in the headline setting.
    long_grid = 16 if args.quick else 32
    long_mm = build_mm(d, long_grid, prompt_len, device)
    long_mm.load_state_dict(mm.state_dict(), strict=False)  # same weights (positions differ in size)
    early_at, late_at = (16, 256) if args.quick else (64, 1024)
    per_token = per_token_times(long_mm.to(head_dtype), batch, prompt_len, plain, device, (early_at, late_at),
                                head_compile, rounds=2 if args.quick else 5)
    early, late = per_token[early_at], per_token[late_at]
    b16 = best("bfloat16")

    res = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "quick": args.quick,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "dims": {**d, "mlp_hidden": mlp_hidden(d["width"])},
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "top_k": top_k,
        "mm_setting": head, "compile": head_compile, "settings": settings,
        "mm_tokens_per_s": batch * new_tokens / t_mm,
        "hf_tokens_per_s": batch * new_tokens / t_hf,
        "speedup_vs_hf": t_hf / t_mm,
        "hf_bf16_tokens_per_s": batch * new_tokens / t_hf_bf16,
        "mm_bf16_setting": b16,
        "speedup_vs_hf_bf16": t_hf_bf16 / settings[b16]["seconds"] if b16 else None,
        "mm_seconds": t_mm, "mm_cfg_seconds": t_cfg, "hf_seconds": t_hf, "hf_bf16_seconds": t_hf_bf16,
        "cfg_cost": t_cfg / t_mm,
        "per_token_ms_early": 1000 * early, "per_token_ms_late": 1000 * late,
        "early_position": early_at, "late_position": late_at,
        "late_over_early": late / early,
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
