"""``mm export RUN_DIR --out DIR``: a run's newest checkpoint as a Hugging Face-style folder."""

from __future__ import annotations

import importlib
from pathlib import Path

from safetensors.torch import load_file

from mm.config import load_config
from mm.errors import MMError
from mm.train import checkpoint as ckpt


def export_run(run_dir: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """The newest complete checkpoint of ``run_dir`` as an exported folder ``out``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise MMError(f"{run_dir} is not a run folder (no config.yaml); pass the run.dir of an `mm train` run")
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise MMError(f"{run_dir} has no complete checkpoint yet; train longer or lower train.checkpoint_every")
    return export_checkpoint(run_dir, path, out, use_ema)


def export_checkpoint(run_dir: str | Path, path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Checkpoint folder ``path`` of run ``run_dir`` as an exported folder ``out`` (the run folder
    is only read: the tokenizer, VQ and answer vocabulary come from where the trainer put them)."""
    run_dir, path = Path(run_dir), Path(path)
    cfg = load_config(run_dir / "config.yaml")
    from mm.train.setup import TASKS  # the stage's task builds the model to load into

    module_name, cls_name = TASKS[cfg.run.stage].split(":")
    task_cls = getattr(importlib.import_module(module_name), cls_name)
    task = task_cls.for_export(cfg, run_dir) if hasattr(task_cls, "for_export") else task_cls(cfg)
    ckpt.load_module(task.model, path / "model.safetensors")
    ema = path / "ema.safetensors"
    if use_ema and ema.exists():
        state = task.model.state_dict()
        for k, v in load_file(str(ema)).items():
            state[k].copy_(v.to(state[k].dtype))
    task.model.eval()
    task.export(Path(out))
    return Path(out)


def cli_export(args) -> int:
    out = export_run(args.run_dir, args.out)
    print(f"mm: exported {args.run_dir} to {out}")
    return 0
