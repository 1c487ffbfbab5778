"""Helpers shared by test packages that run `mm` in subprocesses (tests/train, tests/reliability).

Tiny VQ runs on the built-in shapes data: a few seconds each on one CPU thread.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_vq_overrides(run_dir, cache, **extra):
    base = {
        "run.dir": run_dir, "data.shapes_cache": cache, "data.shapes_train": 64, "data.shapes_val": 16,
        "data.val_samples": 8, "data.shuffle_buffer": 16, "train.batch_size": 4, "train.max_steps": 8,
        "train.checkpoint_every": 2, "train.eval_every": 0, "train.warmup_steps": 2, "log.every": 1,
        "vq.channels": 8, "vq.codebook_size": 32,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def same_image_shards(folder, samples: int = 32):
    """Shards in which every sample is the same 32-px image (a red square on dark grey), so
    runs that split batches differently (processes, grad_accum) see identical data."""
    import io

    from PIL import Image

    from mm.data.shards import ShardWriter

    image = Image.new("RGB", (32, 32), (30, 30, 30))
    for x in range(8, 20):
        for y in range(10, 22):
            image.putpixel((x, y), (220, 40, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with ShardWriter(folder, samples_per_shard=8) as w:
        for i in range(samples):
            w.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": "a red square",
                     "json": {"caption": "a red square"}})


def mm_env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONHASHSEED="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_mm(args, timeout=240, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "mm", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or mm_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"mm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
