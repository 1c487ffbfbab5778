"""``mm eval curves``: evaluate every checkpoint of one or more runs; quality against CPU-minutes.

    mm eval curves --run RUN_DIR [--run RUN_DIR ...] [--data SHARDS] [--max-samples N]
                   [--num-prompts N] --out DIR

For each run folder written by ``mm train`` (config.yaml, checkpoints/step_N/, metrics.jsonl,
progress.json), every complete checkpoint is evaluated by the run's stage:

- pretrain: T2I compositional accuracy on ``--num-prompts`` held-out prompts (mm.eval.t2i) and
  the word-binding probe on ``--data`` (mm.eval.t2i_probe: ``t2i_probe_colour/shape/cell/count``)
  when ``objectives.t2i`` > 0; retrieval R@1 both ways on ``--data`` (the ``mm eval retrieval``
  function, ITM re-ranking of the top 16 when ``objectives.itm`` > 0) when ``objectives.itc`` > 0;
- vqa: VQA accuracy on every question of ``--data`` (the ``mm eval vqa --model`` function);
- vq: the val PSNR the trainer logged at that step (metrics.jsonl), when it validated there.

A checkpoint is exported (mm.train.export) to ``OUT/exports/RUN/step_N``; the run folder is only
read. A finished run's own ``RUN/final`` stands for its last checkpoint (the same weights). The
figures of each checkpoint are kept in ``OUT/exports/RUN/step_N/eval/curves.json`` with the
settings that produced them, so adding a run to a comparison evaluates only the new run.
The x axis is the training time the trainer recorded at the checkpoint (see mm.eval.curves).
Writes OUT/curves.json and OUT/curves.png and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

from mm.config import load_config
from mm.errors import MMError
from mm.eval.curves import format_table, minutes, val_metrics_by_step, write_curves
from mm.train import checkpoint as ckpt

STAGES = ("vq", "pretrain", "vqa")
RERANK_K = 16  # the `mm eval retrieval` default


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path, dict]]:
    """(step, folder, its progress.json) of every complete checkpoint, oldest first."""
    if not (run_dir / "config.yaml").is_file():
        raise MMError(f"{run_dir} is not a run folder (no config.yaml); pass the run.dir of an `mm train` run")
    found = [(step, path, json.loads((path / "progress.json").read_text()))
             for step, path in ckpt.list_checkpoints(run_dir)]
    if not found:
        raise MMError(f"{run_dir} has no complete checkpoint; train it (mm train) with train.checkpoint_every "
                      "set (and train.keep_checkpoints large enough to keep every point of the curve)")
    return found


def run_config(run_dir: Path, args):
    """The run's saved config, checked against what its stage needs from the command line."""
    cfg = load_config(run_dir / "config.yaml")
    if cfg.run.stage not in STAGES:
        raise MMError(f"{run_dir}/config.yaml has run.stage={cfg.run.stage}; curves know {', '.join(STAGES)}")
    if cfg.run.stage != "vq" and not args.data:
        raise MMError(f"{run_dir} is a {cfg.run.stage} run: pass --data SHARDS to evaluate it on "
                      "(e.g. the test split of `mm data shapes`)")
    return cfg


def final_is_last(run_dir: Path, last: Path) -> bool:
    """True when RUN/final was exported after the last checkpoint was written: the finished run's
    export of those weights (a run resumed past its export has a newer checkpoint than final)."""
    final = run_dir / "final" / "model.safetensors"
    return final.is_file() and final.stat().st_mtime_ns >= (last / ckpt.COMPLETE).stat().st_mtime_ns


def model_folder(run_dir: Path, path: Path, cache: Path, use_final: bool, source: dict) -> Path:
    """The exported model of checkpoint ``path``: RUN/final, the export cached for the same
    ``source`` (checkpoint and when it was written), or a new export."""
    if use_final:
        return run_dir / "final"
    marker = cache / "source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return cache
    from mm.train.export import export_checkpoint

    tmp = cache.with_name(cache.name + ".tmp")  # renamed when complete: a crash leaves no half export
    shutil.rmtree(tmp, ignore_errors=True)
    export_checkpoint(run_dir, path, tmp)
    (tmp / "source.json").write_text(json.dumps(source) + "\n")
    shutil.rmtree(cache, ignore_errors=True)  # a stale export, or the eval/ of a final-export row
    tmp.rename(cache)
    return cache


def _quiet(func, **kwargs) -> dict:
    """An ``mm eval`` command function run with its printed JSON swallowed; its ``out`` file read."""
    with contextlib.redirect_stdout(io.StringIO()):
        func(argparse.Namespace(**kwargs))
    return json.loads(Path(kwargs["out"]).read_text())


def eval_pretrain(cfg, model: Path, args, eval_dir: Path) -> dict:
    metrics = {}
    if cfg.objectives.t2i > 0:
        from mm.eval.t2i import evaluate_t2i
        from mm.generation.pipeline import TextToImagePipeline

        t2i = evaluate_t2i(TextToImagePipeline.from_pretrained(model), args.num_prompts)
        metrics["t2i_compositional_accuracy"] = 100.0 * t2i["t2i_compositional_accuracy"]  # percent, as the rest
        metrics.update(probe_metrics(model, args))
    if cfg.objectives.itc > 0:
        from mm.tasks.pretrain import cli_eval_retrieval

        k = RERANK_K if cfg.objectives.itm > 0 else 0  # an untrained ITM head would only scramble the ranking
        ret = _quiet(cli_eval_retrieval, model=str(model), data=args.data, k=k, max_samples=args.max_samples,
                     batch_size=64, out=str(eval_dir / "retrieval.json"))
        metrics["retrieval_r1_i2t"], metrics["retrieval_r1_t2i"] = ret["i2t_r1"], ret["t2i_r1"]
        metrics.update({f"retrieval_{name}": v for name, v in ret.items() if name.endswith("_single")})
    return metrics


def probe_metrics(model: Path, args) -> dict:
    """``t2i_probe_{colour,shape,cell,count}``: which prompt words the model binds (mm.eval.t2i_probe)
    on the first ``--max-samples`` images of ``--data``; none for data without shapes objects. A model
    with a T2I plan adds the cell word's per part: ``t2i_probe_cell_plan3`` (the 3x3 plan alone), …,
    ``t2i_probe_cell_codes``."""
    from mm.eval.t2i_probe import CHANCE, probe
    from mm.tasks.pretrain import _eval_setup

    m, tokenizer, vq, device, loader = _eval_setup(argparse.Namespace(model=str(model), data=args.data, batch_size=32))
    found = probe(m, tokenizer, vq, loader, args.max_samples, device)
    out = {f"t2i_probe_{attr}": v["accuracy"] for attr, v in found.items() if attr in CHANCE}
    # a plan model: which stage binds the position word (the open question; the other words' parts
    # are in scripts/t2i_probe.py's output, kept out of the plot's panels)
    out.update({f"t2i_probe_cell_{part}": v for part, v in found.get("by_part", {}).get("cell", {}).items()})
    return out


def eval_vqa(model: Path, args) -> dict:
    from mm.eval.vqa import evaluate_vqa, results_from_model

    results, annotations, questions = results_from_model(argparse.Namespace(model=str(model), data=args.data,
                                                                            batch_size=64))
    return {"vqa_accuracy": evaluate_vqa(results, annotations, questions)["overall"]}


def eval_checkpoint(run_dir: Path, cfg, step: int, path: Path, use_final: bool, cache: Path, args) -> dict:
    """The metrics of one checkpoint, from the cache when the same settings produced them."""
    stage = cfg.run.stage
    if stage == "vq":  # the trainer's own validation at this step (none if it did not validate there)
        val = val_metrics_by_step(run_dir / "metrics.jsonl").get(step, {})
        return {f"vq_{k}": val[k] for k in ("psnr", "code_usage") if k in val}
    # A run folder trained again from scratch has new checkpoints under the same names.
    source = {"checkpoint": str(path.resolve()), "written": (path / ckpt.COMPLETE).stat().st_mtime_ns,
              "model": "final" if use_final else "checkpoint"}
    settings = {**source, "data": args.data, "max_samples": args.max_samples, "num_prompts": args.num_prompts,
                "t2i_probe": 2}  # figures kept before the probe (or its parts) existed are evaluated again
    saved = cache / "eval" / "curves.json"
    if saved.is_file() and json.loads(saved.read_text()).get("settings") == settings:
        return json.loads(saved.read_text())["metrics"]
    model = model_folder(run_dir, path, cache, use_final, source)
    (cache / "eval").mkdir(parents=True, exist_ok=True)
    metrics = eval_pretrain(cfg, model, args, cache / "eval") if stage == "pretrain" else eval_vqa(model, args)
    saved.write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=1) + "\n")
    return metrics


def upstream_cpu_minutes(run_dir: Path) -> float:
    """CPU-minutes of the runs the trainer ran first inside this run folder (RUN/vq, RUN/pretrain,
    recursively): the cost of a VQA run includes its pretraining, which its own clock leaves out."""
    total = 0.0
    for sub in ("vq", "pretrain"):
        progress = run_dir / sub / "progress.json"
        if progress.is_file():
            total += json.loads(progress.read_text()).get("cpu_seconds", 0.0) / 60.0
            total += upstream_cpu_minutes(run_dir / sub)
    return round(total, 3)


def curve_rows(run_dir: Path, label: str, exports: Path, args) -> list[dict]:
    """One row per complete checkpoint of ``run_dir`` (see mm.eval.curves for the row layout)."""
    found, cfg = run_checkpoints(run_dir), run_config(run_dir, args)
    upstream = upstream_cpu_minutes(run_dir)
    rows = []
    for i, (step, path, progress) in enumerate(found):
        use_final = i == len(found) - 1 and final_is_last(run_dir, path)
        print(f"mm: curves: {label} step {step} ({i + 1}/{len(found)})", file=sys.stderr, flush=True)
        metrics = eval_checkpoint(run_dir, cfg, step, path, use_final, exports / label / f"step_{step}", args)
        rows.append({"run": label, "run_dir": str(run_dir), "stage": cfg.run.stage, "step": step,
                     "samples_seen": progress.get("samples_seen"),
                     "cpu_minutes": minutes(progress.get("cpu_seconds")),
                     "wall_minutes": minutes(progress.get("wall_seconds")),
                     "upstream_cpu_minutes": upstream, "model": "final" if use_final else "checkpoint",
                     "metrics": metrics})
    if rows[0]["cpu_minutes"] is None:
        print(f"mm: warning: {run_dir} was trained before mm recorded training time: its rows have no "
              "cpu_minutes and are left out of the plot", file=sys.stderr)
    return rows


def unique_labels(run_dirs: list[Path]) -> list[str]:
    """Run folder names, made unique with -2, -3, ... (runs/a/pretrain and runs/b/pretrain)."""
    labels: list[str] = []
    for d in run_dirs:
        name, n = d.name, 2
        while name in labels:
            name, n = f"{d.name}-{n}", n + 1
        labels.append(name)
    return labels


def cli_eval_curves(args: argparse.Namespace) -> int:
    from mm.eval.t2i import MAX_PROMPTS

    if args.max_samples < 1:
        raise MMError(f"--max-samples must be >= 1, got {args.max_samples}")
    if not 2 <= args.num_prompts <= MAX_PROMPTS:
        raise MMError(f"--num-prompts must be in [2, {MAX_PROMPTS}] (FID needs 2 images), got {args.num_prompts}")
    run_dirs = [Path(r).expanduser() for r in args.run]
    for d in run_dirs:  # every run checked before the first (slow) evaluation
        run_checkpoints(d)
        run_config(d, args)
    out = Path(args.out)
    rows = []
    for d, label in zip(run_dirs, unique_labels(run_dirs)):
        rows += curve_rows(d, label, out / "exports", args)
    json_path, png_path = write_curves(rows, out)
    print(format_table(rows))
    print(f"mm: wrote {json_path} and {png_path}")
    return 0
