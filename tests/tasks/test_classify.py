"""The classify stage: labels from metadata, top-k against a hand computation, overfitting a batch,
a linear probe on a pretrained backbone, a tiny `mm train` run, its export and `mm classify`."""

import json

import pytest
import torch

from mm.cli import main
from mm.config import Config
from mm.data.shapes import make_sample
from mm.data.shards import ShardWriter
from mm.eval.classification import classification_report, confusion_matrix, per_class_accuracy, topk_accuracy
from mm.models.classifier import ImageClassifier
from mm.tasks.classify import ClassifyTask, label_of, load_classifier, natural_key
from mm.train.trainer import Trainer

SIZE = 16
MODEL = {"preset": "debug", "width": 48, "heads": 4, "patch_size": 4}


def classify_config(run_dir, shards, target="count", steps=30, **extra) -> Config:
    cfg = Config()
    cfg.run.dir, cfg.run.stage = str(run_dir), "classify"
    cfg.model.preset, cfg.model.width, cfg.model.heads = MODEL["preset"], MODEL["width"], MODEL["heads"]
    cfg.data.train = cfg.data.val = [str(shards)]
    cfg.data.image_size, cfg.data.shuffle_buffer, cfg.data.val_samples = SIZE, 32, 64
    cfg.classify.target = target
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps, t.weight_decay = steps, 16, 3e-3, 5, 0.0
    t.checkpoint_every, t.eval_every, t.min_lr_ratio = 0, 0, 1.0
    cfg.log.every = 1000
    for key, value in extra.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.fixture(scope="module")
def items():
    return [make_sample(0, "train", i, SIZE) for i in range(32)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, items):
    out = tmp_path_factory.mktemp("classify") / "shards"
    with ShardWriter(out, prefix="cls", samples_per_shard=8) as w:
        for s in items:
            w.write(s)
    return out


def batch_of(items) -> dict:
    from mm.data.transforms import load_image, to_tensor

    return {"image": to_tensor([load_image(s["png"], SIZE) for s in items]), "meta": [s["json"] for s in items]}


# ---------------------------------------------------------------------------------------------
# Labels and metrics


def test_labels_from_shapes_metadata_and_json_label():
    one = {"objects": [{"shape": "circle"}]}
    three = {"objects": [{"shape": "circle"}, {"shape": "square"}, {"shape": "circle"}]}
    assert label_of(one, "shape") == "circle" and label_of(three, "shape") is None  # 1-object images only
    assert label_of(one, "count") == "1" and label_of(three, "count") == "3"
    assert label_of({}, "count") is None and label_of({"objects": "x"}, "shape") is None
    assert label_of({"label": " cat "}, "label") == "cat" and label_of({"label": 7}, "label") == "7"
    for bad in ({"label": ""}, {"label": None}, {"label": True}, {"label": [1]}, {}):
        assert label_of(bad, "label") is None
    assert sorted(["10", "2", "b", "1", "a"], key=natural_key) == ["1", "2", "10", "a", "b"]


def test_topk_and_per_class_accuracy_against_a_hand_computation():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9],    # label 5: top-1 hit
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],    # label 4: rank 5 -> top-5 hit only
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],    # label 0: rank 6 -> miss
                           [0.3, 0.2, 0.9, 0.1, 0.0, 0.0]])   # label 0: rank 2 -> top-5 hit only
    labels = torch.tensor([5, 4, 0, 0])
    assert topk_accuracy(logits, labels, (1, 2, 5)) == {"top1": 25.0, "top2": 50.0, "top5": 75.0}
    assert topk_accuracy(logits[:, :3], torch.tensor([2, 1, 0, 0]), (5,)) == {"top5": 100.0}  # k >= classes
    m = confusion_matrix(logits.argmax(1), labels, 6)
    assert m[5, 5] == 1 and m[4, 0] == 1 and m[0, 5] == 1 and m[0, 2] == 1 and int(m.sum()) == 4
    acc = per_class_accuracy(m)
    assert acc[5] == 100.0 and acc[4] == 0.0 and acc[0] == 0.0 and acc[1] != acc[1]  # NaN: no samples
    report = classification_report(logits, labels, list("abcdef"))
    assert report["metrics"]["acc_f"] == 100.0 and "acc_b" not in report["metrics"]
    assert report["metrics"]["mean_class_accuracy"] == pytest.approx(100 / 3)


# ---------------------------------------------------------------------------------------------
# Training


def test_tiny_classifier_overfits_a_batch_to_100_percent(tmp_path, items, shards):
    cfg = classify_config(tmp_path / "run", shards, target="count")
    task = ClassifyTask(cfg)
    task.setup(tmp_path / "run")
    assert task.labels == ["1", "2", "3", "4"]
    batch = batch_of(items[:16])
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, metrics = task.loss(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert metrics["train_top1"] == 100.0 and metrics["labelled"] == 16.0
    task.model.eval()
    assert task.validate([batch])["top1"] == 100.0


def test_shape_target_drops_multi_object_images(tmp_path, items, shards):
    task = ClassifyTask(classify_config(tmp_path / "run", shards, target="shape"))
    task.setup(tmp_path / "run")
    batch = batch_of(items[:16])
    images, y = task.targets(batch)
    singles = [s for s in items[:16] if len(s["json"]["objects"]) == 1]
    assert 0 < len(y) == len(singles) == images.shape[0] < 16
    assert [task.labels[i] for i in y] == [s["json"]["objects"][0]["shape"] for s in singles]
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["target"] == "shape"


def test_linear_probe_trains_only_the_head_of_a_pretrained_backbone(tmp_path, items, shards):
    from mm.models.presets import create_model

    pretrained = create_model("debug", image_size=SIZE, width=48, heads=4)
    pretrained.save_pretrained(tmp_path / "pre")
    cfg = classify_config(tmp_path / "run", shards, run__init_from=str(tmp_path / "pre"), classify__mode="probe")
    task = ClassifyTask(cfg)
    task.setup(tmp_path / "run")
    pre_state = pretrained.state_dict()
    for k, v in task.model.state_dict().items():  # the pretrained patch embedding and backbone, exactly
        assert k.startswith("head.") or torch.equal(v, pre_state[k]), k
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    assert trainable and all(p is q for p, q in zip(trainable, task.model.head.parameters()))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss, _ = task.loss(batch_of(items[:8]), 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = task.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)


def test_train_export_and_mm_classify_cli(tmp_path, items, shards, capsys):
    cfg = classify_config(tmp_path / "run", shards, target="count", steps=20)
    trainer = Trainer(cfg)
    result = trainer.fit()
    final = tmp_path / "run" / "final"
    assert result["step"] == 20 and "val/top1" in result and "val/top5" in result
    assert {p.name for p in final.iterdir()} >= {"config.json", "model.safetensors", "eval.json", "confusion.png"}
    assert json.loads((final / "config.json").read_text())["labels"] == ["1", "2", "3", "4"]

    # from_pretrained gives the trained model back; one call per image batch
    classifier = load_classifier(tmp_path / "run", device="cpu")  # a run folder means its final/
    batch = batch_of(items[:4])
    trainer.task.model.eval()
    with torch.no_grad():
        expected = trainer.task.model(batch["image"]).softmax(-1)
    top = classifier.from_tensors(batch["image"], k=2)
    assert [t[0][1] for t in top] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    from PIL import Image

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(items[i]["png"])
    assert classifier([Image.open(p) for p in paths]) == [t[0][0] for t in top[:2]]

    capsys.readouterr()
    assert main(["classify", "--model", str(final), "--image", *map(str, paths), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{paths[0]}: {top[0][0][0]}" and len(lines) == 2 * (1 + 3)
    assert all(line.startswith("  ") and line.split()[1] in ("1", "2", "3", "4") for line in lines[1:4])

    # `mm export` of the run rebuilds the task with the same labels
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    again = ImageClassifier.from_pretrained(tmp_path / "exported")
    assert again.config.labels == ["1", "2", "3", "4"]


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    from mm.models.presets import create_model

    create_model("debug", image_size=SIZE).save_pretrained(tmp_path / "mm_model")
    img = tmp_path / "a.png"
    img.write_bytes(make_sample(0, "train", 0, SIZE)["png"])
    cases = [(["classify", "--model", str(tmp_path / "mm_model"), "--image", str(img)], "not a classifier"),
             (["classify", "--model", str(tmp_path / "nope"), "--image", str(img)], "not a saved mm classifier"),
             (["classify", "--model", str(tmp_path / "mm_model"), "--image", str(tmp_path / "x.png")],
              "image not found"),
             (["train", "configs/classify/shapes.yaml", "classify.target=colour"], "classify.target")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mm: error: ") and message in err and "\n" not in err, err
