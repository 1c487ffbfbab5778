"""Run every mm benchmark, one after the other in one session, and write the table in BENCHMARKS.md.

    python scripts/bench/all.py [--quick] [--json OUT] [--md BENCHMARKS.md] [--threads N]
                                [--reuse NAME=JSON ...] [--only NAME ...]

Each benchmark script runs as a subprocess (same process group, strictly one at a time, so the
figures come from the same machine state): train_step, sample, data, demo_step, vq, scaling,
memory (``mm demo --fast``), profile_step. Their ``--json`` outputs are collected into one JSON
(``--json``) and rendered into BENCHMARKS.md between the ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` markers; text outside the markers (hand-written analysis) is kept.

``--reuse NAME=JSON`` takes one benchmark's figures from an earlier run of that script instead of
running it (the table says so), e.g. ``memory_full=bench_memory_full.json`` for the full demo's
peak memory, which takes tens of minutes. ``--threads N`` sets OMP_NUM_THREADS for every child.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (script, full args, quick args or None = skipped by --quick). Order = run order.
BENCHES = {
    "train_step": ("train_step.py", ["--compile"], ["--quick"]),
    "sample": ("sample.py", [], ["--quick"]),
    "data": ("data.py", ["--batches", "15"], ["--png-samples", "1000", "--jpg-samples", "200", "--batches", "10",
                             "--jpg-out", "64", "--workers", "0", "2"]),
    "demo_step": ("demo_step.py", ["--profile"], ["--quick", "--profile"]),
    "vq": ("vq.py", [], ["--quick"]),
    "scaling": ("scaling.py", [], ["--quick"]),
    "memory": ("memory.py", [], None),  # None: not in --quick (the fast demo alone takes ~3 minutes)
    "profile": ("profile_step.py", [], ["--quick"]),
}
OPTIONAL = {"memory_full": ("memory.py", ["--full"])}  # only with --reuse (or --only memory_full)


# ---------------------------------------------------------------------------------------------
# Running


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flag_line = next(line for line in info.splitlines() if line.startswith("flags"))
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
        flags = [f for f in wanted if f in flag_line.split()]
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_bench(name: str, script: str, extra: list[str], out_dir: Path, env: dict) -> dict:
    out = out_dir / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), *extra, "--json", str(out)]
    shown = " ".join(["python", f"scripts/bench/{script}", *extra, "--json", f"{name}.json"])
    print(f"\n=== {name}: {shown}  (load {load()})", flush=True)
    t0, load_before = time.perf_counter(), load()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    print(proc.stdout.rstrip(), flush=True)
    rec = {"command": shown, "seconds": round(seconds, 1), "returncode": proc.returncode,
           "load_before": load_before, "load_after": load()}
    if proc.returncode == 0 and out.is_file():
        rec["result"] = json.loads(out.read_text())
    else:
        rec["error"] = "\n".join(proc.stdout.strip().splitlines()[-5:])
        print(f"=== {name} FAILED (exit {proc.returncode})", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------
# Goals


def get(runs: dict, name: str, *path):
    cur = runs.get(name, {}).get("result")
    for p in path:
        if cur is None:
            return None
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


def goal_rows(runs: dict) -> list[dict]:
    """One row per goal of issue 9: figure, goal, met?, the bench that produced it."""
    rows = []

    def add(what, value, fmt, goal_text, ok, bench, detail=""):
        rows.append({"what": what, "value": value, "shown": "n/a" if value is None else fmt.format(value),
                     "goal": goal_text, "met": None if value is None else bool(ok(value)), "bench": bench,
                     "detail": detail})

    for dtype in ("fp32", "bf16"):
        ratio = get(runs, "train_step", "ratio_vs_faster_peer", dtype)
        models = get(runs, "train_step", "models") or {}
        tok = {m: (models.get(m, {}).get(dtype) or {}).get("image_tokens_per_s")
               for m in ("mm", "mm+compile", "llama", "bart")}
        detail = ", ".join(f"{m} {v:,.0f}" for m, v in tok.items() if v) + " image tok/s" if any(tok.values()) else ""
        setting = get(runs, "train_step", "mm_setting", dtype)
        if setting:
            detail += f"; ratio with {setting}"
        add(f"training step image tokens/s, mm ÷ faster HF peer ({dtype})", ratio, "{:.2f}×", "≥ 1.25×",
            lambda v: v >= 1.25, "train_step", detail)
    for dtype in ("fp32", "bf16"):
        best = get(runs, "train_step", "mm_setting", dtype) or "mm"
        frac = get(runs, "train_step", "models", best, dtype, "peak_fraction")
        peak = get(runs, "train_step", "peak_flops", dtype)
        fps = get(runs, "train_step", "models", best, dtype, "flops_per_s")
        detail = f"{fps / 1e9:.0f} of {peak / 1e9:.0f} GFLOP/s ({dtype} 2048² matmul)" if fps and peak else ""
        add(f"mm model FLOP/s ÷ matmul peak ({dtype})", frac, "{:.0%}", "≥ 75%", lambda v: v >= 0.75,
            "train_step", detail)
    s = runs.get("sample", {}).get("result") or {}
    add("sampling tokens/s, mm ÷ HF `generate` (fp32)", s.get("speedup_vs_hf"), "{:.2f}×", "≥ 3×", lambda v: v >= 3,
        "sample", f"mm {s['mm_tokens_per_s']:,.0f} ({s.get('mm_setting', 'eager')}) vs HF "
        f"{s['hf_tokens_per_s']:,.0f} tok/s" if s else "")
    if s.get("speedup_vs_hf_bf16"):
        b16 = s["settings"][s["mm_bf16_setting"]]
        add("sampling tokens/s, mm ÷ HF `generate` (bf16 weights)", s["speedup_vs_hf_bf16"], "{:.2f}×", "≥ 3×",
            lambda v: v >= 3, "sample", f"mm {b16['tokens_per_s']:,.0f} ({s['mm_bf16_setting']}) vs HF "
            f"{s['hf_bf16_tokens_per_s']:,.0f} tok/s")
    add("CFG cost (time with guidance ÷ without)", s.get("cfg_cost"), "{:.2f}×", "≤ 1.4×", lambda v: v <= 1.4,
        "sample", f"{s['mm_cfg_seconds']:.2f} s vs {s['mm_seconds']:.2f} s" if s else "")
    add("per-token time late ÷ early", s.get("late_over_early"), "{:.2f}", "≤ 1.3", lambda v: v <= 1.3, "sample",
        f"{s['per_token_ms_late']:.2f} ms at {s['late_position']} vs {s['per_token_ms_early']:.2f} ms at "
        f"{s['early_position']}" if s else "")
    pipe = get(runs, "data", "sets", "png32", "pipeline", "out32_workers2", "samples_per_s")
    need = get(runs, "demo_step", "samples_per_s")
    ratio = pipe / need if pipe and need else None
    add("data pipeline (2 workers, 32 px) ÷ demo training step consumption", ratio, "{:.1f}×", "≥ 3×",
        lambda v: v >= 3, "data + demo_step",
        f"{pipe:,.0f} samples/s delivered vs {need:,.1f} samples/s consumed" if ratio else "")
    for name, label in (("memory", "`mm demo --fast`"), ("memory_full", "`mm demo` (full)")):
        m = runs.get(name, {}).get("result")
        if m or name == "memory":
            peak = m.get("peak_mb") if m else None
            add(f"{label} peak memory", peak, "{:,.0f} MB", "≤ 3 GB (3,072 MB)", lambda v: v <= 3072, name,
                f"largest process {m['peak_rss_mb']:,.0f} MB RSS, whole tree {m['peak_tree_pss_mb']:,.0f} MB PSS, "
                f"{m['wall_s'] / 60:.1f} min" if m else "not run (--quick skips the ~3 min demo): "
                "`python scripts/bench/memory.py`")
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown


def rel(path: str, md: Path) -> str:
    return os.path.relpath(Path(path).resolve(), md.resolve().parent)


def md_goals(rows: list[dict], runs: dict) -> list[str]:
    out = ["| figure | measured | goal | met | detail | command |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "**met**", False: "not met", None: "not measured"}[r["met"]]
        cmds = "<br>".join(f"`{runs[b]['command']}`" for b in r["bench"].split(" + ") if b in runs)
        out.append(f"| {r['what']} | {r['shown']} | {r['goal']} | {met} | {r['detail']} | {cmds} |")
    return out


def md_figures(runs: dict, md: Path) -> list[str]:
    out = []
    ts = get(runs, "train_step", "models")
    if ts:
        cfg = get(runs, "train_step", "config")
        out += ["", f"### Training step (`{runs['train_step']['command']}`)", "",
                (f"d {cfg['width']}, {cfg['depth']} layers, {cfg['heads']} heads, MLP {cfg['mlp']}, vocab "
                f"{cfg['vocab']}, {cfg['text_len']} text + {cfg['image_len']} image tokens, batch {cfg['batch']}; "
                "forward + backward + AdamW."), "",
                "| model | dtype | ms/step | image tokens/s | GFLOP/s | of matmul peak |", "|---|---|---|---|---|---|"]
        for m, per in ts.items():
            for dtype, f in per.items():
                out.append(f"| {m} | {dtype} | {f['step_s'] * 1000:,.0f} | {f['image_tokens_per_s']:,.0f} | "
                           f"{f['flops_per_s'] / 1e9:,.1f} | {f['peak_fraction']:.0%} |")
        peaks = get(runs, "train_step", "peak_flops") or {}
        warm = {d: f.get("warmup_s") for d, f in (ts.get("mm+compile") or {}).items()}
        if any(warm.values()):
            out += ["", "mm+compile = every block compiled (`train.compile=true`); its warm-up steps, which compile, "
                    "are not timed: " + ", ".join(f"{d} {w:.0f} s" for d, w in warm.items() if w) + "."]
        out.append("")
        out.append("Matmul peak (2048² @ 2048², best of the rounds): "
                   + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()) + ".")
    s = runs.get("sample", {}).get("result")
    if s:
        d = s["dims"]
        out += ["", f"### Sampling (`{runs['sample']['command']}`)", "",
                (f"d {d['width']}, {d['depth']} layers, {d['heads']} heads, vocab {d['vocab']}; batch {s['batch']}, "
                f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, top-k {s['top_k']}."), "",
                "| figure | value |", "|---|---|",
                *[f"| mm tokens/s, {n} ({v['dtype']}{', compiled' if v['compile'] else ''}; warm-up "
                  f"{v['warmup_s']:.0f} s, not timed) | {v['tokens_per_s']:,.0f} |"
                  for n, v in s.get("settings", {"eager": {"tokens_per_s": s["mm_tokens_per_s"], "dtype": "fp32",
                                                           "compile": False, "warmup_s": 0}}).items()],
                f"| HF generate tokens/s (fp32) | {s['hf_tokens_per_s']:,.0f} |",
                *([f"| HF generate tokens/s (bf16 weights) | {s['hf_bf16_tokens_per_s']:,.0f} |"]
                  if "hf_bf16_tokens_per_s" in s else []),
                f"| mm with CFG (s), {s.get('mm_setting', 'eager')} | {s['mm_cfg_seconds']:.2f} |",
                (f"| per-token ms at {s['early_position']} / {s['late_position']} | "
                f"{s['per_token_ms_early']:.2f} / {s['per_token_ms_late']:.2f} |")]
    data = get(runs, "data", "sets")
    if data:
        out += ["", f"### Data pipeline (`{runs['data']['command']}`)", "",
                "| shards | raw tar samples/s | output | workers | samples/s | first batch s |", "|---|---|---|---|---|---|"]
        for set_name, entry in data.items():
            raw = entry["raw_tar"]["samples_per_s"]
            for key, r in entry["pipeline"].items():
                size, workers = key.removeprefix("out").split("_workers")
                out.append(f"| {set_name} | {raw:,.0f} | {size} px | {workers} | {r['samples_per_s']:,.0f} | "
                           f"{r['first_batch_s']:.2f} |")
    d = runs.get("demo_step", {}).get("result")
    if d:
        out += ["", (f"Demo training step (`{runs['demo_step']['command']}`): {d['preset']} preset, batch "
                f"{d['batch_size']}, objectives {'+'.join(d['objectives'])}: {d['step_s'] * 1000:,.0f} ms/step = "
                f"**{d['samples_per_s']:,.1f} samples/s** consumed.")]
    v = get(runs, "vq", "configs")
    if v:
        out += ["", f"### VQ tokenizer (`{runs['vq']['command']}`)", "",
                "| config | params | dtype | image → codes | batch | encode img/s | decode img/s |",
                "|---|---|---|---|---|---|---|"]
        for name, e in v.items():
            for dtype in ("fp32", "bf16"):
                if dtype in e:
                    f = e[dtype]
                    out.append(f"| {name} (`{e['config']}`) | {e['params'] / 1e6:.2f}M | {dtype} | {f['image_size']} px → "
                               f"{f['grid'][0]}×{f['grid'][1]} | {f['batch']} | {f['encode_images_per_s']:,.0f} | "
                               f"{f['decode_images_per_s']:,.0f} |")
    sc = runs.get("scaling", {}).get("result")
    if sc:
        out += ["", f"### Scaling (`{runs['scaling']['command']}`)", "",
                "| preset | width × depth | params | dtype | ms/step | image tokens/s | GFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        for p in sc["train"]:
            out.append(f"| {p['preset']} | {p['width']} × {p['depth']} | {p['params'] / 1e6:.2f}M | {p['dtype']} | "
                       f"{p['step_s'] * 1000:,.0f} | {p['image_tokens_per_s']:,.0f} | {p['gflops_per_s']:,.1f} |")
        out += ["", "| sampler preset | image tokens | s per batch of 4 | ms per token |", "|---|---|---|---|"]
        for p in sc["sample"]:
            out.append(f"| {p['preset']} | {p['image_tokens']} | {p['seconds']:.2f} | {p['ms_per_token']:.2f} |")
        out.append("")
        for key, title in (("train", "training tokens/s vs preset"), ("sample", "sampling time vs image tokens")):
            if key in sc.get("plots", {}):
                out.append(f"![{title}]({rel(sc['plots'][key], md)})")
    return out


def md_profile(runs: dict) -> list[str]:
    p = runs.get("profile", {}).get("result")
    if not p:
        return []
    out = ["", f"### Profile (`{runs['profile']['command']}`)", "",
           ("torch.profiler, self CPU time summed over operators (nested aten calls counted once each); *overhead* = "
           "share of wall time not inside any operator (Python, dispatch); shares are of operator time."), "",
           "| what | wall ms | in ops ms | overhead | aten ops | matmul | attention | other | top operators (self ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in ("train_fp32", "train_bf16", "decode", "decode_cfg", "decode_compiled"):
        r = p.get(name)
        if not r:
            continue
        sh = r["shares"]
        top = ", ".join(f"{t['op'].removeprefix('aten::')} {t['self_ms']:.1f}" for t in r["top"][:5])
        unit = "per step" if name.startswith("train") else "per decode step"
        over = max(0.0, 1 - r["op_ms"] / r["wall_ms"]) if r["wall_ms"] else 0.0
        out.append(f"| {name} ({unit}) | {r['wall_ms']:.1f} | {r['op_ms']:.1f} | {over:.0%} | {r['aten_ops_per_call']:.0f} | "
                   f"{sh.get('matmul', 0):.0%} | {sh.get('attention', 0):.0%} | "
                   f"{sh.get('other', 0) + sh.get('optimizer', 0):.0%} | {top} |")
    d = get(runs, "demo_step", "profile_top_ops")
    if d:
        out += ["", "Demo step, top operators: "
                + ", ".join(f"{t['op'].removeprefix('aten::')} {t['share']:.0%}" for t in d[:8]) + "."]
    return out


def render(result: dict, md: Path) -> str:
    m, runs = result["machine"], result["runs"]
    lines = [BEGIN, "", f"Generated by `{result['command']}` on {m['date']}"
             + (" — **quick run: smoke figures, not the record**" if result["quick"] else "") + ".", "",
             (f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} threads, Python {m['python']}; load average {result['load_start']} at the start, "
             f"{result['load_end']} at the end; {result['minutes']:.1f} minutes in all."), "",
             "## Goals (issue 9)", ""]
    lines += md_goals(result["goals"], runs)
    reused = [f"`{n}` from {r['reused_from']}" for n, r in runs.items() if r.get("reused_from")]
    if reused:
        lines += ["", "Taken from an earlier run of the same script (not re-run here): " + "; ".join(reused) + "."]
    failed = [f"`{n}` (exit {r['returncode']}): {r['error'].splitlines()[-1] if r['error'] else ''}"
              for n, r in runs.items() if "error" in r]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    lines += ["", "## Figures"] + md_figures(runs, md) + md_profile(runs)
    lines += ["", "Per benchmark: seconds, load average before → after.", "",
              " · ".join(f"{n} {r.get('seconds', 0):.0f} s ({r.get('load_before', ['?'])[0]} → "
                         f"{r.get('load_after', ['?'])[0]})" for n, r in runs.items() if not r.get("reused_from")),
              "", END]
    return "\n".join(lines)


def write_md(md: Path, block: str) -> None:
    text = md.read_text() if md.is_file() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every bench in its smoke size (a few minutes)")
    ap.add_argument("--json", default="", help="write all figures here")
    ap.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"), help="the markdown file to update")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every benchmark (0 = default)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES) + list(OPTIONAL), help="run only these")
    ap.add_argument("--reuse", nargs="+", default=[], metavar="NAME=JSON", help="take a bench's figures from a file")
    ap.add_argument("--plots", default="", help="folder for the scaling plots (default scripts/bench/plots)")
    args = ap.parse_args(argv)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    for name in reuse:
        if name not in BENCHES and name not in OPTIONAL:
            ap.error(f"--reuse {name}: no such benchmark; choose from {', '.join([*BENCHES, *OPTIONAL])}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    command = "python scripts/bench/all.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "") + "".join(f" --reuse {r}" for r in args.reuse)
    result = {"command": command, "quick": args.quick, "machine": machine(), "load_start": load(), "runs": {}}
    t0 = time.perf_counter()
    todo = {n: (s, q if args.quick and q is not None else f) for n, (s, f, q) in BENCHES.items()
            if not (args.quick and q is None) or n in reuse}
    if args.plots:
        todo["scaling"] = (todo["scaling"][0], todo["scaling"][1] + ["--plots", args.plots])
    todo.update({n: (s, f) for n, (s, f) in OPTIONAL.items() if n in reuse or (args.only and n in args.only)})
    with tempfile.TemporaryDirectory(prefix="mm-bench-all-") as tmp:
        for name, (script, extra) in todo.items():
            if name in reuse:
                script_args = " ".join(extra + ["--json", Path(reuse[name]).name])
                result["runs"][name] = {"command": f"python scripts/bench/{script} {script_args}".replace("  ", " "),
                                        "reused_from": reuse[name], "result": json.loads(Path(reuse[name]).read_text())}
            elif not args.only or name in args.only:
                result["runs"][name] = run_bench(name, script, extra, Path(tmp), env)
    result["minutes"] = (time.perf_counter() - t0) / 60
    result["load_end"] = load()
    result["goals"] = goal_rows(result["runs"])
    md = Path(args.md)
    write_md(md, render(result, md))
    print(f"\nwrote {md} ({result['minutes']:.1f} min)")
    for r in result["goals"]:
        print(f"  {r['what']}: {r['shown']} (goal {r['goal']}) -> "
              f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[r['met']] }")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
