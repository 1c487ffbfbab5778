"""The detect stage: overfitting a batch to mAP@.5 = 1, bad boxes skipped and counted, `mm train` +
export + `mm detect` on a tiny model, loading from the folder in Python."""

import json

import pytest
import torch
from PIL import Image

from mm.cli import main
from mm.config import Config, load_config
from mm.data.shapes import make_sample
from mm.data.transforms import load_image, to_tensor
from mm.models.detr import Detector
from mm.tasks.detect import DetectTask, detect_images

SMALL = {"model__preset": "debug", "model__width": 64, "model__heads": 4, "detect__num_queries": 9,
         "detect__depth": 2}


def _config(**extra) -> Config:
    cfg = Config()
    cfg.run.stage = "detect"
    cfg.data.image_size = 32
    for key, value in {**SMALL, **extra}.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _batch(n: int, split: str = "train") -> dict:
    samples = [make_sample(0, split, i, 32) for i in range(n)]
    return {"image": to_tensor([load_image(s["png"], 32) for s in samples]), "meta": [s["json"] for s in samples],
            "key": [s["__key__"] for s in samples]}


def test_detector_overfits_one_batch_to_map50_of_one():
    torch.manual_seed(0)
    task = DetectTask(_config())
    batch = _batch(6)
    opt = torch.optim.AdamW(task.model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(400):
        loss, _ = task.loss(batch, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0)
        opt.step()
        if step % 50 == 49:
            task.model.eval()
            metrics = task.validate([batch])
            task.model.train()
            if metrics["map_50"] == 1.0:
                break
    assert metrics["map_50"] == 1.0, metrics


def test_bad_boxes_are_skipped_counted_and_warned_once(capsys):
    task = DetectTask(_config())
    batch = _batch(2)
    meta = json.loads(json.dumps(batch["meta"][0]))
    good = len(meta["objects"])
    meta["objects"] += [{"shape": "circle", "bbox": [-3, 2, 5, 6]}, {"shape": "circle", "bbox": [2, 2, 40, 6]},
                        {"shape": "circle", "bbox": [4, 4, 4, 9]}, {"shape": "hexagon", "bbox": [1, 1, 5, 5]},
                        {"shape": "square", "bbox": "nonsense"}, "not a dict"]
    batch["meta"][0] = meta
    targets = task.targets(batch)
    assert len(targets[0]["labels"]) == good
    assert dict(task.skipped) == {"box_negative": 1, "box_outside_image": 1, "box_empty": 1,
                                  "box_unknown_category": 1, "box_malformed": 2}
    loss, metrics = task.loss(batch, 0)  # trains on the good boxes, no crash
    assert torch.isfinite(loss) and metrics["boxes_skipped"] == 12.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("mm: warning: skipped a bad box") for line in err)


def test_targets_follow_the_centre_crop_of_a_wide_image():
    task = DetectTask(_config())
    meta = {"boxes_size": [64, 32], "objects": [{"shape": "square", "bbox": [16, 0, 32, 16]},
                                                {"shape": "circle", "bbox": [0, 0, 8, 8]}]}  # left of the crop
    batch = {"image": torch.zeros(1, 3, 32, 32), "meta": [meta], "key": ["k"]}
    (t,) = task.targets(batch)
    assert t["labels"].tolist() == [1]  # square; the circle is outside the 32 px centre square
    assert t["boxes"][0].tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5])
    assert task.skipped["box_outside_crop"] == 1


def test_train_export_and_mm_detect_on_a_tiny_model(tmp_path, shapes_shards, capsys):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.train={shapes_shards / 'train'}", f"data.val={shapes_shards / 'val'}",
                 "model.preset=debug", "detect.num_queries=4", "detect.depth=1", "train.max_steps=3",
                 "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=0", "data.val_samples=16",
                 "log.every=1", "data.image_size=32", "model.patch_size=4"]  # the fixture shards' size
    assert main(["train", "configs/detect/shapes.yaml", *overrides]) == 0
    final = run / "final"
    assert (final / "detr.json").is_file() and (final / "config.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/map_50" in r for r in rows)

    sample = make_sample(0, "test", 0, 32)
    image = tmp_path / "img.png"
    image.write_bytes(sample["png"])
    out = tmp_path / "boxes.png"
    capsys.readouterr()
    assert main(["detect", "--model", str(run), "--image", str(image), "--out", str(out), "--min-score", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f"{image}: 4 object(s)" and printed[-1] == f"boxes drawn in {out}"
    assert Image.open(out).size[0] >= 192

    # Python: load the folder, one call per batch of images; the same as the CLI printed.
    detector = Detector.from_pretrained(final)
    (found,) = detect_images(detector, [Image.open(image)], min_score=0.0)
    assert len(found) == 4 and found[0]["label"] in detector.class_names
    assert printed[1].split()[0] == found[0]["label"]
    x = to_tensor([load_image(sample["png"], 32)])
    task = DetectTask(load_config(run / "config.yaml"))
    task.model.load_state_dict(detector.state_dict())
    assert torch.equal(task.model.eval()(x)[-1][1], detector(x)[-1][1])

    # `mm export` of the run's checkpoint gives the same detector as the trainer's export.
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = Detector.from_pretrained(tmp_path / "exported")
    assert torch.equal(exported(x)[-1][1], detector(x)[-1][1])


def test_mm_detect_errors_are_one_line(tmp_path, capsys):
    assert main(["detect", "--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--out", "o.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm: error:") and len(err.splitlines()) == 1


def test_shipped_detect_config_loads():
    cfg = load_config("configs/detect/shapes.yaml", [])
    assert cfg.run.stage == "detect" and cfg.detect.label == "shape"
