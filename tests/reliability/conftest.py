"""Fault injection helpers: `mm train` in its own process group, waiting on its files, killing it.

A run is watched through what it writes (``metrics.jsonl`` lines, ``checkpoints/``), never
through its output, so the helpers work the same for one process and for torchrun.
"""

from __future__ import annotations

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

from tests.generation.conftest import bundle_dir  # noqa: F401  (a tiny exported model: fuzzed generate/caption)
from tests.helpers import ROOT, mm_env, tiny_vq_overrides

VQ_CONFIG = "configs/vq/shapes.yaml"


class Launch:
    """One `mm train …` (1 process, or torchrun with ``nproc`` processes) in a new session.

    Output goes to files (a full pipe would block the run while the test polls); signals go to
    the whole process group, as a scheduler or a dying machine delivers them.
    """

    def __init__(self, args: list[str], log_dir: Path, nproc: int = 1, env: dict | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(log_dir.glob("launch*.out")))
        self.out_path, self.err_path = log_dir / f"launch{n}.out", log_dir / f"launch{n}.err"
        cmd = [sys.executable, "-m", "mm", *args]
        if nproc > 1:  # --standalone: a free local rendezvous port, so parallel test runs never collide
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "mm", *args]
        self.started = time.time()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or mm_env(), stdout=out, stderr=err,
                                         start_new_session=True)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL everything: torchrun's workers run in process groups of their own, so they are
        killed one by one (killing only the group would leave them training as orphans)."""
        pids = descendants(self.proc.pid)
        self.signal(signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)
        deadline = time.time() + 30
        while not all(gone(p) for p in pids) and time.time() < deadline:
            time.sleep(0.01)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"mm did not finish within {timeout} s (hang?):\n{self.stderr()[-3000:]}") from None

    def running(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def descendants(pid: int) -> list[int]:
    """All processes started by ``pid`` and their children (any thread may have started them)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return sorted(set(found))


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def last_step(run: Path) -> int:
    """The newest step in metrics.jsonl (0 before the first one; a line cut mid-write is ignored)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def logged_since(run: Path, since: float) -> bool:
    try:
        return (run / "metrics.jsonl").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def wait_for_step(launch: Launch, run: Path, step: int, timeout: float = 180) -> None:
    """Until this launch has logged ``step`` (lines of an earlier launch do not count: a resumed
    run first rewrites metrics.jsonl up to its checkpoint, so ``step`` must be past that)."""
    deadline = time.time() + timeout
    while not (logged_since(run, launch.started) and last_step(run) >= step):
        if not launch.running():
            raise AssertionError(f"mm ended ({launch.proc.returncode}) before step {step}:\n{launch.stderr()[-3000:]}")
        if time.time() > deadline:
            launch.kill()
            raise AssertionError(f"step {step} not reached within {timeout} s")
        time.sleep(0.01)


def kill_during_checkpoint_write(launch: Launch, run: Path, step: int, timeout: float = 180) -> bool:
    """SIGKILL the run while it writes checkpoint ``step``; True if the half-written folder was left.

    Sleeps until the step before is logged, then polls the checkpoints folder without sleeping
    (a tiny checkpoint takes milliseconds to write) and kills as soon as ``.tmp-step_N`` exists.
    """
    wait_for_step(launch, run, step - 1, timeout)
    tmp = run / "checkpoints" / f".tmp-step_{step}"
    deadline = time.time() + timeout
    while not tmp.exists():
        if not launch.running() or time.time() > deadline:
            raise AssertionError(f"no checkpoint write of step {step} seen:\n{launch.stderr()[-3000:]}")
    launch.kill()
    return tmp.exists() and not (run / "checkpoints" / f"step_{step}").exists()


def assert_run_equal(run: Path, ref: Path) -> None:
    """Bitwise: exported weights, the newest checkpoint (weights, optimizer, EMA) and logged losses."""
    files = sorted(p.relative_to(ref) for p in (ref / "final").rglob("*.safetensors"))
    assert files, f"nothing exported in {ref}/final"
    last = max((p for p in (ref / "checkpoints").iterdir() if p.name.startswith("step_")),
               key=lambda p: int(p.name[5:]))
    files += sorted(p.relative_to(ref) for p in last.glob("*.safetensors"))
    for rel in files:
        a, b = load_file(str(run / rel)), load_file(str(ref / rel))
        assert a.keys() == b.keys(), rel
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}: {k} differs from the uninterrupted run"
    opt_a = torch.load(run / last.relative_to(ref) / "state.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(last / "state.pt", weights_only=True)["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in opt_b[k]:
            assert torch.equal(opt_a[k][name], opt_b[k][name]), f"optimizer state {k}.{name} differs"
    assert metric_rows(run) == metric_rows(ref)
    assert untimed_progress(run) == untimed_progress(ref)


TIMING = ("time", "samples_per_s", "peak_mem_mb", "cpu_seconds", "wall_seconds")


def untimed_progress(run: Path) -> dict:
    """progress.json without the training-time totals (they differ between any two runs)."""
    progress = json.loads((run / "progress.json").read_text())
    progress["progress"] = {k: v for k, v in progress["progress"].items() if k not in TIMING}
    return {k: v for k, v in progress.items() if k not in TIMING}


def metric_rows(run: Path) -> dict[int, dict]:
    """step -> logged values that must replay exactly (timing and memory figures dropped)."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMING}
    return rows


def write_shapes_shards(out: Path, sizes: list[int], image_size: int = 32, prefix: str = "part") -> Path:
    """Shapes samples in shards of the given (uneven) sizes, with sizes.json."""
    from mm.data.shapes import make_sample
    from mm.data.shards import ShardWriter

    index = 0
    for s, n in enumerate(sizes):
        with ShardWriter(out, prefix=f"{prefix}{s}", samples_per_shard=n) as w:
            for _ in range(n):
                w.write(make_sample(0, "train", index, image_size))
                index += 1
    return out


def vq_args(run: Path, cache: Path, **extra) -> list[str]:
    return ["train", VQ_CONFIG, *tiny_vq_overrides(run, cache, **extra)]


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Very uneven shards: split over 2 ranks, one rank's shards hold a few samples, the other's many."""
    return write_shapes_shards(tmp_path_factory.mktemp("uneven"), [30, 1, 2, 1])
