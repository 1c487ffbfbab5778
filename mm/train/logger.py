"""Run logging: a progress bar, ``metrics.jsonl`` in the run folder, and optionally wandb.

This module is the only place in mm that imports wandb. wandb never blocks a run: without an
API key (or when it cannot start) it runs offline, and ``WANDB_MODE=disabled`` turns it off.
Only the main process logs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from mm.errors import MMError


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class RunLogger:
    def __init__(self, run_dir: Path, cfg_dict: dict, enabled: bool, report_to: str, total_steps: int,
                 start_step: int, project: str = "mm", name: str = ""):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("MM_PROGRESS") != "1")
        if report_to == "wandb":
            self.wandb = self._start_wandb(cfg_dict, project, name or self.run_dir.name)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one straight run."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(k + "\n" for k in kept))

    def _start_wandb(self, cfg_dict: dict, project: str, name: str):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_key() else "offline")
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            print("mm: no wandb API key; logging to wandb offline (sync later with `wandb sync`)", file=sys.stderr)
        try:
            return wandb.init(project=project, name=name, config=cfg_dict, dir=str(self.run_dir), mode=mode,
                              id=name.replace("/", "-"), resume="allow",
                              settings=wandb.Settings(init_timeout=60, silent=True))
        except Exception as e:  # never let logging stop training
            warnings.warn(f"wandb could not start ({e}); continuing without it", stacklevel=2)
            return None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: one clear line, not a traceback; checkpoints stay intact
            raise MMError(f"could not append metrics to {self.path} ({e.strerror or e}); free space and run "
                          "the same command to resume from the newest checkpoint") from None
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
            self.bar.refresh()

    def images(self, step: int, images: dict, folder: str = "samples") -> None:
        """Save PIL images as ``RUN/samples/{name}_step{N}.png`` (and to wandb)."""
        if not self.enabled or not images:
            return
        out = self.run_dir / folder
        out.mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            image.save(out / f"{name}_step{step}.png")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image) for name, image in images.items()}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
