"""Kill it anywhere, lose nothing: SIGKILL, a full disk, SIGINT/SIGTERM, then resume.

One interrupted run per world size goes through every fault in turn, each time resumed by the
same command, and must end bitwise equal (weights, optimizer state, EMA, logged metrics) to an
uninterrupted run of the same config on CPU:

- 1 process: SIGKILL at 3 points (a random step and moment, during a checkpoint write, another
  random point), the disk filling up during a checkpoint write (the file size limit of the
  running process is lowered: no root-proof read-only folder needed), then SIGINT.
- 2 processes (torchrun, gloo) on very uneven shards: SIGKILL of every process at 3 points
  (one during a checkpoint write), SIGTERM, then SIGKILL of torchrun alone.

Kill points come from a seeded RNG; ``KILLS`` records them for the README figures.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, tiny_vq_overrides

from .conftest import (
    VQ_CONFIG,
    Launch,
    assert_run_equal,
    descendants,
    gone,
    kill_during_checkpoint_write,
    vq_args,
    wait_for_step,
)

# Checkpoints at 3, 6, 9, ...: most kills lose steps that must be replayed. A kill lands a few
# steps after the step it waited for (tiny steps are fast), so every fault needs headroom before
# the last step: the later faults must still find the run unfinished.
STEPS, EVERY = 24, 3
STEPS_ONE = 30  # one process goes through more faults (the full disk, then SIGINT)
FILE_LIMIT = 128 * 1024  # bytes: above the logs, below one checkpoint's model file


def newest_checkpoint(run: Path) -> int:
    steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    return max(steps, default=0)


def kill_at_random(launch: Launch, run: Path, rng: random.Random) -> str:
    """SIGKILL 1-5 steps after the resume point, at a random moment inside the step."""
    start = newest_checkpoint(run)
    step = start + rng.randint(1, 5)
    wait_for_step(launch, run, step)
    time.sleep(rng.uniform(0.0, 0.2))
    launch.kill()
    return f"SIGKILL after step {step} (resumed from step_{start})"


def kill_in_checkpoint_write(args, run: Path, logs: Path, nproc: int = 1) -> list[str]:
    """Kill during the write of the next checkpoint; the write may finish first, so retry (at most 3)."""
    done = []
    for _ in range(3):
        step = (newest_checkpoint(run) // EVERY + 1) * EVERY
        left_half_written = kill_during_checkpoint_write(Launch(args, logs, nproc), run, step)
        done.append(f"SIGKILL while writing step_{step}" + ("" if left_half_written else " (write had finished)"))
        if left_half_written:
            assert newest_checkpoint(run) < step  # the half-written folder is never taken for complete
            return done
    raise AssertionError(f"no kill landed inside a checkpoint write: {done}")


def training_processes(pid: int) -> list[int]:
    """torchrun's workers: the descendants of ``pid`` running `mm train`."""
    return [k for k in descendants(pid) if b"mm\0train\0" in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def straight_one(tmp_path_factory, shapes_cache):
    run = tmp_path_factory.mktemp("straight1") / "run"
    launch = Launch(vq_args(run, shapes_cache, **{"train.max_steps": STEPS_ONE, "train.checkpoint_every": EVERY}),
                    run.parent / "logs")
    assert launch.wait() == 0, launch.stderr()[-3000:]
    return run


def test_one_process_kills_disk_full_sigint(straight_one, tmp_path, shapes_cache):
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = vq_args(run, shapes_cache, **{"train.max_steps": STEPS_ONE, "train.checkpoint_every": EVERY})
    rng = random.Random(10)
    events = [kill_at_random(Launch(args, logs), run, rng)]
    events += kill_in_checkpoint_write(args, run, logs)
    events.append(kill_at_random(Launch(args, logs), run, rng))

    # The disk fills up: once a new checkpoint is complete, the next one cannot be written.
    launch = Launch(args, logs)
    before = newest_checkpoint(run)
    deadline = time.time() + 180
    while newest_checkpoint(run) == before and launch.running() and time.time() < deadline:
        time.sleep(0.01)
    intact = newest_checkpoint(run)
    assert intact + EVERY <= STEPS_ONE - EVERY, f"too late for the full disk: step_{intact} is complete"
    resource.prlimit(launch.proc.pid, resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    assert launch.wait() == 2, launch.stderr()[-3000:]
    err = launch.stderr()
    assert "Traceback" not in err, err[-3000:]
    assert f"could not write checkpoint step_{intact + EVERY}" in err and f"step_{intact} is intact" in err, err
    assert newest_checkpoint(run) == intact and not list((run / "checkpoints").glob(".tmp-*"))
    events.append(f"file size limit while writing step_{intact + EVERY}: exit 2, step_{intact} intact")

    launch = Launch(args, logs)
    wait_for_step(launch, run, intact + 2)
    launch.signal(signal.SIGINT)
    assert launch.wait() == 0, launch.stderr()[-3000:]
    assert "checkpoint saved" in launch.stdout()
    assert newest_checkpoint(run) > intact + 1
    events.append(f"SIGINT after step {newest_checkpoint(run)}: saved, exit 0")

    launch = Launch(args, logs)
    assert launch.wait() == 0, launch.stderr()[-3000:]
    assert_run_equal(run, straight_one)
    print("\n".join(["1 process:", *events]))


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory, shapes_cache, uneven_shards):
    """Also the uneven-shards test: two ranks whose shards hold 30 vs a few samples finish together."""
    run = tmp_path_factory.mktemp("straight2") / "run"
    launch = Launch(vq_args(run, shapes_cache, **{"train.max_steps": STEPS, "train.checkpoint_every": EVERY,
                                                  "data.train": uneven_shards}), run.parent / "logs", nproc=2)
    assert launch.wait(timeout=300) == 0, launch.stderr()[-3000:]
    return run


@pytest.mark.slow
def test_uneven_shards_two_ranks_finish_in_step(straight_two):
    """No hang (bounded wait above), and both ranks reached and saved the same last step."""
    final = straight_two / "checkpoints" / f"step_{STEPS}"
    assert (final / "rng_rank0.pt").exists() and (final / "rng_rank1.pt").exists()
    assert (straight_two / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_kills_and_sigterm(straight_two, tmp_path, shapes_cache, uneven_shards):
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = vq_args(run, shapes_cache, **{"train.max_steps": STEPS, "train.checkpoint_every": EVERY,
                                         "data.train": uneven_shards})
    rng = random.Random(20)
    events = [kill_at_random(Launch(args, logs, nproc=2), run, rng)]
    events += kill_in_checkpoint_write(args, run, logs, nproc=2)
    events.append(kill_at_random(Launch(args, logs, nproc=2), run, rng))

    # SIGTERM to both training processes (as a scheduler preempting them): they agree to stop,
    # save one checkpoint and exit 0, so torchrun exits 0 too.
    launch = Launch(args, logs, nproc=2)
    start = newest_checkpoint(run)
    wait_for_step(launch, run, start + 2)
    workers = training_processes(launch.proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    assert launch.wait() == 0, launch.stderr()[-3000:]
    saved = newest_checkpoint(run)
    assert saved >= start + 2 and saved < STEPS
    events.append(f"SIGTERM after step {saved}: saved, exit 0")

    # SIGKILL of torchrun alone (the OOM killer's choice): the workers, in process groups of their
    # own, notice that their launcher is gone, save and stop instead of training on as orphans.
    launch = Launch(args, logs, nproc=2)
    wait_for_step(launch, run, saved + 1)
    workers = training_processes(launch.proc.pid)
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.proc.wait(timeout=60)
    deadline = time.time() + 120
    while not all(gone(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers), "torchrun's workers kept training after it was killed"
    assert saved < newest_checkpoint(run) < STEPS
    events.append(f"SIGKILL of torchrun alone after step {newest_checkpoint(run)}: workers saved and stopped")

    launch = Launch(args, logs, nproc=2)
    assert launch.wait(timeout=300) == 0, launch.stderr()[-3000:]
    assert_run_equal(run, straight_two)
    print("\n".join(["2 processes:", *events]))



def test_crash_as_a_checkpoint_becomes_complete_resumes_with_ema(tmp_path, shapes_cache, monkeypatch):
    """Power lost the moment a checkpoint is renamed complete (before anything else is written):
    the run still resumes, EMA weights included, and finishes."""
    from mm.config import load_config
    from mm.train import checkpoint as ckpt
    from mm.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(ROOT / VQ_CONFIG, tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": 4,
                                                                                "train.ema_decay": 0.9}))
    real = ckpt.prune

    def power_loss(run_dir, keep):  # runs right after the rename to step_N
        if ckpt.latest_checkpoint(run_dir).name == "step_2":
            raise RuntimeError("power loss")
        real(run_dir, keep)

    monkeypatch.setattr(ckpt, "prune", power_loss)
    with pytest.raises(RuntimeError, match="power loss"):
        Trainer(cfg).fit()
    monkeypatch.setattr(ckpt, "prune", real)
    trainer = Trainer(cfg)
    assert trainer.progress.step == 2
    assert trainer.fit()["step"] == 4
    assert (run / "checkpoints" / "step_4" / "ema.safetensors").exists()


def test_disk_full_while_logging_stops_with_one_line(tmp_path, shapes_cache, capsys, monkeypatch):
    """A full disk under metrics.jsonl (writes go to /dev/full: ENOSPC) is a one-line error, not a
    traceback, and the newest checkpoint stays resumable."""
    from mm.cli import main
    from mm.train import logger

    run = tmp_path / "run"
    args = vq_args(run, shapes_cache, **{"train.max_steps": 4})
    real = logger.RunLogger.__init__

    def full_disk(self, *a, **k):
        real(self, *a, **k)
        if self.enabled and (run / "checkpoints" / "step_2").exists():
            self.path = Path("/dev/full")

    assert main([*args[:1], str(ROOT / VQ_CONFIG), *args[2:], "train.stop_at_step=2"]) == 0
    monkeypatch.setattr(logger.RunLogger, "__init__", full_disk)
    capsys.readouterr()
    code = main([*args[:1], str(ROOT / VQ_CONFIG), *args[2:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "metrics" in err[0], err
    assert newest_checkpoint(run) == 2
