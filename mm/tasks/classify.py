"""Image classification on the shared backbone: fine-tuning or a linear probe, metrics, export.

The model (mm.models.classifier.ImageClassifier) runs the backbone over image patches with the
null text context, mean-pools the states and applies a LayerNorm + linear head. It starts from
``run.init_from`` (a pretrained MMModel folder or a finished run folder: its patch embedding and
backbone; the architecture comes from its config.json) or, when that is empty, from scratch with
the ``model.*`` preset. ``classify.mode=probe`` freezes everything but the head (a linear probe).

Labels come from each sample's json, by ``classify.target``:

    label   meta["label"] (what ``mm data ingest`` writes for class folders and label columns)
    shape   the shape of the object of a shapes image with exactly one object (others are unused)
    count   the number of objects of a shapes image ("1" … "4")

Samples without a label for the target are dropped from the batch before the forward pass (a
batch of shapes images has ~1/4 single-object images for ``shape``; the others cost only their
decoding). The class list is ``classify.classes`` or, when empty, every label of the training
shards (natural order: "2" before "10"); like the VQA vocabulary, rank 0 writes it to
RUN/labels.json and a resumed run reads it back, so the head never changes shape. Labels outside
the list are unused, and counted in the one line printed at setup.

Validation: top-1 / top-5, mean per-class and per-class accuracy (percent); the final export
also holds the last validation's confusion matrix (eval.json, confusion.png).

``load_classifier(DIR)`` gives a :class:`Classifier` (one call per image batch), and
``mm classify --model DIR --image IMG [IMG …]`` prints the top classes per image.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mm.config import Config
from mm.errors import MMError
from mm.eval.classification import classification_report, save_confusion_png
from mm.models.bundle import model_folder
from mm.models.classifier import ClassifierConfig, ImageClassifier

LABELS_FILE = "labels.json"
# ModelConfig fields that shape the image side of a classifier trained from scratch.
MODEL_FIELDS = ("width", "depth", "heads", "mlp_ratio", "patch_size", "mlp", "norm", "image_pos",
                "patch_stem", "cross_pos", "cross_pos_patches")


# ---------------------------------------------------------------------------------------------
# Labels


def label_of(meta: dict, target: str) -> str | None:
    """The class of one sample for ``target``, or None when the sample has none."""
    if target == "label":
        value = meta.get("label")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
        return None
    objects = meta.get("objects")
    if not isinstance(objects, list) or not objects:
        return None
    if target == "count":
        return str(len(objects))
    if target == "shape" and len(objects) == 1 and isinstance(objects[0], dict):
        shape = objects[0].get("shape")
        return shape if isinstance(shape, str) and shape else None
    return None


def natural_key(label: str):
    """Sort key putting "2" before "10" and numbers before words."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label) if t]


def labels_from_shards(sources: list[str], target: str) -> tuple[Counter, int]:
    """(label counts, samples without a label) over the training shards, in shard order."""
    from mm.data.shards import shard_metadata

    counts, unlabelled = Counter(), 0
    for meta in shard_metadata(sources):
        label = label_of(meta, target) if meta is not None else None
        if label is None:
            unlabelled += 1
        else:
            counts[label] += 1
    return counts, unlabelled


def choose_labels(counts: Counter, classes: list[str], target: str) -> list[str]:
    """The class list: the fixed ``classes`` or every label seen, in natural order."""
    labels = list(dict.fromkeys(c.strip() for c in classes if c.strip())) if classes else \
        sorted(counts, key=natural_key)
    if not labels:
        raise MMError(f"no labels for classify.target={target} in the training data; ingest labelled "
                      "images (`mm data ingest` of class folders or a label column) or use target=shape|count "
                      "on shapes data")
    return labels


def save_labels(path: Path, labels: list[str], counts: Counter, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"target": target, "labels": labels, "counts": [int(counts.get(x, 0)) for x in labels]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def build_model(cfg: Config) -> tuple[ImageClassifier, Path | None]:
    """The classifier before its labels are known: pretrained backbone or a fresh preset."""
    from mm.models.presets import preset_config

    if cfg.run.init_from:
        folder = model_folder(cfg.run.init_from, "point it at RUN/final of a pretraining run (or leave it empty to "
                              "train from scratch)")
        saved = json.loads((folder / "config.json").read_text())
        config = ClassifierConfig.from_mm_config(saved, [], cfg.classify.target)
        config.pool = cfg.classify.pool
        if config.image_size != cfg.data.image_size:
            raise MMError(f"the model in {folder} takes {config.image_size} px images; "
                          f"set data.image_size={config.image_size}")
        model = ImageClassifier(config)
        model.load_backbone(folder)
        return model, folder
    over = {k: getattr(cfg.model, k) for k in MODEL_FIELDS if getattr(cfg.model, k) not in (None, "")}
    mm_config = preset_config(cfg.model.preset, image_size=cfg.data.image_size, dropout=cfg.model.dropout, **over)
    config = ClassifierConfig.from_mm_config(dataclasses.asdict(mm_config), [], cfg.classify.target)
    config.pool = cfg.classify.pool
    return ImageClassifier(config), None


def labelled_samples(batch: dict, index: dict[str, int], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, C, H, W), class indices (n,)) of the batch's samples with a label in ``index``."""
    ids = [index.get(label_of(m, target)) if isinstance(m, dict) else None for m in batch["meta"]]
    keep = [i for i, c in enumerate(ids) if c is not None]
    images = batch["image"]
    y = torch.tensor([ids[i] for i in keep], dtype=torch.long, device=images.device)
    return images[torch.tensor(keep, dtype=torch.long, device=images.device)], y


@torch.no_grad()
def evaluate_classifier(model: ImageClassifier, batches, target: str) -> dict | None:
    """classification_report (top-1/top-5, per class, confusion) of ``model`` over the samples of
    ``batches`` that have one of its labels for ``target``; None when there are none."""
    index = {x: i for i, x in enumerate(model.config.labels)}
    all_logits, all_y = [], []
    for batch in batches:
        images, y = labelled_samples(batch, index, target)
        if y.numel():
            all_logits.append(model(images).float().cpu())
            all_y.append(y.cpu())
    if not all_y:
        return None
    return classification_report(torch.cat(all_logits), torch.cat(all_y), model.config.labels)


# ---------------------------------------------------------------------------------------------
# The task


class ClassifyTask:
    data_mode = "image"  # pixels and json; no caption needed
    uses_text = False  # the trainer trains no tokenizer for it

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.target, self.probe = cfg.classify.target, cfg.classify.mode == "probe"
        self.model, self.init_dir = build_model(cfg)
        self.model.train()
        if cfg.train.grad_checkpointing:
            self.model.backbone.grad_checkpointing = True
        if cfg.train.compile:
            from mm.tasks.pretrain import compile_blocks

            compile_blocks(self.model)
        self.labels: list[str] = []
        self.index: dict[str, int] = {}
        self.last_report: dict | None = None

    def setup(self, run_dir: str | Path, accelerator=None) -> None:
        """Build (or, on resume, read) the class list; size the head to it."""
        path = Path(run_dir) / LABELS_FILE
        main = accelerator is None or accelerator.is_main_process
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("target") != self.target:
                raise MMError(f"{path} was built for classify.target={data.get('target')}, now {self.target}; "
                              "resume with the same config or choose a new run.dir")
            labels = data["labels"]
        else:
            counts, unlabelled = labels_from_shards(self.cfg.data.train, self.target)
            labels = choose_labels(counts, self.cfg.classify.classes, self.target)
            unused = sum(n for x, n in counts.items() if x not in set(labels))
            if main:
                save_labels(path, labels, counts, self.target)
                shown = ", ".join(f"{x} {counts.get(x, 0)}" for x in labels[:8]) + (" …" if len(labels) > 8 else "")
                print(f"mm: classify {self.target}: {len(labels)} classes ({shown}); {sum(counts.values()) - unused} "
                      f"training samples, {unlabelled} without a label and {unused} with a label outside the "
                      "class list are unused", flush=True)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        self.set_labels(labels)

    def set_labels(self, labels: list[str]) -> None:
        self.labels = list(labels)
        self.index = {x: i for i, x in enumerate(self.labels)}
        self.model.set_labels(self.labels)
        if self.probe:
            self.model.freeze_backbone()

    def _check_ready(self) -> None:
        if not self.labels:
            raise MMError("the classify task has no class list yet; call task.setup(run_dir) first")

    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_samples(batch, self.index, self.target)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.probe:  # the frozen backbone needs no graph: the probe costs one forward
            with torch.no_grad():
                feats = self.model.features(images)
            return self.model.head(feats)
        return self.model(images)  # (n, K)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._check_ready()
        images, y = self.targets(batch)
        if y.numel() == 0:  # still a graph through the head, so every DDP rank reduces the same
            zero = sum(p.sum() for p in self.model.head.parameters()) * 0.0
            return zero, {"labelled": 0.0}
        logits = self.logits(images).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.classify.label_smoothing)
        top1 = 100.0 * (logits.argmax(1) == y).float().mean()
        return loss, {"train_top1": float(top1), "labelled": float(y.numel())}

    @torch.no_grad()
    def validate(self, batches) -> dict[str, float]:
        """Top-1/top-5, mean per-class and per-class accuracy over the labelled val samples."""
        self._check_ready()
        report = evaluate_classifier(self.model, batches, self.target)
        if report is None:
            return {}
        self.last_report = report
        return dict(report["metrics"])

    def export(self, out_dir: str | Path) -> None:
        """config.json (with the labels) + model.safetensors; eval.json and confusion.png of the
        last validation when there was one."""
        self._check_ready()
        out = Path(out_dir)
        self.model.save_pretrained(out)
        if self.last_report is not None:
            (out / "eval.json").write_text(json.dumps(self.last_report, indent=1))
            save_confusion_png(self.last_report["confusion"], self.labels, out / "confusion.png",
                               f"{self.target}: top-1 {self.last_report['metrics']['top1']:.1f} %")

    @classmethod
    def for_export(cls, cfg: Config, run_dir: str | Path) -> ClassifyTask:
        """The task of a saved run config, with the class list the trainer used."""
        cfg, run_dir = copy.deepcopy(cfg), Path(run_dir)
        cfg.train.compile = False
        if not (run_dir / LABELS_FILE).is_file():
            raise MMError(f"{run_dir} has no {LABELS_FILE}; it is not a started classify run")
        task = cls(cfg)
        task.setup(run_dir)
        return task


# ---------------------------------------------------------------------------------------------
# Inference: one call per image batch


class Classifier:
    """Top classes of images with a trained :class:`ImageClassifier`."""

    def __init__(self, model: ImageClassifier):
        self.model = model.eval()

    @property
    def labels(self) -> list[str]:
        return self.model.config.labels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def from_tensors(self, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """images (B, 3, H, W) in [-1, 1] -> per image the k best (label, probability)."""
        probs = self.model(images.to(self.device)).float().softmax(-1)  # (B, K)
        values, index = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(self.labels[i], float(v)) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(index.tolist(), values.tolist())]

    def top_k(self, images: list, k: int = 5) -> list[list[tuple[str, float]]]:
        """PIL images (any size: centre-cropped and resized as in training) -> top-k per image."""
        from mm.generation.vqa import images_to_tensor

        return self.from_tensors(images_to_tensor(images, self.model.config.image_size), k)

    def __call__(self, images: list) -> list[str]:
        return [best[0][0] for best in self.top_k(images, 1)]


def load_classifier(model_dir: str | Path, device: str | torch.device | None = None) -> Classifier:
    """A :class:`Classifier` for an exported classifier folder (or a finished classify run folder)."""
    d = Path(model_dir).expanduser()
    if not (d / "config.json").is_file() and (d / "final" / "config.json").is_file():
        d = d / "final"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Classifier(ImageClassifier.from_pretrained(d, device=device))


def cli_classify(args: argparse.Namespace) -> int:
    """``mm classify --model DIR --image IMG [IMG …] [--top-k 5]``: the top classes of each image."""
    from mm.tasks.vqa import _open_image

    if args.top_k < 1:
        raise MMError(f"--top-k must be >= 1, got {args.top_k}")
    images = [_open_image(p) for p in args.image]
    classifier = load_classifier(args.model)
    k = min(args.top_k, len(classifier.labels))
    for start in range(0, len(images), 64):
        for path, top in zip(args.image[start: start + 64], classifier.top_k(images[start: start + 64], k)):
            print(f"{path}: {top[0][0]}")
            for label, prob in top:
                print(f"  {prob:.4f}  {label}")
    sys.stdout.flush()
    return 0
