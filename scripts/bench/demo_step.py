"""What the demo's training step consumes: samples/s of the demo's pretraining step.

Builds ``PretrainTask`` from ``configs/demo/pretrain.yaml`` (the tiny preset, 8-px patches,
batch 64, all four objectives every step: ITC, ITM with hard negatives, captioning, T2I) with a
BPE tokenizer trained on shapes captions and a VQ tokenizer of the demo's architecture (random
weights; the demo reads pre-extracted codes, so the VQ never runs in the step). One step is
what the trainer does: loss → backward → grad-norm clip → AdamW. The figure is samples/s, the
rate at which the data pipeline must deliver so that it is never the bottleneck
(``scripts/bench/data.py`` measures what the pipeline delivers).

With ``--profile`` one extra step runs under torch.profiler and the top operators by self CPU
time are printed and written into the JSON.

    /work/venv/bin/python scripts/bench/demo_step.py --json bench_demo_step.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def make_task(tmp: Path, config: str, n_captions: int = 2000):
    from mm.config import load_config
    from mm.data.shapes import make_sample
    from mm.data.tokenizer import train_tokenizer
    from mm.models.vq import VQTokenizer, VQTokenizerConfig
    from mm.tasks.pretrain import PretrainTask

    cfg = load_config(ROOT / config)
    samples = [make_sample(0, "train", i, cfg.data.image_size) for i in range(n_captions)]
    tok_dir = train_tokenizer([s["txt"] for s in samples], cfg.data.vocab_size, tmp / "tokenizer")
    vq_cfg = load_config(ROOT / "configs/demo/vq.yaml")  # the demo's VQ architecture
    VQTokenizer(VQTokenizerConfig.from_mm_config(vq_cfg)).save_pretrained(tmp / "vq")
    cfg.data.tokenizer, cfg.vq.path = str(tok_dir), str(tmp / "vq")
    torch.manual_seed(cfg.run.seed)
    # The demo's per-code T2I weights are counted from its code shards, which the bench does not
    # write: build without them, then give the model weights of the same shape (the same step).
    object_weight, cfg.objectives.t2i_object_weight = cfg.objectives.t2i_object_weight, 1.0
    task = PretrainTask(cfg)
    if object_weight != 1.0 and "t2i" in task.active:
        task.model.set_t2i_code_weights(1 + torch.rand(task.model.config.codebook_size) * (object_weight - 1))
    return cfg, task, samples


def make_batch(task, samples: list[dict], batch: int, image_size: int, seed: int = 0) -> dict:
    """A collated batch as the demo's loader gives it: images in [-1, 1], ids, mask, VQ codes."""
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in rng.choice(len(samples), batch, replace=False)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in chosen])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    ids, mask = task.tokenizer.encode([s["txt"] for s in chosen], task.cfg.data.text_max_len)
    grid = task.model.config.code_grid
    codes = torch.from_numpy(rng.integers(0, task.model.config.codebook_size, (batch, *grid)))
    assert images.shape[-1] == image_size
    return {"image": images, "input_ids": ids, "attention_mask": mask, "codes": codes}


def step(task, opt, batch: dict, i: int, grad_clip: float) -> None:
    loss, _ = task.loss(batch, i)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def profile_step(task, opt, batch: dict, grad_clip: float, rows: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(task, opt, batch, 10_000, grad_clip)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo/pretrain.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler")
    ap.add_argument("--quick", action="store_true", help="2 timed steps")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 2
    from mm.train.optim import make_optimizer

    with tempfile.TemporaryDirectory(prefix="mm-bench-demo-step-") as tmp:
        cfg, task, samples = make_task(Path(tmp), args.config)
    t = cfg.train
    opt = make_optimizer(task.model, t.lr, t.weight_decay, tuple(getattr(t, "betas", (0.9, 0.95))))
    task.model.train()
    batch = make_batch(task, samples, t.batch_size, cfg.data.image_size)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(task, opt, batch, i, t.grad_clip)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    res = {"config": args.config, "preset": cfg.model.preset, "batch_size": t.batch_size,
           "objectives": task.objectives_at(0), "params": task.model.num_params(), "step_s": sec,
           "step_s_all": times, "samples_per_s": t.batch_size / sec, "threads": torch.get_num_threads()}
    print(f"demo pretrain step ({cfg.model.preset}, batch {t.batch_size}, {'+'.join(res['objectives'])}): "
          f"{sec * 1000:.0f} ms/step = {res['samples_per_s']:.0f} samples/s", flush=True)
    if args.profile:
        res["profile_top_ops"] = profile_step(task, opt, batch, t.grad_clip, rows=15)
        for r in res["profile_top_ops"]:
            print(f"  {r['op']:45s} {r['self_ms']:9.1f} ms {100 * r['share']:5.1f}%  x{r['calls']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
