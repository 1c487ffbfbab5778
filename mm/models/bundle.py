"""Reading an exported pretraining folder: the contract between training and its users.

    DIR/ config.json  model.safetensors     MMModel.save_pretrained
         tokenizer/                          the text tokenizer folder (mm.data.tokenizer.load_tokenizer)
         vq/                                 VQTokenizer.save_pretrained

``load_bundle(DIR)`` returns ``(model, tokenizer_dir, vq)``. The tokenizer is returned as its
folder, not loaded: models may not import mm.data (DESIGN.md §2); callers do
``load_tokenizer(tokenizer_dir)``. A run folder is accepted too (its ``final/``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm.errors import MMError
from mm.models.model import MMModel
from mm.models.vq import VQTokenizer


def bundle_folder(path: str | Path) -> Path:
    """The exported folder for ``path`` (itself, or ``path/final`` for a finished run folder)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer", "vq") if not (p / name).exists()]
    if missing:
        raise MMError(f"{path} is not an exported mm model (missing {', '.join(missing)}); pass RUN/final of a "
                      "pretraining run or a folder written by `mm export`")
    return p


def model_folder(path: str | Path, hint: str) -> Path:
    """The MMModel folder (config.json + model.safetensors) at ``path`` or ``path/final``, for
    ``run.init_from``; ``hint`` ends the error with what the stage expects there."""
    p = Path(path).expanduser()
    for cand in (p, p / "final"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise MMError(f"run.init_from {path} is neither a model folder nor a finished run folder; {hint}")


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> tuple[MMModel, Path, VQTokenizer]:
    """(model in eval mode, tokenizer folder, VQ tokenizer in eval mode) from an exported folder."""
    p = bundle_folder(path)
    model = MMModel.from_pretrained(p, device=device)
    vq = VQTokenizer.from_pretrained(p / "vq", map_location=str(device)).to(device).eval()
    grid = [model.config.image_size // vq.cfg.downsample] * 2
    if vq.cfg.codebook_size != model.config.codebook_size or grid != list(model.config.code_grid):
        raise MMError(f"{p}/vq (codebook {vq.cfg.codebook_size}, grid {grid}) does not match the model "
                      f"(codebook {model.config.codebook_size}, grid {list(model.config.code_grid)}); "
                      "export the model together with the VQ it was trained with")
    return model, p / "tokenizer", vq
