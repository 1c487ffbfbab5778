"""Peak memory of `mm demo` (``--fast`` by default, the full demo with ``--full``) in a child process.

Two figures, because a demo may be more than one process (DataLoader workers):

- ``peak_rss_mb``: the largest resident set of any one finished descendant, from
  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (exact, kernel-tracked; Linux reports KiB);
- ``peak_tree_pss_mb``: the largest sum of PSS (proportional set size: shared pages split
  between the processes sharing them, so forked workers are not double-counted) over the demo's
  whole process tree, sampled from ``/proc/PID/smaps_rollup`` every ``--interval`` seconds
  (a sampled peak can miss a spike shorter than the interval).

The goal (issue 9) is a demo peak ≤ 3 GB; the larger of the two figures is compared with it.

    /work/venv/bin/python scripts/bench/memory.py --json bench_memory.json          # mm demo --fast
    /work/venv/bin/python scripts/bench/memory.py --full --json bench_memory_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _pss_kb(pid: int) -> int:
    """PSS of one process in KiB (0 if it has exited or /proc is unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the PSS sum of a process tree until stopped; keeps the peak and process count."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb, self.max_procs, self.samples = 0, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            total = sum(_pss_kb(p) for p in pids)
            self.peak_kb = max(self.peak_kb, total)
            self.max_procs = max(self.max_procs, len(pids))
            self.samples += 1
            self.stop.wait(self.interval)


def measure(full: bool, out_dir: Path, interval: float, log_path: Path) -> dict:
    cmd = [sys.executable, "-m", "mm", "demo", "--out", str(out_dir)] + ([] if full else ["--fast"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {rc}); last lines:\n" + "\n".join(tail))
    report = {}
    report_path = out_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
    return {
        "command": " ".join(["mm", "demo"] + ([] if full else ["--fast"])),
        "mode": "full" if full else "fast",
        "peak_rss_mb": maxrss_kb / 1024,
        "peak_rss_note": "largest single process (getrusage RUSAGE_CHILDREN)"
                         + ("" if maxrss_kb > before else "; an earlier child of this process was larger"),
        "peak_tree_pss_mb": sampler.peak_kb / 1024,
        "max_processes": sampler.max_procs,
        "pss_samples": sampler.samples,
        "sample_interval_s": interval,
        "peak_mb": max(maxrss_kb, sampler.peak_kb) / 1024,
        "wall_s": wall,
        "demo_minutes": report.get("minutes"),
        "goal_mb": 3 * 1024,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full demo (tens of minutes) instead of --fast")
    ap.add_argument("--out", default="", help="demo folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between PSS samples")
    ap.add_argument("--quick", action="store_true", help="accepted for all.py; the fast demo is already the quick one")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mm-bench-memory-") as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp) / "demo"
        log_path = Path(tmp) / "demo.log"
        res = measure(args.full, out_dir, args.interval, log_path)
    print(f"{res['command']}: peak RSS {res['peak_rss_mb']:.0f} MB (largest process), peak tree PSS "
          f"{res['peak_tree_pss_mb']:.0f} MB over up to {res['max_processes']} processes, {res['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
