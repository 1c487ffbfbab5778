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
3. tokens/s at batch 1, 4, 16, 64 (``--batches``) for mm plain decoding with fp32, bf16 and int8
   weight-only decode weights, mm SJD (window ``--sjd-window``) in fp32 and int8, and HF
   ``generate`` in fp32 and bf16, all eager, no guidance, one table measured in one run; and the
   time to the first image at batch 1 (text encoding + all codes; the VQ decoder is timed in
   scripts/bench/vq.py). On random weights the next-code distribution is nearly flat, so SJD's
   acceptance here says nothing about a trained model; the table gives its forwards per image so
   the ratio can be read with that in mind (trained-model figures: BENCHMARKS.md, "Decoding").
4. per-token time late vs early: a 32×32 grid (1024 codes), median step time over 16 steps
   ending at code 1024 divided by the one around code 64, windows interleaved over 5 rounds so
   load drift on a shared machine cancels (a cache that re-reads a growing prefix grows here),
   in the headline setting.

    /work/venv/bin/python scripts/bench/sample.py --json bench_sample.json          # full
    /work/venv/bin/python scripts/bench/sample.py --quick                           # smoke run (eager only)
    /work/venv/bin/python scripts/bench/sample.py --settings eager,bf16             # no compilation
    /work/venv/bin/python scripts/bench/sample.py --only-batches --batches 1,4,16,64 # just the batch table

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
from mm.generation.sjd import sample_codes_sjd
from mm.generation.weights import decode_weights
from mm.models.model import MMConfig, MMModel
from mm.nn.linear import packed_for_rows


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
            step_times: list | None = None, sjd_window: int = 0, stats: dict | None = None) -> float:
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
        text = model.encode_prompt(ids, mask)
        if sjd_window:
            sample_codes_sjd(model, text, seeds, params, window=sjd_window, stats=stats)
        else:
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
    text = model.encode_prompt(ids, torch.ones_like(ids, dtype=torch.bool))
    _, state = model.t2i_prefill(*text)
    step = decode_step_fn(compile)
    seeds, prev = seeds_tensor(0, batch, device), torch.zeros(batch, dtype=torch.long, device=device)
    n_codes = model.config.code_grid[0] * model.config.code_grid[1]
    pos = torch.arange(n_codes, device=device)
    scale = torch.ones((), device=device)
    out: dict[int, list[float]] = {p: [] for p in positions}
    with packed_for_rows(model, batch):  # as sample_codes does
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


def best_of(fn, repeats: int, warmup: list | None = None, warm: bool = True) -> float:
    t0 = time.perf_counter()
    if warm:
        fn()  # warm-up (allocations, lazy init, compilation)
    if warmup is not None:
        warmup.append(time.perf_counter() - t0)
    return min(fn() for _ in range(repeats))


# name -> (decode weights, SJD or plain): the batch table's mm rows
BATCH_ROWS = {"plain fp32": ("fp32", False), "plain bf16": ("bf16", False), "plain int8": ("int8", False),
              "sjd fp32": ("fp32", True), "sjd int8": ("int8", True)}


def batch_table(mm, hf, batches: list[int], prompt_len: int, new_tokens: int, top_k: int, device,
                window: int, repeats: int, sjd_max_batch: int = 16, names: list[str] | None = None) -> dict:
    """tokens/s per batch size for mm's decode options and HF (fp32, bf16), eager, no guidance.

    For each batch size, ``repeats`` rounds each time every row once in turn (one warm-up call per
    row first), and the median per row: load changes on a shared machine then hit all rows of a
    column alike, and the ratios within a column are the figures to read. SJD runs up to
    ``sjd_max_batch`` only: it multiplies the work per forward by the window, which a CPU pays in
    full once the forward is compute-bound. Returns {row: {batch: figures}}.
    """
    params = SamplingParams(guidance_scale=1.0, top_k=top_k)
    names = names or [*BATCH_ROWS, "hf fp32", "hf bf16"]
    models = {n: decode_weights(mm, BATCH_ROWS[n][0]) for n in names if n in BATCH_ROWS}
    hfs = {n: as_dtype(hf, torch.float32 if n == "hf fp32" else torch.bfloat16) for n in names if n.startswith("hf")}
    rows: dict = {n: {} for n in names}
    for b in batches:
        todo = [n for n in names if not (n in BATCH_ROWS and BATCH_ROWS[n][1] and b > sjd_max_batch)]
        times: dict = {n: [] for n in todo}
        forwards: dict = {}
        for r in range(repeats + (b == batches[0])):  # the first round of the first batch warms up
            for n in todo:
                sjd = n in BATCH_ROWS and BATCH_ROWS[n][1]
                stats: dict = {}
                if n in models:
                    t = time_mm(models[n], b, prompt_len, params, device, sjd_window=window if sjd else 0, stats=stats)
                else:
                    t = time_hf(hfs[n], b, prompt_len, new_tokens, top_k, device)
                if r or b != batches[0]:
                    times[n].append(t)
                if sjd:
                    forwards[n] = stats["forwards"]
        for n in todo:
            t = statistics.median(times[n])
            rows[n][b] = {"seconds": t, "tokens_per_s": b * new_tokens / t, "all_seconds": times[n],
                          **({"forwards": forwards[n]} if n in forwards else {})}
            print(f"  {n:11s} batch {b:3d}: {b * new_tokens / t:7.0f} tok/s (median {t:.2f} s of {len(times[n])}"
                  + (f", {forwards[n]} forwards)" if n in forwards else ")"), flush=True)
    return rows


# name -> (weight dtype, compile): what a user can pick (model.to(torch.bfloat16); sample_codes(compile=True))
SETTINGS = {"eager": (torch.float32, False), "compile": (torch.float32, True),
            "bf16": (torch.bfloat16, False), "bf16+compile": (torch.bfloat16, True)}


def as_dtype(model, dtype):
    """A copy of the model with weights in ``dtype`` (the fp32 model stays as it is)."""
    import copy

    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def parse_args():
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
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes of the batch table ('' = no table)")
    ap.add_argument("--sjd-window", type=int, default=16)
    ap.add_argument("--table-grid", type=int, default=8, help="code grid side of the batch table")
    ap.add_argument("--table-rows", default="", help="rows of the batch table, comma-separated (default: all)")
    ap.add_argument("--only-batches", action="store_true", help="measure only the batch table")
    ap.add_argument("--roofline", action="store_true", help="measure only the roofline table (at --batches)")
    ap.add_argument("--model", default="", help="a trained model folder: measure decode quality and SJD "
                                                "latency on it instead (compositional score, FID, forwards)")
    ap.add_argument("--num-prompts", type=int, default=64, help="--model: images per decode option")
    ap.add_argument("--windows", default="4,8,16", help="--model: SJD windows of the batch-1 latency table ('' = none)")
    ap.add_argument("--rows", default="", help=f"--model: decode options to score, of {', '.join(QUALITY_ROWS)}")
    ap.add_argument("--seeds", default="0", help="--model: first seeds of the image sets to score, comma-separated")
    args = ap.parse_args()
    if args.compile:
        args.settings = "compile"
    args.settings = args.settings or ("eager" if args.quick else "eager,compile,bf16+compile")
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return report(trained_model_figures(args), args.json)
    torch.manual_seed(0)
    device = torch.device(args.device)
    d = dims(args.quick)
    prompt_len, top_k = 32, 50
    grid = 8 if args.quick else 16  # 64 or 256 new tokens
    repeats = 1 if args.quick else args.repeats
    mm = build_mm(d, grid, prompt_len, device)
    hf = build_hf(d, device)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.roofline:
        print("roofline (eager decode step, no guidance):", flush=True)
        return report({**header(args, d, device), **roofline(mm, batches, prompt_len, top_k, device)}, args.json)
    if args.only_batches:
        return report({**header(args, d, device), "new_tokens": grid * grid, "prompt_tokens": prompt_len,
                       "top_k": top_k, **batch_figures(mm, hf, batches, prompt_len, grid * grid, top_k, device,
                                                       args.sjd_window, repeats, args.table_grid,
                                                       args.table_rows.split(",") if args.table_rows else None)},
                      args.json)
    res = {**header(args, d, device), **headline(args, mm, hf, d, grid, prompt_len, top_k, repeats, device)}
    if batches:
        res.update(batch_figures(mm, hf, batches, prompt_len, grid * grid, top_k, device, args.sjd_window, repeats,
                                 args.table_grid))
    report(res, args.json)


def trained_model_figures(args) -> dict:
    """--model: batch-1 latency of plain vs SJD decoding and each decode option's quality."""
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if args.windows:
        print("batch-1 latency, plain vs SJD (guidance 3):", flush=True)
        res.update(sjd_latency(args.model, [int(w) for w in args.windows.split(",")], 8, 3.0, 1))
    for seed in [int(x) for x in args.seeds.split(",")]:  # another seed set = the sampling-noise reference
        print(f"quality per decode option ({args.num_prompts} prompts, guidance 3, seed {seed}):", flush=True)
        q = quality_table(args.model, args.num_prompts, 3.0, args.sjd_window, seed,
                          args.rows.split(",") if args.rows else None)
        res.setdefault("quality_runs", []).append(q)
    res["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return res


def time_settings(args, mm, batch: int, prompt_len: int, new_tokens: int, params, repeats: int, device) -> dict:
    """Each mm setting (dtype, compile) of --settings timed on the same batch: seconds, tokens/s, warm-up."""
    settings = {}
    for name in args.settings.split(","):
        dtype, comp = SETTINGS[name]
        model, warm = as_dtype(mm, dtype), []
        t = best_of(lambda m=model, c=comp: time_mm(m, batch, prompt_len, params, device, c), repeats, warm)
        settings[name] = {"seconds": t, "tokens_per_s": batch * new_tokens / t, "warmup_s": warm[0],
                          "dtype": str(dtype).replace("torch.", ""), "compile": comp}
        print(f"mm {name:13s} {1000 * t / new_tokens:6.1f} ms/step {batch * new_tokens / t:7.0f} tok/s "
              f"(warm-up {warm[0]:.1f} s)", flush=True)
    return settings


def headline(args, mm, hf, d: dict, grid: int, prompt_len: int, top_k: int, repeats: int, device) -> dict:
    """The headline figures at batch 4: mm's settings against HF fp32 and bf16 `generate`, the cost of
    guidance, and the per-token time early against late in a long sequence."""
    batch, new_tokens = 4, grid * grid
    settings = time_settings(args, mm, batch, prompt_len, new_tokens, SamplingParams(guidance_scale=1.0, top_k=top_k),
                             repeats, device)
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
    guided = SamplingParams(guidance_scale=3.0, top_k=top_k)
    t_cfg = best_of(lambda: time_mm(cfg_model, batch, prompt_len, guided, device, head_compile), repeats)

    # Per-token time early vs late on a 32x32 grid (16x16 in --quick), in the headline setting.
    long_mm = build_mm(d, 16 if args.quick else 32, prompt_len, device)
    long_mm.load_state_dict(mm.state_dict(), strict=False)  # same weights (positions differ in size)
    early_at, late_at = (16, 256) if args.quick else (64, 1024)
    per_token = per_token_times(long_mm.to(head_dtype), batch, prompt_len, SamplingParams(guidance_scale=1.0, top_k=top_k),
                                device, (early_at, late_at), head_compile, rounds=2 if args.quick else 5)
    early, late = per_token[early_at], per_token[late_at]
    b16 = best("bfloat16")
    return {
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


QUALITY_ROWS = {"plain fp32": ("fp32", "plain"), "sjd fp32": ("fp32", "sjd"), "plain bf16": ("bf16", "plain"),
                "plain int8": ("int8", "plain"), "sjd int8": ("int8", "sjd")}


def quality_table(model_dir: str, num_prompts: int, guidance: float, window: int, seed: int = 0,
                  names: list[str] | None = None) -> dict:
    """A trained model's T2I compositional score, FID, seconds and forwards per image for each decode
    option, on the same prompts and seeds (mm.eval.t2i; FID features from the fp32 model for all)."""
    from mm.eval.t2i import MMImageFeatures, evaluate_t2i
    from mm.generation.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model_dir, device="cpu")
    features = MMImageFeatures(pipe.base_model)
    n_codes = pipe.model.config.code_grid[0] * pipe.model.config.code_grid[1]
    out = {}
    for name in names or QUALITY_ROWS:
        weights, decode = QUALITY_ROWS[name]
        pipe.configure(weights=weights, decode=decode, sjd_window=window)
        pipe.history.clear()
        t0 = time.perf_counter()
        # Autocast only so that the eval's ITC score can feed fp32 images to a bf16/int8 model; the
        # sampler turns it off, and every row's VQ decoding and FID features run the same way.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m = evaluate_t2i(pipe, num_prompts, guidance, seed, features=features)
        images = sum(h["images"] for h in pipe.history)
        forwards = [h.get("forwards", n_codes) for h in pipe.history]  # per batch (all its images at once)
        out[name] = {"t2i_compositional_accuracy": m["t2i_compositional_accuracy"], "fid": m["fid"],
                     "itc_score": m["itc_score"], "t2i_ceiling": m["t2i_ceiling"],
                     "sampling_seconds": sum(h["seconds"] for h in pipe.history),
                     "eval_seconds": time.perf_counter() - t0, "images": images,
                     "forwards_per_batch": forwards, "batch_sizes": [h["images"] for h in pipe.history],
                     "codes_per_image": n_codes}
        print(f"  {name:11s} comp {100 * m['t2i_compositional_accuracy']:5.1f} % FID {m['fid']:8.3f} "
              f"sampling {out[name]['sampling_seconds']:6.1f} s forwards/batch {forwards}", flush=True)
    return {"model": model_dir, "num_prompts": num_prompts, "guidance": guidance, "sjd_window": window,
            "seed": seed, "quality": out}


def sjd_latency(model_dir: str, windows: list[int], prompts: int, guidance: float, repeats: int) -> dict:
    """Batch-1 wall time and forwards per image, plain vs SJD per window, on a trained model (fp32)."""
    from mm.eval.t2i import eval_prompts
    from mm.generation.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model_dir, device="cpu").configure(max_batch=1)
    texts = [s["prompt"] for s in eval_prompts(prompts)]
    rows = {}
    for name, window in [("plain", 0)] + [(f"sjd w{w}", w) for w in windows]:
        secs, fwd = [], []
        for r in range(repeats):
            for i, text in enumerate(texts):
                st: list = []
                pipe.generate_codes([text], guidance_scale=guidance, seed=i, decode="sjd" if window else "plain",
                                    sjd_window=window or None, stats=st)
                secs.append(st[0]["seconds"])
                fwd.append(st[0].get("forwards", pipe.model.config.code_grid[0] * pipe.model.config.code_grid[1]))
        rows[name] = {"seconds_per_image": statistics.median(secs), "forwards_per_image": statistics.mean(fwd)}
        print(f"  {name:8s} {rows[name]['seconds_per_image']:.3f} s/image, "
              f"{rows[name]['forwards_per_image']:.1f} forwards/image", flush=True)
    return {"latency_batch1": rows, "latency_prompts": prompts}


def stream_bandwidth(mb: int = 256, rounds: int = 5) -> float:
    """Bytes/s of x.sum() over an fp32 tensor of ``mb`` MB, best of the rounds (the read floor)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(rounds))
    return x.numel() * 4 / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_bytes(model, batch: int, prompt_len: int) -> dict:
    """Bytes one decode step reads: backbone (but cross K/V) + code-head weights, the static self-attention cache
    (the whole (B, H, Tmax, d) buffer: SDPA masks unwritten slots, it does not skip them) and the
    cross-attention keys/values, per layer, keys and values."""
    from mm.generation.weights import weight_bytes

    c = model.config
    act = 2 if model.logit_scale.dtype == torch.bfloat16 else 4
    n = c.code_grid[0] * c.code_grid[1]
    cache = 2 * c.depth * batch * c.width * (n + prompt_len) * act
    # Not read per step: the code embedding (one row), cross-attention K/V projections (run once per prompt).
    unread = [*model.code_embed.parameters(), *[t for blk in model.backbone.blocks
                                                  for t in [*blk.cross.kv.parameters(), *blk.cross.kv.buffers()]]]
    weights = weight_bytes(model) - sum(t.numel() * t.element_size() for t in unread)
    return {"weights": weights, "cache": cache, "total": weights + cache}


def roofline(mm, batches: list[int], prompt_len: int, top_k: int, device, compiles=(False, True)) -> dict:
    """Per decode step, eager and compiled: bytes read, the floor at the measured stream bandwidth,
    measured time, ratio."""
    bw = stream_bandwidth()
    params = SamplingParams(guidance_scale=1.0, top_k=top_k)
    rows = {}
    for weights in ("fp32", "bf16", "int8"):
        model = decode_weights(mm, weights)
        for b in batches:
            by = step_bytes(model, b, prompt_len)
            for comp in compiles:
                if comp:
                    torch._dynamo.reset()  # nine shapes would pass dynamo's recompile limit (8)
                t = per_token_times(model, b, prompt_len, params, device, (128,), compile=comp, rounds=2)[128]
                name = f"{weights} b{b}" + (" compile" if comp else "")
                rows[name] = {**by, "floor_s": by["total"] / bw, "measured_s": t, "ratio": t / (by["total"] / bw)}
                print(f"  {name:18s}: {by['total'] / 1e6:6.1f} MB, floor {1e3 * by['total'] / bw:5.2f} ms, "
                      f"measured {1e3 * t:6.2f} ms, ratio {t * bw / by['total']:.1f}", flush=True)
    return {"stream_bandwidth_gb_s": bw / 1e9, "roofline": rows}


def header(args, d: dict, device) -> dict:
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "quick": args.quick,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "dims": {**d, "mlp_hidden": mlp_hidden(d["width"])}}


def batch_figures(mm, hf, batches, prompt_len, new_tokens, top_k, device, window, repeats,
                  table_grid: int, names: list[str] | None = None) -> dict:
    """The batch table (on a ``table_grid``² code grid, same weights: a shared CPU cannot afford 256
    codes at batch 64 for seven rows), its ratios to HF fp32 at each batch, and the time to the
    first image at batch 1 on the full grid."""
    small = build_mm(dims_of(mm), table_grid, prompt_len, device)
    small.load_state_dict(mm.state_dict(), strict=False)  # same weights (positions differ in size)
    n_small = table_grid * table_grid
    print(f"batch table (eager, no guidance, {n_small} codes, SJD window {window}):", flush=True)
    rows = batch_table(small, hf, batches, prompt_len, n_small, top_k, device, window, repeats, names=names)
    ratios = {name: {b: row[b]["tokens_per_s"] / rows["hf fp32"][b]["tokens_per_s"] for b in row}
              for name, row in rows.items()}
    print(f"time to first image, batch 1, {new_tokens} codes:", flush=True)
    first = batch_table(mm, hf, [1], prompt_len, new_tokens, top_k, device, window, repeats, names=names)
    return {"batch_table": rows, "batch_table_codes": n_small, "batch_ratio_vs_hf_fp32": ratios,
            "time_to_first_image": first, "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def dims_of(model) -> dict:
    c = model.config
    return {"width": c.width, "depth": c.depth, "heads": c.heads, "vocab": c.codebook_size}


def report(res: dict, path: str) -> None:
    print(json.dumps(res, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
