"""`mm demo --fast`: the whole pipeline offline, report files complete, re-runs skip finished stages."""

import json
import math
import re
import socket

import pytest
from PIL import Image

from mm.cli import main
from mm.train.report import REQUIRED


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the run."""
    def refuse(self, *args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None))


def test_demo_fast_offline_writes_complete_report_and_resumes(tmp_path, no_network, capsys):
    with pytest.raises(OSError):  # the block is real
        socket.create_connection(("pypi.org", 443), timeout=1)
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/9\] \w+ +… \d+ s \(cpu \d+ s\)", first, re.MULTILINE)) == 9, first

    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED:
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), (key, report.get(key))
    assert 0 <= report["vqa_accuracy"] <= 100 and 0 <= report["t2i_compositional_accuracy"] <= 100
    assert set(report["stage_minutes"]) == {"data", "vq", "codes", "pretrain", "generate", "vqa", "classify",
                                             "detect", "evaluate"}
    assert report["minutes"] == pytest.approx(sum(report["stage_minutes"].values()))
    assert report["vq_steps"] == 30 and report["pretrain_steps"] == 40 and report["vqa_steps"] == 30
    assert report["classify_steps"] == 10 and report["detect_steps"] == 10
    assert 0 <= report["classify_top1"] <= 100 and report["classify_images"] > 0
    assert 0 <= report["detect_map"] <= report["detect_map_50"] <= 1 and report["detect_images"] > 0

    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for needed in ("generate/grid.png", "report/vq_reconstructions.png", "report/loss_pretrain.png",
                   "report/loss_vq.png", "report/loss_vqa.png", "report/examples/0.png", "report/confusion.png",
                   "report/detections.png"):
        assert needed in images, (needed, images)
    for rel in images:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.width >= 64
    assert "→ **" in md  # VQA answers beside their images

    # The same command again skips every finished stage and rewrites the same figures.
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("done earlier") == 9, again
    assert json.loads((out / "report.json").read_text())["vqa_accuracy"] == report["vqa_accuracy"]

    # A fast demo folder is not silently reused for the full budget.
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a fast demo" in err and len(err.strip().splitlines()) == 1


def test_demo_modes_have_every_stage_config_and_fast_long_exclude_each_other(tmp_path, capsys):
    from mm.config import load_config
    from mm.train.demo import MODES, STAGES, Demo

    for mode in MODES:
        demo = Demo(tmp_path / mode, mode)
        for stage in ("vq", "pretrain", "vqa", "classify", "detect"):
            cfg = load_config(demo.config_path(stage))
            assert cfg.run.stage == stage or stage == "pretrain"
        # every full-size stage reads the image size its pretraining writes
        size = load_config(demo.config_path("pretrain")).data.image_size
        assert all(load_config(demo.config_path(s)).data.image_size == size for s in ("vq", "vqa", "classify"))
    assert len(STAGES) == 9
    assert main(["demo", "--fast", "--long", "--out", str(tmp_path / "x")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "demo.json").write_text('{"mode": "long"}\n')
    assert main(["demo", "--out", str(tmp_path / "long")]) == 2
    err = capsys.readouterr().err
    assert "holds a long demo" in err and "mm demo --long --out" in err
