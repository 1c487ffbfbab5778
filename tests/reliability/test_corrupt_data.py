"""Corrupt data in the training stream: training goes on and metrics.jsonl counts every skip by reason.

The pretraining stage (it needs captions, so a caption-less sample is unusable there) trains on
shards holding a truncated shard, non-image bytes under an image key, a sample without a
caption and a zero-length image file. The logged ``skipped/<reason>`` totals must equal what
the data stream itself reports for the same batches, and every reason must show up.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm.cli import main

from .conftest import write_shapes_shards

STEPS, BATCH, SIZE = 12, 4, 16
REASONS = {"truncated_shard", "not_image", "missing_caption", "empty_file"}


def corrupt_shards(root: Path) -> Path:
    from mm.data.shapes import make_sample
    from mm.data.shards import ShardWriter

    data = write_shapes_shards(root, [4, 4], prefix="good")
    with ShardWriter(data, prefix="bad", samples_per_shard=100) as w:
        for i in range(8):
            w.write(make_sample(1, "train", i, 32))
        w.write({"__key__": "html", "png": b"<html><body>404 Not Found</body></html>", "txt": "a red circle"})
        no_caption = make_sample(1, "train", 8, 32)
        del no_caption["txt"], no_caption["json"]
        w.write(no_caption)
        w.write({"__key__": "zero", "png": b"", "txt": "a blue square"})
    with ShardWriter(data, prefix="cut", samples_per_shard=100) as w:
        for i in range(10):
            w.write(make_sample(2, "train", i, 32))
    cut = data / "cut-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])  # cut inside a member
    return data


def test_training_continues_and_counts_skips_by_reason(tmp_path, capsys):
    from mm.data.pipeline import make_loader
    from mm.data.tokenizer import load_tokenizer
    from tests.tasks.pretrain_util import make_assets

    tokenizer, vq = make_assets(tmp_path / "assets")
    data = corrupt_shards(tmp_path / "data")
    good = write_shapes_shards(tmp_path / "val", [8])
    config = tmp_path / "pretrain.yaml"
    config.write_text("run:\n  stage: pretrain\nmodel:\n  preset: debug\n")
    run = tmp_path / "run"
    overrides = {"run.dir": run, "vq.path": vq, "data.tokenizer": tokenizer, "data.train": data,
                 "data.val": good, "data.image_size": SIZE, "data.text_max_len": 16, "data.shuffle_buffer": 8,
                 "data.val_samples": 4, "train.batch_size": BATCH, "train.max_steps": STEPS,
                 "train.warmup_steps": 1, "train.checkpoint_every": 0, "train.eval_every": 0, "log.every": 1}
    assert main(["train", str(config), *(f"{k}={v}" for k, v in overrides.items())]) == 0, capsys.readouterr().err

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == STEPS
    logged = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("skipped/")}
    # The reference: the same stream read here, batch by batch, for the same number of batches.
    loader = make_loader([str(data)], batch_size=BATCH, seed=0, shuffle_buffer=8, image_size=SIZE,
                         tokenizer=load_tokenizer(tokenizer), text_max_len=16, mode="caption")
    expected: dict[str, int] = {}
    for _, batch in zip(range(STEPS), loader):
        for reason, n in batch["skipped"].items():
            expected[reason] = expected.get(reason, 0) + n
    assert logged == expected
    assert set(logged) == REASONS and all(n >= 1 for n in logged.values()), logged
