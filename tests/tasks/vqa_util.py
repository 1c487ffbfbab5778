"""Helpers for the VQA tests: a tiny "pretrained" model folder, VQA shards, short trainer runs.

The model is a freshly initialised small preset saved in the exported pretraining layout
(config.json, model.safetensors, tokenizer/); the tokenizer is a BPE trained on the shapes
captions, questions and answers of the few samples used. Everything is 16 px.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm.config import Config
from mm.data.shapes import make_sample
from mm.data.shards import ShardWriter
from mm.data.tokenizer import load_tokenizer, train_tokenizer

IMAGE_SIZE = 16
TEXT_LEN = 16
# Wider than the debug preset: overfitting from scratch takes about half the steps.
MODEL = {"width": 64, "heads": 4, "text_width": 64}


def samples(n: int, split: str = "train") -> list[dict]:
    return [make_sample(0, split, i, IMAGE_SIZE) for i in range(n)]


def write_shards(out: Path, items: list[dict], per_shard: int = 4) -> Path:
    with ShardWriter(out, prefix="vqa", samples_per_shard=per_shard) as w:
        for s in items:
            w.write(s)
    return out


def make_pretrained(out: Path, items: list[dict], seed: int = 0) -> Path:
    """An untrained model saved like a pretraining export (config, weights, tokenizer/).

    Its linear layers get PyTorch's default init (std ~ 1/sqrt(3·fan_in)) instead of the 0.02 of
    a fresh MMModel: a pretrained model's weights are that large, whereas at width 64 the 0.02
    init leaves the question almost no say in the fused states and fine-tuning from it spends
    hundreds of steps just escaping the answer prior.
    """
    from mm.models.presets import create_model

    texts = []
    for s in items:
        texts.append(s["txt"])
        for qa in s["json"]["qa"]:
            texts += [qa["question"], *sorted(set(qa["answers"]))]
    train_tokenizer(texts * 2, 400, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    model = create_model("debug", vocab_size=tok.vocab_size, image_size=IMAGE_SIZE, text_max_len=TEXT_LEN, **MODEL)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    model.save_pretrained(out)
    return out


def vqa_config(run_dir: Path, init: Path, shards: Path, head: str = "classifier", steps: int = 150,
               lr: float = 3e-3, **extra) -> Config:
    cfg = Config()
    cfg.run.dir, cfg.run.stage, cfg.run.init_from = str(run_dir), "vqa", str(init)
    cfg.data.train = cfg.data.val = [str(shards)]
    cfg.data.image_size, cfg.data.text_max_len = IMAGE_SIZE, TEXT_LEN
    cfg.data.shuffle_buffer, cfg.data.val_samples = 64, 64
    cfg.vqa.head, cfg.vqa.answer_vocab_size = head, 64
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps, t.weight_decay = steps, 24, lr, 10, 0.0
    t.checkpoint_every, t.eval_every, t.min_lr_ratio = 0, 0, 1.0  # constant lr after the warm-up
    cfg.log.every = 1000
    for key, value in extra.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def train_vqa(cfg: Config):
    """(trainer after fit, result dict) — the trainer keeps the task for in-memory comparisons."""
    from mm.train.trainer import Trainer

    trainer = Trainer(cfg)
    return trainer, trainer.fit()


# One tiny data set and one trained run per head for the whole test session (the task tests and
# the CLI tests share them; training is the slow part).
N_IMAGES = 4  # 4 images x 6 questions = 24 questions to overfit
STEPS = {"classifier": 100, "generative": 120}  # >=95% from steps ~60 and ~100
_SHARED: dict = {}


def shared_assets(tmp_path_factory) -> dict:
    if "assets" not in _SHARED:
        root = tmp_path_factory.mktemp("vqa")
        items = samples(N_IMAGES)
        _SHARED["assets"] = {"root": root, "items": items, "shards": write_shards(root / "shards", items),
                             "init": make_pretrained(root / "pretrained", items)}
    return _SHARED["assets"]


def shared_run(tmp_path_factory, head: str):
    """(trainer, result, final folder) of a VQA run of ``head`` on the shared assets."""
    if head not in _SHARED:
        a = shared_assets(tmp_path_factory)
        run = a["root"] / f"run_{head}"
        trainer, result = train_vqa(vqa_config(run, a["init"], a["shards"], head, steps=STEPS[head]))
        trainer.task.model.eval()
        _SHARED[head] = (trainer, result, run / "final")
    return _SHARED[head]
