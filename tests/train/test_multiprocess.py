"""Two real processes (torchrun, gloo on CPU) run `mm train configs/pretrain/shapes.yaml`.

The run uses the debug preset at 32 px with 8-px patches, a tiny VQ tokenizer saved by the test
(random weights: its codes are valid, which is all pretraining needs) and the built-in shapes
data in a private cache. Each process goes through the real command line (``mm.cli.main``); a
small wrapper only records the weights each rank holds when training ends, so the test can
check that the two replicas agree bit for bit and that rank 0 wrote them (once) to the
checkpoint and to ``final/``.
"""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from .conftest import ROOT, mm_env

CONFIG = "configs/pretrain/shapes.yaml"
STEPS, BATCH, WORLD = 3, 4, 2

# Runs in each torchrun process: the `mm train` command, then this rank's weights to a file.
WRAPPER = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from mm.train import trainer

    out = sys.argv[1]
    fit = trainer.Trainer.fit

    def fit_and_record(self):
        result = fit(self)
        state = {k: v.detach().cpu().contiguous() for k, v in self.task.model.state_dict().items()}
        save_file(state, os.path.join(out, f"rank{self.acc.process_index}.safetensors"))
        return result

    trainer.Trainer.fit = fit_and_record
    from mm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def make_tiny_vq(path):
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    torch.manual_seed(0)
    cfg = VQTokenizerConfig(codebook_size=32, code_dim=4, downsample=8, channels=8, channel_mult=[1, 1, 1, 1],
                            image_size=32, mid_attention=False)  # 32 px -> a 4x4 code grid
    VQTokenizer(cfg).save_pretrained(path)


def test_torchrun_two_processes_pretrain(tmp_path):
    vq, run, ranks = tmp_path / "vq", tmp_path / "run", tmp_path / "ranks"
    make_tiny_vq(vq)
    ranks.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    overrides = {
        "run.dir": run, "vq.path": vq, "model.preset": "debug", "model.patch_size": 8,
        "data.image_size": 32, "data.text_max_len": 16, "data.vocab_size": 300,
        "data.shapes_cache": tmp_path / "shapes", "data.shapes_train": 64, "data.shapes_val": 16,
        "data.val_samples": 8, "data.shuffle_buffer": 16, "train.batch_size": BATCH,
        "train.max_steps": STEPS, "train.warmup_steps": 1, "train.checkpoint_every": 0,
        "train.eval_every": 0, "log.every": 1,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(wrapper), str(ranks), "train", CONFIG, *[f"{k}={v}" for k, v in overrides.items()]]
    proc = subprocess.run(cmd, cwd=ROOT, env=mm_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # Every sample of both ranks is counted: steps x per-process batch x 2 processes.
    progress = json.loads((run / "progress.json").read_text())
    assert progress["step"] == STEPS
    assert progress["samples_seen"] == STEPS * BATCH * WORLD

    # The replicas agree bit for bit, and what rank 0 wrote is exactly that state.
    r0, r1 = load_file(str(ranks / "rank0.safetensors")), load_file(str(ranks / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    for written in (run / "checkpoints" / f"step_{STEPS}" / "model.safetensors", run / "final" / "model.safetensors"):
        w = load_file(str(written))
        assert w.keys() == r0.keys()
        for k in w:
            assert torch.equal(w[k], r0[k]), f"{written} differs from the trained weights at {k}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{STEPS}"]

    # Metrics are logged by rank 0 only: one row per step, no duplicates from rank 1.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert proc.stdout.count("mm: finished at step") >= 1


# ---------------------------------------------------------------------------------------------
# The accelerate configs shipped in configs/accelerate are what `accelerate launch` expects.


def _launch_args(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"),
                              "-m", "mm", "train", CONFIG])
    return _validate_launch_command(args)[0]


def test_accelerate_ddp_config():
    args = _launch_args("ddp")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.num_processes >= 2 and args.num_machines == 1


def test_accelerate_fsdp_config(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from mm.nn.layers import Block

    args = _launch_args("fsdp")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_USE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds from that environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
    assert plugin.transformer_cls_names_to_wrap == [Block.__name__]  # wraps mm's blocks
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_accelerate_deepspeed_zero2_config():
    args = _launch_args("deepspeed_zero2")
    assert args.use_deepspeed and int(args.zero_stage) == 2
    assert args.offload_optimizer_device == "none" and args.offload_param_device == "none"
