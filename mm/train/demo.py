"""``mm demo [--out DIR] [--fast | --long]``: the whole pipeline on the built-in shapes data, offline.

    [1/9] data      write the shapes shards into DIR/data (the demo's own cache: self-contained)
    [2/9] vq        train the VQ image tokenizer                        -> DIR/vq/final
    [3/9] codes     add the VQ codes of every image to the shards         -> DIR/data/codes/{train,val}
    [4/9] pretrain  ITC + ITM + captioning + text-to-image, reading codes -> DIR/pretrain/final
    [5/9] generate  images for the held-out prompts, scored by the shapes detector
    [6/9] vqa       fine-tune the pretrained model on the shapes questions -> DIR/vqa/final
    [7/9] classify  fine-tune the pretrained backbone to name the shape of one-object images
                                                                          -> DIR/classify/final
    [8/9] detect    DETR object detection (boxes + shape) on the shapes images -> DIR/detect/final
    [9/9] evaluate  VQ PSNR/usage, retrieval, captions (CIDEr-D), VQA accuracy, classification
                    top-1, detection mAP on the test split

then ``DIR/report.json`` and ``DIR/report.md`` (mm.train.report). Every stage calls the library
directly with a config from ``configs/demo/`` (``STAGE.yaml``; ``STAGE_fast.yaml`` with
``--fast``, a first look in ~3 minutes; ``STAGE_long.yaml`` with ``--long``, the long recipe of
~70-95 minutes on 2 CPU cores); only the folders of this demo are set on top of it. A stage that finishes writes
``DIR/stages/NAME.json`` (its result and wall/CPU seconds), so running the same command again
skips finished stages and the training stages resume from their newest checkpoint. The output
of the library (progress bars, eval prints) goes to ``DIR/logs/NAME.log``; the console gets one
line per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from mm.config import Config, load_config
from mm.errors import MMError
from mm.generation import DEFAULT_GUIDANCE

STAGES = ("data", "vq", "codes", "pretrain", "generate", "vqa", "classify", "detect", "evaluate")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"

# Sampling for the held-out prompt grid and the compositional score.
IMAGES_PER_PROMPT = {"full": 4, "fast": 1, "long": 4}
PROMPT_STRIDE = {"full": 1, "fast": 5, "long": 1}  # fast: every 5th of the 60 held-out prompts
GUIDANCE = DEFAULT_GUIDANCE  # 1.5: the best of 1-5 on four measured models (mm.generation)
TOP_K = 0  # the tiny model's distributions are peaked already; plain sampling with CFG
# Evaluation on the test split (shapes_val samples); examples shown in the report.
EVAL_SAMPLES = {"full": 500, "fast": 64, "long": 500}
RETRIEVAL_RERANK_K = {"full": 16, "fast": 4, "long": 16}
MODES = ("full", "fast", "long")  # configs/demo/STAGE.yaml, STAGE_fast.yaml, STAGE_long.yaml
NUM_EXAMPLES = 8


class DemoStopped(Exception):
    """A training stage stopped on a signal; its checkpoint is saved."""


class Demo:
    def __init__(self, out: str | Path, mode: str = "full"):
        if mode not in MODES:
            raise MMError(f"demo mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.out = Path(out).expanduser()
        self.mode = mode
        self.stages_dir = self.out / "stages"
        self.logs_dir = self.out / "logs"

    # -- configs and folders --------------------------------------------------------------------

    def config_path(self, stage: str) -> Path:
        path = CONFIG_DIR / (f"{stage}.yaml" if self.mode == "full" else f"{stage}_{self.mode}.yaml")
        if not path.is_file():
            raise MMError(f"demo config {path} is missing; reinstall mm from its source tree (configs/demo/)")
        return path

    def stage_config(self, stage: str, run_dir: Path, train: str, val: str) -> Config:
        """The demo's config for a training stage with this demo's folders set (no string overrides:
        paths may hold commas or YAML characters)."""
        cfg = load_config(self.config_path(stage))
        cfg.run.dir = str(run_dir)
        cfg.run.stage = stage
        cfg.data.train, cfg.data.val = [str(train)], [str(val)]
        return cfg

    def result(self, stage: str) -> dict:
        return json.loads((self.stages_dir / f"{stage}.json").read_text())["result"]

    def check_mode(self) -> None:
        """One folder holds one kind of demo: mixing budgets would mix incompatible runs."""
        marker = self.out / "demo.json"
        if marker.is_file():
            saved = json.loads(marker.read_text()).get("mode")
            if saved != self.mode:
                flag = "" if saved == "full" else f"--{saved} "
                raise MMError(f"{self.out} holds a {saved} demo; run `mm demo {flag}--out {self.out}` to resume "
                              "it or choose another --out")
        if self.out.exists() and not self.out.is_dir():
            raise MMError(f"--out {self.out} is a file; give a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"mode": self.mode}) + "\n")

    # -- running stages -------------------------------------------------------------------------

    def run_stage(self, index: int, name: str) -> dict:
        done = self.stages_dir / f"{name}.json"
        head = f"[{index}/{len(STAGES)}] {name:<9}"
        if done.is_file():
            record = json.loads(done.read_text())
            print(f"{head} done earlier ({record['seconds']:.0f} s)", flush=True)
            return record["result"]
        print(f"{head} …", end=" ", flush=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        wall, cpu = time.time(), time.process_time()
        log_path = self.logs_dir / f"{name}.log"
        try:
            with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                result = getattr(self, f"stage_{name}")()
        except BaseException:
            print(f"failed (log: {log_path})", flush=True)
            raise
        record = {"stage": name, "seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu,
                  "result": result}
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(done)
        print(f"{record['seconds']:.0f} s (cpu {record['cpu_seconds']:.0f} s)  {summary_line(name, result)}",
              flush=True)
        return result

    def run(self) -> dict:
        self.check_mode()
        print(f"mm demo ({self.mode}) -> {self.out}", flush=True)
        for i, name in enumerate(STAGES, 1):
            self.run_stage(i, name)
        from mm.train.report import write_report

        return write_report(self)

    # -- the stages -----------------------------------------------------------------------------

    def stage_data(self) -> dict:
        from mm.data.shapes import ensure_shapes

        cfg = load_config(self.config_path("pretrain"))  # the data sizes live in the pretraining config
        folders = ensure_shapes(self.out / "data", cfg.data.image_size, cfg.data.shapes_train, cfg.data.shapes_val,
                                seed=0)
        return {**{split: str(folder) for split, folder in folders.items()},
                "train_samples": cfg.data.shapes_train, "val_samples": cfg.data.shapes_val,
                "image_size": cfg.data.image_size}

    def _train(self, cfg: Config) -> dict:
        from mm.train.trainer import train

        summary = train(cfg)
        if summary.get("stopped_by") == "signal":
            raise DemoStopped(cfg.run.stage)
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}

    def stage_vq(self) -> dict:
        data = self.result("data")
        return self._train(self.stage_config("vq", self.out / "vq", data["train"], data["val"]))

    def stage_codes(self) -> dict:
        from mm.tasks.vq import cli_codes

        data = self.result("data")
        out = {}
        for split in ("train", "val"):
            folder = self.out / "data" / "codes" / split
            cli_codes(argparse.Namespace(vq=str(self.out / "vq" / "final"), data=data[split], out=str(folder),
                                         workers=1, batch_size=256))
            out[split] = str(folder)
        return out

    def stage_pretrain(self) -> dict:
        codes = self.result("codes")
        cfg = self.stage_config("pretrain", self.out / "pretrain", codes["train"], codes["val"])
        cfg.vq.path, cfg.vq.config = str(self.out / "vq" / "final"), ""
        return self._train(cfg)

    def stage_generate(self) -> dict:
        from mm.train.report import generate_held_out

        return generate_held_out(self.out / "pretrain" / "final", self.out / "generate",
                                 IMAGES_PER_PROMPT[self.mode], PROMPT_STRIDE[self.mode], GUIDANCE, TOP_K)

    def stage_vqa(self) -> dict:
        data = self.result("data")
        cfg = self.stage_config("vqa", self.out / "vqa", data["train"], data["val"])
        cfg.run.init_from, cfg.vqa.pretrain_config = str(self.out / "pretrain" / "final"), ""
        return self._train(cfg)

    def stage_classify(self) -> dict:
        data = self.result("data")
        cfg = self.stage_config("classify", self.out / "classify", data["train"], data["val"])
        cfg.run.init_from = str(self.out / "pretrain" / "final")  # the shared backbone, pretrained
        return self._train(cfg)

    def stage_detect(self) -> dict:
        data = self.result("data")
        cfg = self.stage_config("detect", self.out / "detect", data["train"], data["val"])
        return self._train(cfg)

    def stage_evaluate(self) -> dict:
        from mm.train.report import evaluate_all

        return evaluate_all(self.out, self.result("data")["test"], EVAL_SAMPLES[self.mode],
                            RETRIEVAL_RERANK_K[self.mode], NUM_EXAMPLES,
                            load_config(self.config_path("detect")).detect.label)


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def summary_line(stage: str, r: dict) -> str:
    """The few numbers a person wants to see as a stage ends."""
    if stage == "data":
        return f"{r['train_samples']} train / {r['val_samples']} val / {r['val_samples']} test samples"
    if stage == "vq":
        return f"step {r.get('step')}, val PSNR {_fmt(r.get('val/psnr'), ' dB')}, " \
               f"code usage {_fmt(r.get('val/code_usage'), '%')}"
    if stage == "codes":
        return f"codes in {Path(r['train']).parent}"
    if stage == "pretrain":
        return f"step {r.get('step')}, val ITC R@1 i2t {_fmt(r.get('val/i2t_r1'), '%')} " \
               f"t2i {_fmt(r.get('val/t2i_r1'), '%')}"
    if stage == "generate":
        return (f"{r['images']} images, compositional accuracy {_fmt(r['accuracy'], '%')}, "
                f"ceiling {_fmt(r.get('ceiling'), '%')}")
    if stage == "vqa":
        return f"step {r.get('step')}, val VQA accuracy {_fmt(r.get('val/vqa_accuracy'), '%')}"
    if stage == "classify":
        return f"step {r.get('step')}, val top-1 {_fmt(r.get('val/top1'), '%')}"
    if stage == "detect":
        return f"step {r.get('step')}, val mAP {_fmt(r.get('val/map'), '', 2)}, mAP@.5 {_fmt(r.get('val/map_50'), '', 2)}"
    if stage == "evaluate":
        return (f"VQA {_fmt(r.get('vqa_accuracy'), '%')}, R@1 {_fmt(r.get('retrieval_r1_i2t'), '%')}/"
                f"{_fmt(r.get('retrieval_r1_t2i'), '%')}, CIDEr-D {_fmt(r.get('caption_cider'), '', 2)}")
    return ""


def cli_demo(args: argparse.Namespace) -> int:
    """``mm demo [--out DIR] [--fast | --long]``."""
    if getattr(args, "fast", False) and getattr(args, "long", False):
        raise MMError("--fast and --long exclude each other; pick one (or neither for the 15-minute demo)")
    mode = "fast" if getattr(args, "fast", False) else "long" if getattr(args, "long", False) else "full"
    demo = Demo(args.out, mode)
    started = time.time()
    try:
        report = demo.run()
    except DemoStopped as e:
        print(f"mm: demo stopped during the {e} stage (checkpoint saved); run the same command to resume",
              file=sys.stderr)
        return 130
    print(f"mm: demo finished in {(time.time() - started) / 60:.1f} min this run "
          f"({report['minutes']:.1f} min over all stages); report: {demo.out / 'report.md'}")
    return 0
