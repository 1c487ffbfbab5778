"""Learning curves: evaluation quality against training cost, for several runs at once.

``mm eval curves`` (the command is in mm/train/curves.py: it needs run folders, exports and the
task-level evaluations) produces one row per run x checkpoint; this module turns rows into
``curves.json``, ``curves.png`` and a table. A row::

    {"run": "t2i_only", "run_dir": "runs/t2i_only", "stage": "pretrain", "step": 500,
     "samples_seen": 16000, "cpu_minutes": 12.3, "wall_minutes": 6.4, "upstream_cpu_minutes": 3.1,
     "model": "checkpoint" | "final", "metrics": {"t2i_compositional_accuracy": 41.7, ...}}

``cpu_minutes``/``wall_minutes`` are the training time the trainer recorded at that checkpoint
(progress.json ``cpu_seconds``/``wall_seconds``: optimizer steps only, cumulative across resumes;
CPU time counts every thread, so with 2 torch threads it is ~2x wall). ``upstream_cpu_minutes``
is the CPU time of the runs the trainer ran first inside the run folder (RUN/vq, RUN/pretrain),
not included in ``cpu_minutes``. Plots use CPU-minutes as the x axis: runs with different thread
counts or machines load compare by the work they cost, not by how long they waited.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Known metrics in display order: name -> (label, unit). Others are shown after these.
METRICS = {
    "t2i_compositional_accuracy": ("T2I compositional accuracy", "%"),
    "retrieval_r1_i2t": ("retrieval R@1 image→text", "%"),
    "retrieval_r1_t2i": ("retrieval R@1 text→image", "%"),
    "vqa_accuracy": ("VQA accuracy", "%"),
    "vq_psnr": ("VQ val PSNR", "dB"),
    "vq_code_usage": ("VQ val code usage", "%"),
}


def minutes(seconds) -> float | None:
    """Seconds as minutes (to 6 ms: tiny test runs still order); None when the time was not recorded."""
    return None if seconds is None else round(float(seconds) / 60.0, 4)


def val_metrics_by_step(metrics_jsonl: Path) -> dict[int, dict]:
    """step -> the ``val/*`` values logged at that step in a run's metrics.jsonl (prefix dropped)."""
    out: dict[int, dict] = {}
    if not Path(metrics_jsonl).is_file():
        return out
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        vals = {k[4:]: v for k, v in row.items() if k.startswith("val/")}
        if vals:
            out.setdefault(int(row.get("step", 0)), {}).update(vals)
    return out


def metric_names(rows: list[dict]) -> list[str]:
    """The metrics present in ``rows``: known ones in METRICS order, then the rest sorted."""
    present = {k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))}
    return [k for k in METRICS if k in present] + sorted(present - set(METRICS))


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per row, one column per metric."""
    names = metric_names(rows)
    header = ["run", "step", "samples", "cpu_min", "wall_min", *names]
    lines = [[r["run"], str(r["step"]), str(r.get("samples_seen", "-")), _fmt(r["cpu_minutes"], 2),
              _fmt(r["wall_minutes"], 2), *(_fmt(r["metrics"].get(n)) for n in names)] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def plot_curves(rows: list[dict], out: Path) -> Path:
    """One panel per metric, one line per run, x = training CPU-minutes; rows without a
    recorded time or without the metric are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the training machines
    import matplotlib.pyplot as plt

    names = metric_names(rows) or ["(no metrics)"]
    cols = min(3, len(names))
    n_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.4 * n_rows), squeeze=False)
    runs = list(dict.fromkeys(r["run"] for r in rows))  # first-seen order
    for ax, name in zip(axes.flat, names):
        for i, run in enumerate(runs):
            pts = sorted((r["cpu_minutes"], r["metrics"][name]) for r in rows if r["run"] == run
                         and r["cpu_minutes"] is not None and isinstance(r["metrics"].get(name), (int, float)))
            if pts:  # a run keeps its colour in every panel
                ax.plot(*zip(*pts), marker="o", label=run, color=f"C{i % 10}")
        label, unit = METRICS.get(name, (name, ""))
        ax.set(xlabel="training CPU-minutes", title=f"{label}" + (f" ({unit})" if unit else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_curves(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """``OUT/curves.json`` (the rows) and ``OUT/curves.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "curves.json"
    json_path.write_text(json.dumps({"rows": rows, "metrics": metric_names(rows)}, indent=1) + "\n")
    return json_path, plot_curves(rows, out_dir / "curves.png")
