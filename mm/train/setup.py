"""Everything a run needs before its first step: processes, data sources, tokenizer, task.

Kept apart from the loop so ``trainer.train`` reads as the loop only.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import torch

from mm.config import Config, config_to_dict, load_config, save_config
from mm.errors import MMError

TASKS = {
    "vq": "mm.tasks.vq:VQTask",
    "pretrain": "mm.tasks.pretrain:PretrainTask",
    "vqa": "mm.tasks.vqa:VQATask",
    "classify": "mm.tasks.classify:ClassifyTask",
    "detect": "mm.tasks.detect:DetectTask",
}

# Keys that may change between the first start of a run and a resume of it.
RESUMABLE_CHANGES = ("train.max_steps", "train.stop_at_step", "train.time_limit_minutes",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                     "data.num_workers", "log.", "vq.config", "vqa.pretrain_config")


def native_bf16(cuda: bool) -> bool:
    """Does this machine multiply bf16 at least as fast as fp32? CPUs need AVX512-BF16 or AMX:
    on an AVX2-only CPU (measured: AMD EPYC, torch 2.13) a bf16 matmul runs 5x slower than fp32."""
    if cuda:
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(requested: str, cuda: bool) -> str:
    """train.mixed_precision as Accelerate takes it: ``auto`` = bf16 where it is native, else no."""
    if requested == "fp16" and not cuda:
        raise MMError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU (or no, or auto)")
    if requested == "auto":
        return "bf16" if native_bf16(cuda) else "no"
    if requested == "bf16" and not native_bf16(cuda):
        where = "a GPU without bf16" if cuda else "a CPU without native bf16 (no AVX512-BF16 or AMX)"
        print(f"mm: warning: train.mixed_precision=bf16 on {where} runs several times slower than fp32; "
              "use train.mixed_precision=auto or no", file=sys.stderr)
    return requested


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, cuda)
    # find_unused_parameters: objectives switched per step leave some weights without grads.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.run.stage != "vq")
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state; a second run in the same process (the stages of
    # `mm demo`, a notebook) may ask for another precision. The distributed state stays.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not cuda, mixed_precision=precision, kwargs_handlers=[ddp])


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


def task_class(stage: str):
    module_name, cls_name = TASKS[stage].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def make_task(cfg: Config):
    return task_class(cfg.run.stage)(cfg)


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
        balance=cfg.data.vqa_balance,
        captions=cfg.data.captions,
    )


def ensure_vq(cfg: Config, run_dir: Path) -> Config:
    """Pretraining needs a VQ tokenizer: use vq.path, or train one first from vq.config.

    The nested run lives in ``RUN/vq`` (so it resumes too) and reads the same data sources;
    its architecture and training budget come from the vq.config file alone.
    """
    if cfg.run.stage != "pretrain" or cfg.vq.path:
        if cfg.vq.path and not (Path(cfg.vq.path) / "config.json").exists():
            raise MMError(f"vq.path {cfg.vq.path} is not a VQ tokenizer folder (no config.json); "
                          "export one with `mm train configs/vq/shapes.yaml`")
        return cfg
    if not cfg.vq.config:
        raise MMError("pretraining needs a VQ tokenizer: set vq.path=DIR (RUN/final of `mm train "
                      "configs/vq/shapes.yaml`) or vq.config=VQ.yaml to train one first")
    vq_run = run_dir / "vq"
    run_first(cfg, cfg.vq.config, vq_run, "vq", [])
    cfg = copy.deepcopy(cfg)
    cfg.vq.path = str(vq_run / "final")
    return cfg


def _as_override(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def run_first(cfg: Config, config_path: str, run_dir: Path, stage: str, extra: list[str]) -> None:
    """Train an earlier stage into ``run_dir`` (resuming it if needed) unless it has finished.

    The nested run reads the same data sources and precision as this one; its training budget
    and architecture come from ``config_path``, with ``extra`` overrides on top.
    """
    if (run_dir / "final" / "config.json").exists():
        return
    from mm.train.trainer import train

    d = cfg.data
    overrides = [f"run.dir={run_dir}", f"run.seed={cfg.run.seed}", f"run.stage={stage}",
                 f"train.mixed_precision={cfg.train.mixed_precision}",
                 f"data.train={_as_override(d.train)}", f"data.val={_as_override(d.val)}",
                 f"data.image_size={d.image_size}", f"data.shapes_train={d.shapes_train}",
                 f"data.shapes_val={d.shapes_val}", f"data.num_workers={d.num_workers}"]
    if d.shapes_cache:
        overrides.append(f"data.shapes_cache={d.shapes_cache}")
    print(f"mm: training the {stage} stage first ({config_path} -> {run_dir})", flush=True)
    train(load_config(config_path, overrides + extra))


def ensure_init(cfg: Config, run_dir: Path) -> Config:
    """VQA fine-tuning starts from a pretrained model: run.init_from, or pretrain first."""
    if cfg.run.stage != "vqa" or cfg.run.init_from:
        if cfg.run.init_from:
            init_folder(cfg.run.init_from)  # a clear error now rather than deep in the task
        return cfg
    if not cfg.vqa.pretrain_config:
        raise MMError("VQA fine-tuning needs a pretrained model: set run.init_from=RUN_OR_MODEL_DIR "
                      "or vqa.pretrain_config=PRETRAIN.yaml to pretrain first")
    pre_run = run_dir / "pretrain"
    run_first(cfg, cfg.vqa.pretrain_config, pre_run, "pretrain", [])
    cfg = copy.deepcopy(cfg)
    cfg.run.init_from = str(pre_run / "final")
    return cfg


def ensure_tokenizer(cfg: Config, run_dir: Path, accelerator) -> Config:
    """Stages with text need a tokenizer folder: given, the HF encoder's, the init model's, or trained."""
    if cfg.run.stage == "vq" or cfg.data.tokenizer or not getattr(task_class(cfg.run.stage), "uses_text", True):
        return cfg  # image-only tasks (uses_text = False) read no text
    cfg = copy.deepcopy(cfg)
    if cfg.model.text_encoder != "builtin":
        cfg.data.tokenizer = cfg.model.text_encoder  # a Hugging Face encoder brings its tokenizer
        return cfg
    if cfg.run.init_from:
        cfg.data.tokenizer = str(init_folder(cfg.run.init_from) / "tokenizer")
        return cfg
    from mm.data.shards import expand_shards
    from mm.data.tokenizer import captions_from_shards, train_tokenizer

    out = run_dir / "tokenizer"
    if accelerator.is_main_process and not (out / "tokenizer.json").exists():
        train_tokenizer(captions_from_shards(expand_shards(cfg.data.train)), cfg.data.vocab_size, out)
    accelerator.wait_for_everyone()
    cfg.data.tokenizer = str(out)
    return cfg


def init_folder(path: str) -> Path:
    """An exported model folder from a folder or a run folder (its ``final/``)."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    if (p / "final" / "config.json").exists():
        return p / "final"
    raise MMError(f"run.init_from {path} is neither a model folder nor a finished run folder; "
                  "point it at RUN/final of a pretraining run")
