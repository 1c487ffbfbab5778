"""`mm eval curves`: every checkpoint of a run evaluated and plotted against training CPU-minutes.

A tiny pretraining run (debug preset, 32 px, a random tiny VQ with a 4x4 code grid, a 2x2 plan, 4 steps with
a checkpoint every 2) is trained in this process; the tool must give one row per checkpoint with
increasing training time and the T2I and retrieval figures, a PNG, a table, and leave the run
folder as it was. A tiny VQ run joins it in a second call (its PSNR comes from metrics.jsonl).
"""

import json

import pytest
from PIL import Image

from mm.cli import main
from mm.config import load_config
from mm.eval.curves import format_table, plot_curves
from mm.train.trainer import Trainer

from .conftest import ROOT, tiny_vq_overrides
from .test_export import make_tiny_vq

STEPS = 4
KEYS = {"t2i_compositional_accuracy", "retrieval_r1_i2t", "retrieval_r1_t2i"}
PROBED = {f"t2i_probe_{a}" for a in ("colour", "shape", "cell", "count")}
PROBED |= {"t2i_probe_cell_plan2", "t2i_probe_cell_codes"}  # the run has a 2x2 plan: the cell word per part


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, shapes_cache):
    root = tmp_path_factory.mktemp("curves")
    vq, run = root / "vq", root / "pretrain"
    make_tiny_vq(vq)
    overrides = {
        "run.dir": run, "vq.path": vq, "model.preset": "debug", "model.patch_size": 8,
        "data.image_size": 32, "data.text_max_len": 16, "data.vocab_size": 300,
        "data.shapes_cache": shapes_cache, "data.shapes_train": 64, "data.shapes_val": 16,
        "data.val_samples": 8, "data.shuffle_buffer": 16, "model.t2i_plan": 2, "train.batch_size": 4, "train.max_steps": STEPS,
        "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.keep_checkpoints": 10,
        "train.eval_every": 0, "log.every": 1,
    }
    Trainer(load_config(ROOT / "configs" / "pretrain" / "shapes.yaml",
                        [f"{k}={v}" for k, v in overrides.items()])).fit()
    return run


@pytest.fixture(scope="module")
def curves(pretrain_run, shapes_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("curves_out")
    before = _snapshot(pretrain_run)
    args = ["eval", "curves", "--run", str(pretrain_run), "--data", str(shapes_shards / "test"),
            "--max-samples", "8", "--num-prompts", "4", "--out", str(out)]
    assert main(args) == 0
    assert _snapshot(pretrain_run) == before, "the tool wrote into the run folder"
    return out, args


def test_one_row_per_checkpoint_with_increasing_training_time(curves):
    out, _ = curves
    rows = json.loads((out / "curves.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [2, STEPS]
    assert [r["samples_seen"] for r in rows] == [8, 16]
    assert 0 < rows[0]["cpu_minutes"] < rows[1]["cpu_minutes"]
    assert 0 < rows[0]["wall_minutes"] < rows[1]["wall_minutes"]
    for r in rows:
        assert KEYS <= set(r["metrics"]), r["metrics"]
        assert all(0.0 <= r["metrics"][k] <= 100.0 for k in KEYS)
        probed = {k for k in r["metrics"] if k.startswith("t2i_probe_")}  # the 8 test images have
        assert probed == PROBED, r["metrics"]  # one-object ones and same-kind groups
        assert all(0.0 <= r["metrics"][k] <= 100.0 for k in probed)
    # the earlier checkpoint is exported by the tool; the finished run's own export stands for the last
    assert [r["model"] for r in rows] == ["checkpoint", "final"]
    assert (out / "exports" / "pretrain" / "step_2" / "config.json").is_file()


def test_plot_and_table(curves, capsys):
    out, args = curves
    with Image.open(out / "curves.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert main(args) == 0  # a second call reads the figures it kept
    table = capsys.readouterr().out
    assert "cpu_min" in table and "t2i_compositional_accuracy" in table
    assert len([line for line in table.splitlines() if line.startswith("pretrain ")]) == 2


def test_runs_are_compared_in_one_plot(curves, pretrain_run, tmp_path, shapes_cache, capsys):
    out, args = curves
    vq_run = tmp_path / "vq_run"
    Trainer(load_config(ROOT / "configs" / "vq" / "shapes.yaml", tiny_vq_overrides(
        vq_run, shapes_cache, **{"train.max_steps": 4, "train.eval_every": 2, "train.keep_checkpoints": 10}))).fit()
    exported = (out / "exports" / "pretrain" / "step_2" / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--run", str(vq_run)]) == 0
    assert (out / "exports" / "pretrain" / "step_2" / "model.safetensors").stat().st_mtime_ns == exported
    rows = json.loads((out / "curves.json").read_text())["rows"]
    vq_rows = [r for r in rows if r["run"] == "vq_run"]
    assert [r["step"] for r in vq_rows] == [2, 4] and all("vq_psnr" in r["metrics"] for r in vq_rows)
    assert {r["run"] for r in rows} == {"pretrain", "vq_run"}


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "curves", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and err.count("\n") == 1
    (tmp_path / "config.yaml").write_text("run:\n  stage: pretrain\n")
    assert main(["eval", "curves", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and err.count("\n") == 1


def test_table_and_plot_without_recorded_time(tmp_path):
    """Rows of runs trained before the time bookkeeping: shown in the table, left out of the plot."""
    rows = [{"run": "old", "step": 2, "samples_seen": 8, "cpu_minutes": None, "wall_minutes": None,
             "metrics": {"vqa_accuracy": 50.0}},
            {"run": "new", "step": 2, "samples_seen": 8, "cpu_minutes": 1.5, "wall_minutes": 0.8,
             "metrics": {"vqa_accuracy": 60.0, "extra": 1.0}}]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["run", "step", "samples", "cpu_min", "wall_min", "vqa_accuracy", "extra"]
    assert table[1].split() == ["old", "2", "8", "-", "-", "50.0", "-"]
    assert plot_curves(rows, tmp_path / "c.png").is_file()


def test_vqa_run_gives_vqa_accuracy(tmp_path):
    from tests.tasks.vqa_util import make_pretrained, samples, vqa_config, write_shards

    items = samples(4)
    shards = write_shards(tmp_path / "shards", items)
    cfg = vqa_config(tmp_path / "vqa", make_pretrained(tmp_path / "init", items), shards, steps=4,
                     train__checkpoint_every=2, train__keep_checkpoints=10)
    Trainer(cfg).fit()
    out = tmp_path / "out"
    assert main(["eval", "curves", "--run", str(tmp_path / "vqa"), "--data", str(shards), "--out", str(out)]) == 0
    rows = json.loads((out / "curves.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["cpu_minutes"] < rows[1]["cpu_minutes"]
    assert all(0.0 <= r["metrics"]["vqa_accuracy"] <= 100.0 for r in rows)
