"""Shared helpers for the pretraining tests: a tiny tokenizer, an untrained tiny VQ, batches.

Everything is built in-process in a second or two: a BPE trained on a few hundred shapes
captions, a VQ tokenizer with random weights (its codes are valid, which is all the objectives
need), and batches rendered by the shapes generator at 16 px for the ``debug`` preset.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from mm.config import Config
from mm.data.shapes import make_sample
from mm.data.tokenizer import load_tokenizer, train_tokenizer
from mm.data.transforms import load_image, to_tensor

IMAGE_SIZE = 16
TEXT_LEN = 16


_ASSETS: list[Path] = []


def make_assets(root: Path | None = None) -> tuple[Path, Path]:
    """(tokenizer folder, VQ folder), built once per test process (``root`` is ignored after that)."""
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    if not _ASSETS:
        _ASSETS.append(Path(tempfile.mkdtemp(prefix="mm_pretrain_assets_")) if root is None else Path(root))
    tok_dir, vq_dir = _ASSETS[0] / "tokenizer", _ASSETS[0] / "vq"
    if not (tok_dir / "tokenizer.json").exists():
        captions = [make_sample(0, "train", i, IMAGE_SIZE)["txt"] for i in range(300)]
        train_tokenizer(captions, 300, tok_dir)
    if not (vq_dir / "config.json").exists():
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(0)
            vq = VQTokenizer(VQTokenizerConfig(codebook_size=32, code_dim=4, downsample=4, channels=8,
                                               channel_mult=[1, 1, 1], image_size=IMAGE_SIZE, mid_attention=False))
            vq.save_pretrained(vq_dir)
    return tok_dir, vq_dir


def tiny_config(root: Path, **objectives) -> Config:
    tok_dir, vq_dir = make_assets(root)
    cfg = Config()
    cfg.run.stage = "pretrain"
    cfg.model.preset = "debug"
    cfg.data.image_size, cfg.data.text_max_len = IMAGE_SIZE, TEXT_LEN
    cfg.data.tokenizer, cfg.vq.path = str(tok_dir), str(vq_dir)
    for k, v in objectives.items():
        setattr(cfg.objectives, k, v)
    return cfg


def make_batch(tokenizer, n: int = 8, start: int = 0, split: str = "train", codes: torch.Tensor | None = None) -> dict:
    samples = [make_sample(0, split, start + i, IMAGE_SIZE) for i in range(n)]
    images = to_tensor([load_image(s["png"], IMAGE_SIZE) for s in samples])
    captions = [s["txt"] for s in samples]
    ids, mask = tokenizer.encode(captions, TEXT_LEN)
    batch = {"image": images, "caption": captions, "input_ids": ids, "attention_mask": mask,
             "meta": [s["json"] for s in samples], "key": [s["__key__"] for s in samples]}
    if codes is not None:
        batch["codes"] = codes
    return batch


def tokenizer_of(root: Path):
    return load_tokenizer(make_assets(root)[0])


def set_seed(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
