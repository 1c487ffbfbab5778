"""Everything a run needs before its first step: processes, data sources, tokenizer, task.

Kept apart from the loop so ``trainer.train`` reads as the loop only.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch

from mm.config import Config, config_to_dict, load_config, save_config
from mm.errors import MMError

TASKS = {
    "vq": "mm.tasks.vq:VQTask",
    "pretrain": "mm.tasks.pretrain:PretrainTask",
    "vqa": "mm.tasks.vqa:VQATask",
}

# Keys that may change between the first start of a run and a resume of it.
RESUMABLE_CHANGES = ("train.max_steps", "train.stop_at_step", "train.time_limit_minutes",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                     "data.num_workers", "log.")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise MMError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU (or no)")
    # find_unused_parameters: objectives switched per step leave some weights without grads.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.run.stage != "vq")
    return Accelerator(cpu=not cuda, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[ddp])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_run_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run must be the same experiment: refuse a changed config (one line)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = _flat(config_to_dict(load_config(saved_path)))
    new = _flat(config_to_dict(cfg))
    for key in sorted(set(saved) | set(new)):
        if saved.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise MMError(f"run folder {run_dir} was started with {key}={saved.get(key)!r}, now {new.get(key)!r}; "
                          "resume with the same config or choose a new run.dir")


def prepare_run_dir(cfg: Config, accelerator) -> Path:
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MMError(f"run.dir {run_dir} is a file; choose a folder")
    check_run_config(cfg, run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def shapes_cache(cfg: Config) -> Path:
    if cfg.data.shapes_cache:
        return Path(cfg.data.shapes_cache).expanduser()
    return Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm")) / "shapes"


def resolve_sources(cfg: Config, accelerator) -> Config:
    """A copy of ``cfg`` whose data sources are concrete shard folders.

    ``builtin:shapes`` is generated once into the cache (by rank 0; the others wait).
    """
    from mm.data.shapes import ensure_shapes

    cfg = copy.deepcopy(cfg)
    uses_builtin = any(s.startswith("builtin:") for s in cfg.data.train + cfg.data.val)
    folders = None
    if uses_builtin:
        kwargs = dict(image_size=cfg.data.image_size, num_train=cfg.data.shapes_train,
                      num_val=cfg.data.shapes_val, seed=0)
        if accelerator.is_main_process:
            folders = ensure_shapes(shapes_cache(cfg), **kwargs)
        accelerator.wait_for_everyone()
        if folders is None:
            folders = ensure_shapes(shapes_cache(cfg), **kwargs)  # complete now: only looks
    for name in ("train", "val"):
        resolved = []
        for src in getattr(cfg.data, name):
            if src == "builtin:shapes":
                resolved.append(str(folders[name]))
            elif src.startswith("builtin:"):
                raise MMError(f"unknown built-in data set '{src}'; the built-in one is builtin:shapes")
            else:
                resolved.append(src)
        setattr(cfg.data, name, resolved)
    return cfg


def make_task(cfg: Config):
    module_name, cls_name = TASKS[cfg.run.stage].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg)


def make_loader(cfg: Config, task, accelerator, *, train: bool, start_batch: int = 0):
    from mm.data.pipeline import make_loader as build

    sources = cfg.data.train if train else cfg.data.val
    return build(
        sources,
        batch_size=cfg.train.batch_size,
        seed=cfg.run.seed,
        rank=accelerator.process_index if train else 0,
        world_size=accelerator.num_processes if train else 1,
        num_workers=cfg.data.num_workers,
        weights=cfg.data.weights or None if train else None,
        shuffle_buffer=cfg.data.shuffle_buffer,
        image_size=cfg.data.image_size,
        augment=cfg.data.augment and train,
        tokenizer=getattr(task, "tokenizer", None),
        text_max_len=cfg.data.text_max_len,
        mode=getattr(task, "data_mode", "caption"),
        train=train,
        start_batch=start_batch,
    )
