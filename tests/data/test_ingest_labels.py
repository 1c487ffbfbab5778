"""`mm data ingest` of labelled images: class folders, a CSV/JSONL label column, HF metadata.jsonl
with a label; bad labels are skipped and counted, one summary line per reason."""

import csv
import io
import json
from pathlib import Path

from PIL import Image

from mm.cli import main
from mm.data.ingest import ingest

from .test_ingest import read_shards


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def labels_by_source(out: Path) -> dict:
    return {json.loads(s["json"])["source"]: json.loads(s["json"]).get("label") for s in read_shards(out)}


def test_class_folders_label_is_the_folder_name(tmp_path):
    src = tmp_path / "src"
    put(src / "cat" / "1.png", png((255, 0, 0)))
    put(src / "cat" / "2.png", png((250, 0, 0)))
    put(src / "dog" / "a.png", png((0, 255, 0)))
    put(src / "train" / "bird" / "x.png", png((0, 0, 255)))  # nested: the image's own folder
    put(src / "stray.png", png((9, 9, 9)))  # in the root: no class
    put(src / "notes.md", "not data")
    summary = ingest(src, tmp_path / "out")
    assert summary["kind"] == "class_folders"
    assert summary["ingested"] == 4 and summary["skipped"] == {"missing_label": 1}
    assert summary["labels"] == {"bird": 1, "cat": 2, "dog": 1} and summary["ignored_files"] == 1
    assert labels_by_source(tmp_path / "out") == {"cat/1.png": "cat", "cat/2.png": "cat", "dog/a.png": "dog",
                                                  "train/bird/x.png": "bird"}
    assert all("txt" not in s for s in read_shards(tmp_path / "out"))  # no caption invented
    from mm.data.inspect import inspect_shards

    report = inspect_shards(str(tmp_path / "out"))  # labelled images without captions are good samples
    assert report["good_samples"] == 4 and report["problems"] == {} and "[cat]" in report["examples"]

    summary = ingest(src, tmp_path / "fixed", classes=["cat", "bird"])
    assert summary["ingested"] == 3 and summary["skipped"] == {"missing_label": 1, "unknown_label": 1}


def test_csv_and_jsonl_label_columns_with_bad_labels(tmp_path):
    for name in ("a", "b", "c"):
        put(tmp_path / "img" / f"{name}.png", png((len(name), 0, 0)))
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["image", "class", "note"], ["img/a.png", " tabby  cat ", "x"],
                                 ["img/b.png", "", "empty"], ["img/c.png", "dog", "y"]])
    summary = ingest(table, tmp_path / "csv", label_column="class")
    assert summary["ingested"] == 2 and summary["skipped"] == {"empty_label": 1}
    samples = read_shards(tmp_path / "csv")
    assert [json.loads(s["json"])["label"] for s in samples] == ["tabby cat", "dog"]
    assert json.loads(samples[0]["json"])["note"] == "x" and "class" not in json.loads(samples[0]["json"])

    rows = [{"image": "img/a.png", "label": "cat", "caption": "a cat"}, {"image": "img/b.png", "label": None},
            {"image": "img/c.png", "label": 3}, {"image": "img/a.png", "label": 2.5},
            {"image": "img/b.png", "label": ["cat"]}, {"image": "img/c.png", "label": True},
            {"image": "img/a.png", "label": "bird"}, {"image": "img/b.png", "label": "  "}]
    put(tmp_path / "labels.jsonl", "\n".join(json.dumps(r) for r in rows))
    summary = ingest(tmp_path / "labels.jsonl", tmp_path / "jl", classes=["cat", "3"])
    assert summary["ingested"] == 2
    assert summary["skipped"] == {"missing_label": 1, "label_not_string": 3, "unknown_label": 1, "empty_label": 1}
    samples = read_shards(tmp_path / "jl")
    assert [json.loads(s["json"])["label"] for s in samples] == ["cat", "3"]  # an integer is a class id
    assert samples[0]["txt"] == b"a cat" and "txt" not in samples[1]  # captions kept when given


def test_hf_imagefolder_metadata_with_label(tmp_path):
    root = tmp_path / "hf"
    put(root / "train" / "x.png", png((1, 2, 3)))
    put(root / "train" / "y.png", png((4, 5, 6)))
    put(root / "train" / "z.png", png((7, 8, 9)))
    put(root / "train" / "metadata.jsonl", "\n".join(json.dumps(r) for r in [
        {"file_name": "x.png", "label": "circle"}, {"file_name": "y.png", "label": "square", "text": "a square"},
        {"file_name": "z.png", "label": ""}]))
    summary = ingest(root, tmp_path / "out")
    assert summary["kind"] == "imagefolder" and summary["ingested"] == 2
    assert summary["skipped"] == {"empty_label": 1}
    assert labels_by_source(tmp_path / "out") == {"train/x.png": "circle", "train/y.png": "square"}


def test_cli_prints_one_line_per_bad_label_reason(tmp_path, capsys):
    put(tmp_path / "img" / "a.png", png((1, 1, 1)))
    put(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in [
        {"image": "img/a.png", "label": "ok"}, {"image": "img/a.png", "label": ""},
        {"image": "img/a.png", "label": {"name": "x"}}]))
    assert main(["data", "ingest", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out"),
                 "--classes", "ok,other"]) == 0
    out = capsys.readouterr().out
    assert "ingested 1 samples" in out and "labels: 1 classes (ok 1)" in out
    lines = out.splitlines()
    assert sum("empty_label" in line for line in lines) == 1
    assert sum("label_not_string" in line for line in lines) == 1
