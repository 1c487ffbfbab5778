"""Benchmark one text-to-image training step: mm beside two Hugging Face peers.

    mm     text encoder (bidirectional) -> shared backbone over the VQ codes (causal self-attn,
           cross-attn to the text) -> next-code head
    llama  LlamaForCausalLM, text as a prefix of the image tokens (LlamaGen-like), loss on image
           tokens only
    bart   BartForConditionalGeneration, text encoder + image-token decoder with cross-attention
           (Parti-like)

All three get the same width, backbone/decoder depth, heads, MLP width, vocabulary and sequence
lengths (text encoders: ``--text-depth`` layers in mm and BART; Llama has none, its text rides
in the same stack). One step = forward + backward + AdamW update, in fp32 and under bf16
autocast (fp32 weights, as the trainer runs mixed precision). AdamW is the fused kernel for all
three: what mm's trainer uses (mm.train.optim) and Hugging Face Trainer's default with torch ≥ 2.8
(``adamw_torch_fused``). Reported per model and dtype:
image tokens/s, the ratio mm / faster peer, and model FLOP/s (FLOPs counted by
torch.utils.flop_counter for one step) as a fraction of a large square matmul's FLOP/s measured
in the same run. Llama's MLP is gated (three matrices of the MLP width), so it does ~1.5x the MLP
FLOPs of the GELU MLPs of mm and BART at the same width: compare FLOP/s fractions too.

``--compile`` adds "mm+compile": mm with every Transformer block compiled (what
``train.compile=true`` does, mm.tasks.pretrain.compile_blocks); compilation happens in the
warm-up steps, is not timed, and its time is reported. The ratio to the faster peer is given for
eager mm and for mm's best setting.

mm's linear layers run their fp32 products in oneDNN (mm.nn.linear; the peers' go to aten,
i.e. MKL); ``MM_LINEAR=aten python scripts/bench/train_step.py …`` measures mm on aten's too.
Inside compiled blocks (mm+compile) mm uses aten's matmuls (inductor cannot lower the oneDNN op).

``--mm-mlp gelu_exact`` builds mm with the erf GELU (``model.mlp=gelu_exact``) instead of the
tanh approximation mm's presets use; BART's activation is the erf form.

    python scripts/bench/train_step.py [--quick] [--compile] [--mm-mlp gelu_exact] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6, help="backbone / decoder layers")
    p.add_argument("--text-depth", type=int, default=2, help="text encoder layers (mm, BART)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=1024, help="MLP width")
    p.add_argument("--vocab", type=int, default=1024, help="text vocabulary and VQ codebook size")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--image-len", type=int, default=256, help="image tokens (a square grid)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and dtype")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--quick", action="store_true", help="batch 4, 2 timed steps, 1 warm-up (a smoke run)")
    p.add_argument("--mm-mlp", default="gelu", choices=["gelu", "gelu_exact", "swiglu"],
                   help="mm's MLP (model.mlp): tanh GELU (the presets), erf GELU or SwiGLU")
    p.add_argument("--compile", action="store_true", help="also time mm with compiled blocks (train.compile=true)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.steps, args.warmup = 4, 2, 1
    side = math.isqrt(args.image_len)
    if side * side != args.image_len:
        p.error(f"--image-len {args.image_len} is not a square number of tokens")
    return args


# ---------------------------------------------------------------------------------------------
# The three models and their one-step closures


def build_mm(a):
    from mm.models.model import MMConfig, MMModel

    side = math.isqrt(a.image_len)
    cfg = MMConfig(vocab_size=a.vocab, text_max_len=a.text_len, text_width=a.width, text_depth=a.text_depth,
                   text_heads=a.heads, width=a.width, depth=a.depth, heads=a.heads, mlp_ratio=a.mlp / a.width,
                   codebook_size=a.vocab, code_grid=[side, side], decoder_depth=1, embed_dim=a.width, mlp=a.mm_mlp)
    model = MMModel(cfg)

    def loss_fn(batch):
        states, mask = model.encode_prompt(batch["text"], batch["text_mask"])  # (B, Lt, D)
        codes = batch["image"].view(-1, side, side)
        logits = model.t2i_logits(codes, states, mask)  # (B, N, K)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["image"].flatten())

    return model, loss_fn


def build_llama(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.width, intermediate_size=a.mlp, num_hidden_layers=a.depth,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=a.text_len + a.image_len, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")

    def loss_fn(batch):
        ids = torch.cat([batch["text"], batch["image"]], dim=1)  # (B, Lt + N): text prefix, then codes
        labels = torch.cat([torch.full_like(batch["text"], -100), batch["image"]], dim=1)
        return model(input_ids=ids, labels=labels).loss

    return model, loss_fn


def build_bart(a):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=a.vocab, d_model=a.width, encoder_layers=a.text_depth, decoder_layers=a.depth,
                     encoder_attention_heads=a.heads, decoder_attention_heads=a.heads, encoder_ffn_dim=a.mlp,
                     decoder_ffn_dim=a.mlp, max_position_embeddings=max(a.text_len, a.image_len), dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
    model = BartForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")

    def loss_fn(batch):
        start = torch.ones_like(batch["image"][:, :1])
        dec_in = torch.cat([start, batch["image"][:, :-1]], dim=1)  # start + codes[:-1], like mm
        return model(input_ids=batch["text"], attention_mask=batch["text_mask"].long(),
                     decoder_input_ids=dec_in, labels=batch["image"]).loss

    return model, loss_fn


def build_mm_compiled(a):
    from mm.nn.layers import Block

    model, loss_fn = build_mm(a)
    for blk in [m for m in model.modules() if isinstance(m, Block)]:
        blk.compile()  # as mm.tasks.pretrain.compile_blocks (train.compile=true)
    return model, loss_fn


BUILDERS = {"mm": build_mm, "llama": build_llama, "bart": build_bart}
PEERS = ("llama", "bart")


def make_batch(a, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, a.vocab, (a.batch, a.text_len), generator=g)
    mask = torch.ones(a.batch, a.text_len, dtype=torch.bool)
    mask[: a.batch // 2, a.text_len * 3 // 4:] = False  # half the captions are padded
    text = text.masked_fill(~mask, 0)
    image = torch.randint(0, a.vocab, (a.batch, a.image_len), generator=g)
    return {"text": text, "text_mask": mask, "image": image}


# ---------------------------------------------------------------------------------------------
# Measurements


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def step_flops(model, loss_fn, batch, dtype: str) -> int:
    """Matmul/attention FLOPs of one forward + backward (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mm.nn.linear import set_linear_backend

    # The counter knows aten's matmuls, not oneDNN's op that mm.nn.linear calls: count with aten
    # (the same products, so the same FLOPs).
    old = set_linear_backend("aten")
    counter = FlopCounterMode(display=False)
    try:
        with counter, autocast(dtype):
            loss = loss_fn(batch)
        with counter:
            loss.backward()
    finally:
        set_linear_backend(old)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def one_step(model, loss_fn, opt, batch, dtype: str) -> float:
    t0 = time.perf_counter()
    with autocast(dtype):
        loss = loss_fn(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def matmul_time(dtype: str, n: int = 2048) -> float:
    """Seconds of one (n x n) @ (n x n) matmul, the faster of aten's (MKL for fp32) and oneDNN's
    (what mm.nn.linear calls); 2 n^3 / time is the machine's practical FLOP/s."""
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
    kernels = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for k in kernels:
        k()  # warm-up
        t0 = time.perf_counter()
        k()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_dtype(a, batch: dict, dtype: str) -> dict:
    """Round-robin: each round times one step of every model and one large matmul, so a busy
    machine slows all of them alike; medians over rounds, the peak is the best matmul."""
    models, warm = {}, {}
    builders = {**BUILDERS, **({"mm+compile": build_mm_compiled} if a.compile else {})}
    for name, build in builders.items():
        torch.manual_seed(0)
        model, loss_fn = build(a)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # see the docstring
        flops = models["mm"][3] if name == "mm+compile" else step_flops(model, loss_fn, batch, dtype)
        models[name] = (model, loss_fn, opt, flops)
    for name, (model, loss_fn, opt, _) in models.items():
        t0 = time.perf_counter()
        for _ in range(a.warmup):  # the first compiled step compiles
            one_step(model, loss_fn, opt, batch, dtype)
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in models}
    peak_times = []
    for _ in range(a.steps):
        peak_times.append(matmul_time(dtype))
        for name, (model, loss_fn, opt, _) in models.items():
            times[name].append(one_step(model, loss_fn, opt, batch, dtype))
    peak = 2 * 2048**3 / min(peak_times)
    out = {"peak_flops": peak, "models": {}}
    for name, (model, _, _, flops) in models.items():
        t = statistics.median(times[name])
        out["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()), "step_s": t, "step_s_all": times[name],
            "image_tokens_per_s": a.batch * a.image_len / t, "flops_per_step": flops,
            "flops_per_s": flops / t, "peak_fraction": flops / t / peak, "warmup_s": warm[name]}
        print(f"{dtype:5s} {name:6s} {t * 1000:8.1f} ms/step  {a.batch * a.image_len / t:9.0f} image tok/s  "
              f"{flops / t / 1e9:7.1f} GFLOP/s  {100 * flops / t / peak:5.1f}% of peak", flush=True)
    return out


def run(a) -> dict:
    from mm.nn.linear import linear_backend

    batch = make_batch(a)
    results = {"config": {k: v for k, v in vars(a).items() if k != "json"}, "mm_linear": linear_backend(),
               "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "load_avg": _load()},
               "load_avg_end": None,
               "peak_flops": {}, "models": {}, "ratio_vs_faster_peer": {}}
    for dtype in a.dtypes.split(","):
        r = bench_dtype(a, batch, dtype)
        results["peak_flops"][dtype] = r["peak_flops"]
        for name, figures in r["models"].items():
            results["models"].setdefault(name, {})[dtype] = figures
        peer = max(r["models"][p]["image_tokens_per_s"] for p in PEERS)
        mine = {n: f["image_tokens_per_s"] for n, f in r["models"].items() if n.startswith("mm")}
        best = max(mine, key=mine.get)
        results["ratio_vs_faster_peer"][dtype] = mine[best] / peer
        results.setdefault("ratio_eager_vs_faster_peer", {})[dtype] = mine["mm"] / peer
        results.setdefault("mm_setting", {})[dtype] = best
        results["load_avg_end"] = _load()
        print(f"{dtype:5s} matmul peak {r['peak_flops'] / 1e9:.1f} GFLOP/s; mm / faster peer = "
              f"{mine['mm'] / peer:.2f}x eager, {mine[best] / peer:.2f}x best ({best})", flush=True)
    return results


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    a = parse_args(argv)
    results = run(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
