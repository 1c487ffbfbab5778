"""The training loop shared by every stage (vq, pretrain, vqa, classify, detect).

``train(cfg)`` is the loop; the task (mm/tasks) computes losses and metrics, and small
components do the rest: ``checkpoint`` (atomic save / exact resume), ``logger`` (progress bar,
metrics.jsonl, wandb), ``optim`` (AdamW groups, schedule, EMA), ``setup`` (processes, data,
task). One ``step`` is one optimizer update over ``train.grad_accum`` micro-batches.

Exact resume: model, optimizer, grad scaler, EMA, every process's RNG states and the data
stream position (batches consumed) are checkpointed; per-sample randomness in the data comes
from sample keys, so a resumed run on CPU is bitwise identical to an uninterrupted one.

Launchers: one process, DDP (torchrun / accelerate), FSDP2 and DeepSpeed; their plumbing is in
``distributed``. Under FSDP checkpoints and exports still hold full tensors in the single-process
layout.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mm.config import Config, config_to_dict, load_config
from mm.errors import MMError
from mm.train import checkpoint as ckpt
from mm.train.distributed import (StopSignals, any_rank, as_float, check_launcher, configure_deepspeed, lift_scalars,
                                  use_fsdp)
from mm.train.logger import RunLogger
from mm.train.optim import EMA, lr_at, make_optimizer, set_lr
from mm.train.setup import (ensure_init, ensure_tokenizer, ensure_vq, make_accelerator, make_loader, make_task,
                            prepare_run_dir, resolve_sources)


@dataclass
class Progress:
    step: int = 0  # optimizer updates done
    batches: int = 0  # micro-batches this process consumed from its data stream
    samples: int = 0  # samples seen by all processes
    nonfinite: int = 0  # consecutive non-finite steps
    nonfinite_total: int = 0
    skipped: dict = field(default_factory=dict)  # corrupt samples by reason (this process)
    # Training time, cumulative across resumes (a resumed run continues from the saved totals):
    # the optimizer steps only (data loading included; start-up, validation and checkpoint writes
    # not), so runs with different eval/checkpoint settings compare at equal cost. CPU seconds are
    # time.process_time() of this (rank 0's) process: every thread counts, so with 2 torch threads
    # they run at ~2x wall; DataLoader worker processes (data.num_workers > 0) are not included.
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


class TaskModule(torch.nn.Module):
    """Wraps a task so that DDP sees one forward: ``forward(batch, step) -> (loss, metrics)``."""

    def __init__(self, task):
        super().__init__()
        self.model = task.model
        self._task = (task,)  # a tuple: not registered as a submodule

    def forward(self, batch, step):
        return self._task[0].loss(batch, step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _add_skipped(total: dict, new: dict | None) -> None:
    for reason, n in (new or {}).items():
        total[reason] = total.get(reason, 0) + int(n)


def _reshape_optimizer_state(state: dict, shapes: dict) -> None:
    """Reshape in place the per-parameter tensors (not ``step``) of the parameters ``shapes`` names
    (model parameter name -> shape) in a name-keyed optimizer state."""
    for name, shape in shapes.items():
        s = state["state"].get(f"model.{name}", {})
        s.update({k: v.reshape(shape) for k, v in s.items() if k != "step" and torch.is_tensor(v)})


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        check_launcher()
        self.acc = make_accelerator(cfg)
        self.fsdp = use_fsdp(self.acc)
        self.deepspeed = configure_deepspeed(self.acc, cfg)
        seed_everything(cfg.run.seed)  # same on every process: identical initial weights
        self.run_dir = prepare_run_dir(cfg, self.acc)
        self.data_cfg = resolve_sources(cfg, self.acc)
        self.data_cfg = ensure_vq(self.data_cfg, self.run_dir)
        self.data_cfg = ensure_init(self.data_cfg, self.run_dir)
        self.data_cfg = ensure_tokenizer(self.data_cfg, self.run_dir, self.acc)
        self.task = make_task(self.data_cfg)
        if hasattr(self.task, "setup"):
            self.task.setup(self.run_dir, self.acc)
        self.progress = Progress()
        resume_from = ckpt.latest_checkpoint(self.run_dir)
        if resume_from is not None:  # into the plain modules, before a wrapper may shard them
            ckpt.load_modules(resume_from, self._modules())
        t = cfg.train
        disc = getattr(self.task, "discriminator", None)
        self.disc_optimizer = make_optimizer(disc, t.lr, 0.0, t.betas) if disc is not None else None
        # Under FSDP rank 0 keeps a plain copy of the model: the gathered weights are loaded into
        # it to write checkpoints and exports in the single-process layout.
        self.plain_model = copy.deepcopy(self.task.model) if self.fsdp and self.acc.is_main_process else None
        self.lifted = lift_scalars(self.task.model) if self.fsdp else {}
        self.optimizer = make_optimizer(self.task.model, t.lr, t.weight_decay, t.betas)
        self.module, self.optimizer = self.acc.prepare(TaskModule(self.task), self.optimizer)
        if self.fsdp and self.acc.is_main_process:
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(m, FSDPModule) for m in self.module.modules())
            print(f"mm: FSDP2 over {self.acc.num_processes} processes, {units} sharded units", flush=True)
        # After prepare: under FSDP the averaged weights are sharded like the model's.
        self.ema = EMA(self.task.model, t.ema_decay) if t.ema_decay > 0 else None
        self._resume(resume_from)
        if self.progress.step == 0:  # fresh run: each process its own stream for training-time randomness
            seed_everything(cfg.run.seed + 1000 * self.acc.process_index)
        self.loader = make_loader(self.data_cfg, self.task, self.acc, train=True, start_batch=self.progress.batches)
        self.logger = RunLogger(self.run_dir, config_to_dict(cfg), self.acc.is_main_process, cfg.log.report_to,
                                cfg.train.max_steps, self.progress.step, cfg.log.project, cfg.log.name)

    # --- checkpoints ---------------------------------------------------------------------------

    def _modules(self) -> dict:
        mods = {"model": self.task.model}
        if getattr(self.task, "discriminator", None) is not None:
            mods["discriminator"] = self.task.discriminator
        return mods

    def _resume(self, path: Path | None) -> None:
        """Everything but the weights (loaded before prepare) from checkpoint ``path``."""
        if path is None:
            return
        state, progress = ckpt.load_state(path, self.acc.process_index)
        self._load_optimizer(state)
        if self.disc_optimizer is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
            if self.fsdp:
                self.ema.shadow = ckpt.shard_like(self.ema.shadow, self.task.model.state_dict())
        if hasattr(self.task, "load_state_dict") and "task" in state:
            self.task.load_state_dict(state["task"])
        self.progress = Progress(**progress["progress"])
        if self.acc.is_main_process:
            print(f"mm: resuming {self.run_dir} from {path.name}", flush=True)

    def _load_optimizer(self, checkpoint_state: dict) -> None:
        opt = self.optimizer.optimizer
        if self.deepspeed:  # ZeRO: each process restores its own partition
            if "own_optimizer" not in checkpoint_state:
                raise MMError("this checkpoint has no DeepSpeed optimizer partition for process "
                              f"{self.acc.process_index}; resume with the launcher and process count that wrote it")
            opt.load_state_dict(checkpoint_state["own_optimizer"])
            return
        state = checkpoint_state["optimizer"]
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Every process reads the full state and keeps its own shard of it.
        name_of = {id(p): name for name, p in self.module.named_parameters()}
        names = [name_of[id(p)] for group in opt.param_groups for p in group["params"]]
        state = ckpt.optimizer_by_name(state, names)
        _reshape_optimizer_state(state, {name: (1,) for name in self.lifted})  # as lift_scalars holds them
        set_optimizer_state_dict(self.module, opt, state, options=StateDictOptions(full_state_dict=True))

    def _optimizer_state(self) -> dict:
        """The optimizer state in torch.optim's layout; under FSDP gathered on rank 0 (a collective)."""
        opt = self.optimizer.optimizer
        if not self.fsdp:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.module, opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return {}
        _reshape_optimizer_state(full, self.lifted)  # back to the single-process shapes
        return ckpt.optimizer_by_index(full)

    def _gathered(self, tensors: dict) -> dict:
        """FSDP: sharded tensors gathered whole on rank 0 (a collective; empty elsewhere), in the
        single-process shapes (lifted scalars back to 0-dim)."""
        full = ckpt.full_tensors(tensors, keep=self.acc.is_main_process)
        return {k: v.reshape(self.lifted.get(k, v.shape)) for k, v in full.items()}

    def _full_modules(self) -> dict:
        """The modules to write, with full weights on rank 0 (under FSDP a collective: gathered
        into the plain copy)."""
        mods = self._modules()
        if self.fsdp:
            full = self._gathered(self.task.model.state_dict())
            if self.plain_model is not None:
                self.plain_model.load_state_dict(full)
                mods["model"] = self.plain_model
        return mods

    def save(self) -> Path:
        # DeepSpeed ZeRO partitions the optimizer state: every process writes its own part.
        rank_state = {"own_optimizer": self.optimizer.optimizer.state_dict()} if self.deepspeed else None
        state = {"optimizer": {} if self.deepspeed else self._optimizer_state()}
        if self.disc_optimizer is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        if self.acc.scaler is not None:
            state["scaler"] = self.acc.scaler.state_dict()
        if hasattr(self.task, "state_dict"):
            state["task"] = self.task.state_dict()
        progress = {"progress": self.progress.__dict__, "step": self.progress.step,
                    "samples_seen": self.progress.samples, "data_seed": self.cfg.run.seed,
                    "data_batches": self.progress.batches, "cpu_seconds": round(self.progress.cpu_seconds, 3),
                    "wall_seconds": round(self.progress.wall_seconds, 3)}
        # The EMA goes inside the checkpoint before it is marked complete: written afterwards, a
        # crash in between would leave a "complete" checkpoint that cannot be resumed.
        tensors = None
        if self.ema is not None:
            ema = self.ema.state_dict()
            tensors = {"ema": self._gathered(ema) if self.fsdp else ema}
        return ckpt.save_checkpoint(self.acc, self.run_dir, self.progress.step, self._full_modules(), state,
                                    progress, self.cfg.train.keep_checkpoints, tensors, rank_state)

    # --- one step ------------------------------------------------------------------------------

    def step(self, batches) -> dict:
        cfg, p = self.cfg, self.progress
        set_lr(self.optimizer, lr_at(p.step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps,
                                     cfg.train.min_lr_ratio))
        sums: dict[str, float] = {}
        finite = True
        batch = None
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            p.batches += 1
            _add_skipped(p.skipped, batch.pop("skipped", None))
            batch = to_device(batch, self.acc.device)
            last = micro == cfg.train.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.module):
                loss, metrics = self.module(batch, p.step)
                finite &= bool(torch.isfinite(loss.detach()))
                self.acc.backward(loss / cfg.train.grad_accum)
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach() if torch.is_tensor(v) else v
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.train.grad_accum
        n = len(next(iter(v for v in batch.values() if isinstance(v, (list, torch.Tensor)))))
        p.samples += n * cfg.train.grad_accum * self.acc.num_processes
        (bad,) = any_rank(self.acc, not finite)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            p.nonfinite += 1
            p.nonfinite_total += 1
            return {"nonfinite_steps": p.nonfinite_total}
        p.nonfinite = 0
        if cfg.train.grad_clip > 0:
            norm = self.acc.clip_grad_norm_(self.task.model.parameters(), cfg.train.grad_clip)
            if norm is not None:  # DeepSpeed clips inside its step and may not report a norm yet
                sums["grad_norm"] = as_float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            sums.update(self._discriminator_step(batch, p.step))
        if hasattr(self.task, "after_step"):
            self.task.after_step(p.step)
        if self.ema is not None:
            self.ema.update(self.task.model)
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        return sums

    def _discriminator_step(self, batch, step) -> dict:
        disc = self.task.discriminator
        with self._unsharded():  # it runs the generator outside the wrapped forward
            loss, metrics = self.task.discriminator_loss(batch, step)
        if loss.requires_grad:
            self.acc.backward(loss)
            if self.acc.num_processes > 1:  # plain gradient averaging: the discriminator is not DDP-wrapped
                for prm in disc.parameters():
                    if prm.grad is not None:
                        torch.distributed.all_reduce(prm.grad)
                        prm.grad /= self.acc.num_processes
            self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {"disc_loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

    # --- validation ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _unsharded(self):
        """Under FSDP, gather the parameters the root unit holds while the task calls its model
        directly (validation, images), outside the wrapped forward that would gather them; each
        wrapped block still gathers its own when called. Every process must enter."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        self.module.unshard()
        try:
            yield
        finally:
            # Every unit: those with reshard_after_forward=False (Accelerate's embedding/final-norm
            # group) stay gathered after a no-grad forward, and training would reuse that copy
            # (here: the EMA weights swapped in for validation).
            for unit in self.module.modules():
                if isinstance(unit, FSDPModule):
                    unit.reshard()

    @contextlib.contextmanager
    def _eval_weights(self):
        """Evaluate (and export) the EMA weights when there is an EMA; restore afterwards."""
        model = self.task.model
        backup = None
        if self.ema is not None:
            backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.ema.copy_to(model)
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            if backup is not None:
                model.load_state_dict(backup)

    def validate(self) -> dict:
        """One ordered pass on rank 0 (under FSDP on every process: each forward is a collective)."""
        metrics = {}
        if (self.acc.is_main_process or self.fsdp) and hasattr(self.task, "validate"):
            n_batches = max(1, math.ceil(self.cfg.data.val_samples / self.cfg.train.batch_size))
            loader = make_loader(self.data_cfg, self.task, self.acc, train=False)

            def batches():
                for i, b in enumerate(loader):
                    if i >= n_batches:
                        break
                    b.pop("skipped", None)
                    yield to_device(b, self.acc.device)

            # fork_rng: validation never changes the training RNG stream (exact resume).
            with torch.random.fork_rng(devices=[]), self._eval_weights(), self._unsharded(), torch.no_grad():
                metrics = {f"val/{k}": v for k, v in self.task.validate(batches()).items()}
                if hasattr(self.task, "images"):
                    first = next(iter(batches()), None)
                    if first is not None:
                        self.logger.images(self.progress.step, self.task.images(first))
            self.logger.log(self.progress.step, metrics)
        self.acc.wait_for_everyone()
        return metrics

    def export(self) -> Path:
        out = self.run_dir / "final"
        if self.fsdp:  # the task exports its model: give it rank 0's plain copy with the full weights
            with self._eval_weights():
                model = self._full_modules()["model"]
            if self.acc.is_main_process:
                sharded, self.task.model = self.task.model, model
                try:
                    self.task.export(out)
                finally:
                    self.task.model = sharded
        elif self.acc.is_main_process:
            with self._eval_weights():
                self.task.export(out)
        self.acc.wait_for_everyone()
        return out

    def _finish(self, result: dict) -> None:
        """The end of a run: the final validation, then the export."""
        result.update(self.validate())
        result["export"] = str(self.export())

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        stop_at = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        signals = StopSignals()
        batches = iter(self.loader)
        started, last_log, last_samples = time.time(), time.time(), p.samples
        reason = "max_steps" if stop_at == cfg.train.max_steps else "stop_at_step"
        try:
            if p.step >= stop_at:  # nothing left to train: a finished (or stopped-at-the-end) run, resumed
                done = {"step": p.step, "stopped_by": "already_done", "run_dir": str(self.run_dir)}
                if p.step >= cfg.train.max_steps:
                    if (self.run_dir / "final").exists():
                        done["export"] = str(self.run_dir / "final")
                    else:  # stopped (e.g. by a signal) after its last step: finish as a straight run does
                        self._finish(done)
                return done
            saved = None  # the step of the last checkpoint written by this loop
            while p.step < stop_at:
                cpu, wall = time.process_time(), time.monotonic()
                metrics = self.step(batches)
                p.step += 1
                p.cpu_seconds += time.process_time() - cpu
                p.wall_seconds += time.monotonic() - wall
                if p.nonfinite >= cfg.train.max_nonfinite:
                    last = ckpt.latest_checkpoint(self.run_dir)
                    raise MMError(f"loss was not finite for {p.nonfinite} consecutive steps (step {p.step}); "
                                  f"last good checkpoint: {last.name if last else 'none'}; lower train.lr or "
                                  "use train.mixed_precision=no")
                if p.step % cfg.log.every == 0 or p.step == stop_at:
                    now = time.time()
                    metrics["samples_per_s"] = (p.samples - last_samples) / max(now - last_log, 1e-9)
                    metrics["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    metrics["cpu_seconds"], metrics["wall_seconds"] = round(p.cpu_seconds, 3), round(p.wall_seconds, 3)
                    metrics.update({f"skipped/{k}": v for k, v in p.skipped.items()})
                    last_log, last_samples = now, p.samples
                    self.logger.log(p.step, metrics)
                    self.logger.progress(p.step, {k: metrics[k] for k in ("loss", "lr", "samples_per_s")
                                                  if k in metrics})
                if cfg.train.eval_every and p.step % cfg.train.eval_every == 0 and p.step < cfg.train.max_steps:
                    self.validate()
                over_time = cfg.train.time_limit_minutes > 0 and (time.time() - started) > 60 * cfg.train.time_limit_minutes
                stop, timeout = any_rank(self.acc, signals.stop(), over_time)
                if stop or timeout:
                    reason = "signal" if stop else "time_limit"
                    break
                if cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0:
                    self.save()
                    saved = p.step
            if saved != p.step:  # the last step's periodic checkpoint already is the final one
                self.save()
            result = {"step": p.step, "stopped_by": reason, "run_dir": str(self.run_dir)}
            if reason in ("max_steps", "time_limit"):  # the run is finished: evaluate and export
                self._finish(result)
            return result
        finally:
            signals.restore()
            self.logger.close()


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by ``cfg``; returns a summary dict."""
    return Trainer(cfg).fit()


def cli_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.get("stopped_by") == "signal":
        print(f"mm: stopped at step {result['step']}; checkpoint saved; run the same command to resume")
    elif "export" in result:
        print(f"mm: finished at step {result['step']}; model exported to {result['export']}")
    else:
        print(f"mm: stopped at step {result['step']}; checkpoint saved in {Path(result['run_dir']) / 'checkpoints'}")
    return 0
