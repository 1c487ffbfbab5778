"""Process-group and launcher plumbing for the trainer (mm.train.trainer).

Launchers: one process, DDP (torchrun / accelerate), FSDP2 (``ACCELERATE_USE_FSDP=true``, e.g.
``configs/accelerate/fsdp.yaml``; also on CPU with gloo) and DeepSpeed (untested, GPUs only).
Here: refusing a DeepSpeed launch that cannot work (``check_launcher``), switching CPU processes
to FSDP2 (``use_fsdp``), DeepSpeed's batch sizes (``configure_deepspeed``), FSDP2's 0-dim
parameters (``lift_scalars``), stop requests from signals or a dead torchrun parent
(``StopSignals``) and the small collectives the loop needs (``any_rank``, ``as_float``).
"""

from __future__ import annotations

import importlib.util
import os
import signal

import torch

from mm.config import Config
from mm.errors import MMError


class StopSignals:
    """SIGTERM / SIGINT ask the loop to save and stop at the end of the current step.

    Under torchrun, the death of the launcher does too: its workers run in process groups of
    their own, so a launcher killed with SIGKILL (OOM killer, dying job step) would otherwise
    leave them training as orphans that a restarted job then races for the same run folder.
    """

    def __init__(self):
        self.requested = False
        self._launcher = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker)
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True

    def stop(self) -> bool:
        return self.requested or (self._launcher is not None and os.getppid() != self._launcher)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def check_launcher() -> None:
    """Refuse, before Accelerate starts, a DeepSpeed launch that cannot work here (one line)."""
    if not _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise MMError("the launcher selected DeepSpeed but the deepspeed package is not installed; `pip install "
                      "deepspeed` on a GPU machine, or launch with configs/accelerate/ddp.yaml or fsdp.yaml")
    if not torch.cuda.is_available():
        raise MMError("DeepSpeed needs GPUs (on CPU Accelerate would silently train with plain DDP); on CPU launch "
                      "with torchrun (DDP) or configs/accelerate/fsdp.yaml (FSDP)")


def use_fsdp(acc) -> bool:
    """True when the launcher asked for FSDP (``ACCELERATE_USE_FSDP=true`` and ``FSDP_*`` variables,
    as ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets them).

    Accelerate 1.15 turns FSDP on only for GPU-like devices: on CPU processes its state silently
    stays MULTI_CPU (plain DDP), even with an explicit plugin. FSDP2 itself runs on CPU with gloo,
    so there mm switches the state to FSDP the way Accelerate does on GPUs; sharding, clipping and
    no_sync are then Accelerate's own FSDP2 code.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if _env_flag("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type != DistributedType.FSDP:
        return False
    if not acc.is_fsdp2:
        raise MMError("mm trains with FSDP version 2 only; set fsdp_version: 2 in the accelerate config (FSDP_VERSION=2)")
    return True


def configure_deepspeed(acc, cfg: Config) -> bool:
    """DeepSpeed reads the micro-batch size from the DataLoader passed to ``prepare``; mm keeps its
    webdataset loader out of ``prepare`` (DESIGN.md §7), so the sizes come from the config."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return False
    if cfg.train.grad_accum != 1:
        raise MMError("with DeepSpeed use train.grad_accum=1 (DeepSpeed would accumulate on top of mm's own "
                      "accumulation); raise train.batch_size instead, or use DDP or FSDP")
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["train_batch_size"] = cfg.train.batch_size * acc.num_processes
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.train.grad_clip
    return True


def lift_scalars(model: torch.nn.Module) -> dict[str, torch.Size]:
    """FSDP2 cannot shard 0-dim parameters (torch: "fully_shard doesn't support scalar
    parameters"), e.g. the contrastive logit scale: while training each is held as a 1-element
    vector (broadcasting computes the same); checkpoints keep the original shape. Returns
    {name: original shape} of the lifted parameters."""
    lifted = {}
    for name, p in list(model.named_parameters()):
        if p.ndim == 0:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(p.detach().reshape(1), p.requires_grad))
            lifted[name] = p.shape
    return lifted


def as_float(x) -> float:
    """A Python float from a number, a tensor or a replicated DTensor (FSDP's gradient norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def any_rank(accelerator, *flags: bool) -> list[bool]:
    """Per flag: True if it is True on any process (one collective for all flags)."""
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return [bool(v > 0) for v in t.tolist()]
