"""The trainer records its training time: progress.json and metrics.jsonl rows carry cumulative
``cpu_seconds`` (time.process_time) and ``wall_seconds``, continued across a resume."""

import json

from mm.config import load_config
from mm.train.trainer import Trainer

from .conftest import ROOT, tiny_vq_overrides

CONFIG = ROOT / "configs" / "vq" / "shapes.yaml"


def _progress(run, step=None):
    path = run / "checkpoints" / f"step_{step}" / "progress.json" if step else run / "progress.json"
    return json.loads(path.read_text())


def test_training_time_is_recorded_and_continues_across_a_resume(tmp_path, shapes_cache):
    run = tmp_path / "run"
    overrides = tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": 4, "train.keep_checkpoints": 10})
    Trainer(load_config(CONFIG, overrides + ["train.stop_at_step=2"])).fit()
    first = _progress(run, 2)
    assert first["cpu_seconds"] > 0 and first["wall_seconds"] > 0
    assert abs(first["progress"]["cpu_seconds"] - first["cpu_seconds"]) < 1e-3  # the resumable copy, unrounded

    # Pretend the first half took 1000 CPU-seconds: a resumed run must continue from that total,
    # not restart its clock at zero.
    first["progress"].update(cpu_seconds=1000.0, wall_seconds=600.0)
    (run / "checkpoints" / "step_2" / "progress.json").write_text(json.dumps(first))
    Trainer(load_config(CONFIG, overrides)).fit()
    last = _progress(run, 4)
    assert 1000.0 < last["cpu_seconds"] < 1000.0 + 120 and 600.0 < last["wall_seconds"] < 600.0 + 120
    assert _progress(run) == last  # the run folder's copy is the newest checkpoint's

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [(r["step"], r["cpu_seconds"], r["wall_seconds"]) for r in rows if "loss" in r]
    assert [s for s, _, _ in timed] == [1, 2, 3, 4]
    assert all(c > 0 and w > 0 for _, c, w in timed)
    assert timed[2][1] > 1000.0 and timed[0][1] <= timed[1][1]  # resumed rows continue the total
