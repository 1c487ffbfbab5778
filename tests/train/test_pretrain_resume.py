"""The trainer on the pretraining stage: stop at step N + resume to 2N is bitwise identical to 2N steps.

Pretraining loads its frozen VQ tokenizer lazily at the first step that encodes images; that
must not consume the global RNG (hard negatives and CFG dropout draw from it), or a resumed
run, which loads the VQ again after restoring the RNG, would drift from the uninterrupted one.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.tasks.pretrain_util import TEXT_LEN, make_assets

from .conftest import ROOT, mm_env, run_mm

CONFIG = "configs/pretrain/shapes.yaml"
STEPS = 6


def tiny_pretrain_overrides(run_dir, cache, tok_dir, vq_dir, **extra):
    """The debug model on 32 px shapes (the built-in minimum) with a given tokenizer and a random tiny
    VQ (8x8 codes at 32 px): no nested VQ or tokenizer runs."""
    # 64/16 shapes as tiny_vq_overrides: the session's shapes cache is shared with the VQ runs.
    base = {
        "run.dir": run_dir, "vq.path": vq_dir, "data.tokenizer": tok_dir, "model.preset": "debug",
        "model.patch_size": 8, "data.image_size": 32, "data.text_max_len": TEXT_LEN,
        "data.shapes_cache": cache, "data.shapes_train": 64, "data.shapes_val": 16, "data.val_samples": 4,
        "data.shuffle_buffer": 16, "train.batch_size": 4, "train.max_steps": STEPS, "train.warmup_steps": 1,
        "train.checkpoint_every": 0, "train.eval_every": 0, "log.every": 1,
        "objectives.mixing": "all", "objectives.cfg_dropout": 0.5, "objectives.hard_negatives": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in rows if "loss" in r}


def test_pretrain_stop_and_resume_is_bitwise_identical(tmp_path, shapes_cache):
    tok_dir, vq_dir = make_assets(tmp_path / "assets")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train", CONFIG, *tiny_pretrain_overrides(resumed, shapes_cache, tok_dir, vq_dir)]
    # The uninterrupted run starts beside the first half (independent runs; most of each is start-up).
    # Its output goes to a file: a full pipe would block it while this process waits on the other.
    err = tmp_path / "straight.err"
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "mm", "train", CONFIG,
                                 *tiny_pretrain_overrides(straight, shapes_cache, tok_dir, vq_dir)],
                                cwd=ROOT, env=mm_env(), stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            run_mm(args + [f"train.stop_at_step={STEPS // 2}"])
        finally:
            proc.wait(timeout=240)
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert (resumed / "checkpoints" / f"step_{STEPS // 2}").exists() and not (resumed / "final").exists()
    run_mm(args)

    a = load_file(str(resumed / "final" / "model.safetensors"))
    b = load_file(str(straight / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    assert len(losses(straight)) == STEPS
    assert losses(resumed) == losses(straight)
