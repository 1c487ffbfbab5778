"""Checkpoints that are either complete or absent.

Layout of one checkpoint, ``RUN/checkpoints/step_N/``::

    model.safetensors          the task's model (safetensors: no code runs on load)
    <name>.safetensors         other modules (discriminator, ema)
    state.pt                   optimizer and grad-scaler states, loaded with weights_only=True
    rng_rank{R}.pt             each process's RNG states (weights_only)
    state_rank{R}.pt           each process's own state, when it has one (DeepSpeed's ZeRO partition)
    progress.json              step, samples seen, data position, counters
    COMPLETE                   written last

Every process writes into ``checkpoints/.tmp-step_N``; after a barrier and an agreement that no
process failed, rank 0 writes ``COMPLETE`` and renames the folder to ``step_N``. A crash at any
moment leaves either the old checkpoints or the new complete one; leftovers ``.tmp-*`` are
ignored and cleaned. Folder names are ours, never Accelerate's automatic naming.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from mm.errors import MMError

COMPLETE = "COMPLETE"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).exists():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Saving ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer wraps a failed write (disk full) in a RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _save_safetensors(obj: torch.nn.Module | dict, path: Path) -> None:
    """A module (``save_model``) or a dict of tensors (``save_file``) as ``path``."""
    try:
        if isinstance(obj, torch.nn.Module):
            save_model(obj, str(path))
        else:
            save_file(obj, str(path))
    except SafetensorError as e:  # the Rust writer reports a failed write (disk full) as its own type
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _agree(accelerator, failed: bool) -> bool:
    """True if any process failed (all processes return the same answer)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, modules: dict[str, torch.nn.Module],
                    state: dict, progress: dict, keep: int, tensors: dict[str, dict] | None = None,
                    rank_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` from every process; returns its folder on success.

    ``modules``: name → unwrapped module saved as ``name.safetensors`` by rank 0.
    ``tensors``: name → dict of tensors (e.g. EMA weights) saved as ``name.safetensors`` by rank 0.
    ``state``: optimizer/scaler state dicts (identical on all ranks), saved by rank 0.
    ``rank_state``: this process's own state (e.g. a ZeRO optimizer partition), saved by each.
    Raises MMError (on every process) if any write failed; earlier checkpoints stay intact.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    rank = accelerator.process_index
    error = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:  # a full disk fails here too: report it like any failed write
            error = e
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process and error is None:
            for name, obj in {**modules, **(tensors or {})}.items():
                _save_safetensors(obj, tmp / f"{name}.safetensors")
            _torch_save(state, tmp / "state.pt")
            (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
        _torch_save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank_state is not None:
            _torch_save(rank_state, tmp / f"state_rank{rank}.pt")
        if accelerator.is_main_process and error is None:
            # Inside the temporary folder COMPLETE is harmless until the rename below, which
            # happens only once every process has written its files.
            (tmp / COMPLETE).write_text(str(step))
    except OSError as e:  # disk full, permissions, quota
        error = error or e
    failed = _agree(accelerator, error is not None)
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        last = latest_checkpoint(run_dir)
        reason = f"{error.strerror or error}" if error else "another process failed to write"
        raise MMError(f"could not write checkpoint step_{step} ({reason}); "
                      f"the previous checkpoint {last.name if last else '(none)'} is intact; free space and rerun to resume")
    if accelerator.is_main_process:
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        try:
            (Path(run_dir) / "progress.json").write_text(json.dumps(progress, indent=1))
        except OSError:  # an informational copy: the checkpoint itself is complete
            pass
        prune(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop stale temporary folders."""
    found = list_checkpoints(run_dir)
    for _, path in found[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_root(run_dir)
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


# --- Loading -----------------------------------------------------------------------------------


def safe_torch_load(path: Path):
    """torch.load restricted to tensors and plain containers: a pickle payload never runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise MMError(f"refusing to load {path}: not a weights-only checkpoint file ({first}); "
                      "delete it or use a checkpoint written by mm") from None


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load ``path`` (safetensors only) into ``module``, strictly."""
    if path.suffix != ".safetensors":
        raise MMError(f"refusing to load weights from {path}: only .safetensors files are loaded")
    try:
        load_model(module, str(path), strict=True)
    except Exception as e:  # header or shape mismatch, truncated file
        raise MMError(f"could not load {path} ({str(e).splitlines()[0][:160]}); "
                      "the checkpoint does not match this config") from None


def load_modules(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load each module from ``path/<name>.safetensors`` in place (plain, unsharded modules)."""
    for name, module in modules.items():
        f = path / f"{name}.safetensors"
        if not f.exists():
            raise MMError(f"checkpoint {path} lacks {f.name}; it was written by another config")
        load_module(module, f)


def load_state(path: Path, rank: int) -> tuple[dict, dict]:
    """Return (state, progress) of a checkpoint and restore ``rank``'s RNG states; ``rank``'s own
    state (``state_rank{R}.pt``), when there is one, is merged into ``state``."""
    state = safe_torch_load(path / "state.pt")
    own = path / f"state_rank{rank}.pt"
    if own.exists():
        state.update(safe_torch_load(own))
    progress = json.loads((path / "progress.json").read_text())
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent when resuming on more processes than saved
        set_rng_state(safe_torch_load(rng_file))
    return state, progress


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], rank: int) -> tuple[dict, dict]:
    """Load modules in place; return (state, progress). RNG is restored for ``rank``."""
    load_modules(path, modules)
    return load_state(path, rank)


# --- Sharded (FSDP) training: the same files as a single process -------------------------------
#
# Under FSDP each process holds 1/N of every parameter and of its optimizer state (DTensors).
# Checkpoints still hold the full tensors in the single-process layout, so a run can be resumed
# or exported whatever launcher wrote it: weights are gathered to rank 0 before saving, and the
# optimizer state is numbered the way torch.optim's own ``state_dict()`` numbers parameters.


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Gather sharded tensors (DTensors) whole, one at a time, on CPU; every process must call
    this (it is a collective). Returns them where ``keep`` (rank 0), else an empty dict."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in tensors.items():
        v = v.detach()
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.cpu()
    return out


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors cut the way ``like``'s DTensors are sharded and shaped (plain tensors stay plain)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, v in full.items():
        ref = like.get(k)
        if isinstance(ref, DTensor):
            v = distribute_tensor(v.reshape(ref.shape).to(ref.device), ref.device_mesh, ref.placements)
        out[k] = v
    return out


def optimizer_by_index(state: dict) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's full form) in torch.optim's
    own form: parameters numbered 0, 1, … in param-group order."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """The inverse of ``optimizer_by_index``: ``names[i]`` is the name of parameter number i."""
    n_params = sum(len(g["params"]) for g in state["param_groups"])
    if n_params != len(names):
        raise MMError(f"the checkpoint's optimizer state has {n_params} parameters, this model {len(names)}; "
                      "it was written by another config")
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
