"""The trainer on the VQ stage: exact resume, signals, crash and disk-full safety, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm.errors import MMError

from .conftest import ROOT, mm_env, run_mm, tiny_vq_overrides

CONFIG = "configs/vq/shapes.yaml"
STEPS = 40


def weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / "model.safetensors"))


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shapes_cache):
    run = tmp_path_factory.mktemp("straight") / "run"
    run_mm(["train", CONFIG, *tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": STEPS})])
    return run


def test_straight_run_finishes_and_exports(straight_run):
    assert (straight_run / "final" / "config.json").exists()
    assert (straight_run / "final" / "model.safetensors").exists()
    kept = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert kept == [f"step_{STEPS - 2}", f"step_{STEPS}"]  # keep_checkpoints=2 (default)
    progress = json.loads((straight_run / "progress.json").read_text())
    assert progress["step"] == STEPS and progress["samples_seen"] == STEPS * 4
    assert len(losses(straight_run)) == STEPS



def metric_rows(run_dir):
    """Every metrics.jsonl row without its timing and memory figures."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timing = ("time", "samples_per_s", "peak_mem_mb", "cpu_seconds", "wall_seconds")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_signal_during_the_last_step_then_resume_finishes_like_a_straight_run(straight_run, tmp_path, shapes_cache):
    """A run stopped by a signal after its last step saved that step but neither validated nor
    exported; the resumed run must do both, so it ends exactly as the straight run."""
    run = tmp_path / "run"
    args = ["train", CONFIG, *tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": STEPS})]
    run_mm(args + [f"train.stop_at_step={STEPS - 1}"])
    signalled = ("import sys; from mm.train import distributed; from mm.cli import main; "
                 "distributed.StopSignals.stop = lambda self: True; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", signalled, *args], cwd=ROOT, env=mm_env(), capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stopped at step {STEPS}; checkpoint saved" in proc.stdout and not (run / "final").exists()
    run_mm(args)
    assert metric_rows(run) == metric_rows(straight_run)  # the final validation row included
    assert_same_weights(load_file(str(run / "final" / "model.safetensors")),
                        load_file(str(straight_run / "final" / "model.safetensors")))

def test_stop_and_resume_is_bitwise_identical(straight_run, tmp_path, shapes_cache):
    run = tmp_path / "run"
    args = ["train", CONFIG, *tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": STEPS})]
    run_mm(args + ["train.stop_at_step=5"])
    assert (run / "checkpoints" / "step_5").exists() and not (run / "final").exists()
    run_mm(args)
    assert_same_weights(weights(run, STEPS), weights(straight_run, STEPS))
    assert losses(run) == losses(straight_run)


def test_sigterm_saves_then_resume_matches(straight_run, tmp_path, shapes_cache):
    run = tmp_path / "run"
    args = ["train", CONFIG, *tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": STEPS,
                                                                      "train.checkpoint_every": 0})]
    proc = subprocess.Popen([sys.executable, "-m", "mm", *args], cwd=ROOT, env=mm_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0] != f"step_{STEPS}", saved
    assert "resume" in out
    run_mm(args)
    assert_same_weights(weights(run, STEPS), weights(straight_run, STEPS))


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, shapes_cache, monkeypatch):
    from mm.config import load_config
    from mm.train import checkpoint as ckpt
    from mm.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(ROOT / CONFIG, tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": 6}))
    real = ckpt._torch_save

    def crash_at_step_4(obj, path):
        if ".tmp-step_4" in str(path):
            raise RuntimeError("simulated power loss")
        return real(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", crash_at_step_4)
    with pytest.raises(RuntimeError, match="power loss"):
        Trainer(cfg).fit()
    assert (run / "checkpoints" / ".tmp-step_4").exists()  # the half-written one is there...
    assert ckpt.latest_checkpoint(run).name == "step_2"  # ...but never taken for complete
    monkeypatch.setattr(ckpt, "_torch_save", real)
    trainer = Trainer(cfg)
    assert trainer.progress.step == 2
    trainer.fit()
    assert ckpt.latest_checkpoint(run).name == "step_6"
    assert not (run / "checkpoints" / ".tmp-step_4").exists()


def test_disk_full_stops_with_message_and_keeps_previous(tmp_path, shapes_cache, monkeypatch):
    import errno

    from mm.config import load_config
    from mm.train import checkpoint as ckpt
    from mm.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(ROOT / CONFIG, tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": 6}))
    real = ckpt._torch_save

    def full(obj, path):
        if ".tmp-step_4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", full)
    with pytest.raises(MMError, match="No space left.*step_2 is intact"):
        Trainer(cfg).fit()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_2"]
    state, progress = ckpt.load_checkpoint(run / "checkpoints" / "step_2",
                                           {"model": Trainer(cfg).task.model}, rank=0)
    assert progress["step"] == 2


def test_refuses_pickle_payload(tmp_path):
    """A pickle with a payload placed where state.pt is expected is refused; the payload never runs."""
    from mm.train import checkpoint as ckpt

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "state.pt"
    torch.save({"optimizer": Payload()}, bad)
    with pytest.raises(MMError, match="refusing to load"):
        ckpt.safe_torch_load(bad)
    assert not marker.exists()
    with pytest.raises(MMError, match="only .safetensors"):
        ckpt.load_module(torch.nn.Linear(2, 2), tmp_path / "model.bin")


def test_changed_config_is_refused_on_resume(straight_run, shapes_cache):
    proc = run_mm(["train", CONFIG, *tiny_vq_overrides(straight_run, shapes_cache, **{"train.lr": 0.5})], check=False)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_processes_match_one_with_grad_accum(tmp_path, shapes_cache):
    """torchrun 2 × batch 4 == 1 process × batch 4 × accum 2, on data where every sample is the same."""
    from tests.helpers import same_image_shards

    data = tmp_path / "same"
    same_image_shards(data)
    common = {"data.train": data, "data.val": data, "train.max_steps": 4, "vq.restart_dead_codes": "false"}
    one = tmp_path / "one"
    run_mm(["train", CONFIG, *tiny_vq_overrides(one, shapes_cache, **common, **{"train.grad_accum": 2})])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "mm", "train", CONFIG, *tiny_vq_overrides(two, shapes_cache, **common)]
    proc = subprocess.run(cmd, cwd=ROOT, env=mm_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(one, 4), weights(two, 4)
    # The quantizer's dead-code bookkeeping (recent encoder outputs, usage counters) is per
    # process by design; everything that is trained must match.
    bookkeeping = ("recent", "step_usage", "steps_unused")
    compared = [k for k in a if not any(word in k for word in bookkeeping)]
    assert len(compared) > 10
    for k in compared:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((two / "progress.json").read_text())["samples_seen"] == 4 * 4 * 2
