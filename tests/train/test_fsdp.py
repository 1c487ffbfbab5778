"""FSDP2 on CPU: two torchrun processes (gloo) shard the VQ model, stop, resume, and end where
one process with gradient accumulation 2 ends, with checkpoints in the single-process layout.

Accelerate 1.15 ignores FSDP on CPU processes; the trainer turns it on itself (distributed.use_fsdp),
so this runs Accelerate's own FSDP2 preparation, clipping and no_sync. Every sample is the same
image, so the two ranks' batches equal the one process's two micro-batches.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mm.train import checkpoint as ckpt
from tests.helpers import same_image_shards

from .conftest import ROOT, mm_env, run_mm, tiny_vq_overrides

CONFIG = "configs/vq/shapes.yaml"
STEPS = 4
# The quantizer's dead-code bookkeeping (recent encoder outputs, usage counters) is per process.
BOOKKEEPING = ("recent", "step_usage", "steps_unused")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "DownEncoderBlock2D,UpDecoderBlock2D", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def torchrun_fsdp(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mm", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=mm_env(**FSDP_ENV), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def assert_close_tensors(a, b):
    assert a.keys() == b.keys()
    assert {k: a[k].shape for k in a} == {k: b[k].shape for k in b}
    compared = [k for k in a if not any(word in k for word in BOOKKEEPING)]
    assert len(compared) > 10
    for k in compared:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_fsdp_two_processes_resume_and_match_one_with_grad_accum(tmp_path, shapes_cache):
    data = tmp_path / "same"
    same_image_shards(data)
    common = {"data.train": data, "data.val": data, "train.max_steps": STEPS, "vq.restart_dead_codes": "false",
              "train.ema_decay": 0.9, "train.eval_every": 2}
    one, two = tmp_path / "one", tmp_path / "two"
    run_mm(["train", CONFIG, *tiny_vq_overrides(one, shapes_cache, **common, **{"train.grad_accum": 2})])

    args = ["train", CONFIG, *tiny_vq_overrides(two, shapes_cache, **common)]
    first = torchrun_fsdp(args + ["train.stop_at_step=2"])
    assert "mm: FSDP2 over 2 processes" in first.stdout  # really sharded, not DDP
    assert (two / "checkpoints" / "step_2").is_dir() and not (two / "final").exists()
    second = torchrun_fsdp(args)
    assert "resuming" in second.stdout and "finished at step 4" in second.stdout

    # Same files, keys, shapes and safetensors metadata as one process; values within float tolerance.
    for name in ("checkpoints/step_4/model.safetensors", "checkpoints/step_4/ema.safetensors",
                 "final/model.safetensors"):
        assert_close_tensors(load_file(str(one / name)), load_file(str(two / name)))
        with safe_open(str(one / name), "pt") as f1, safe_open(str(two / name), "pt") as f2:
            assert f1.metadata() == f2.metadata()
    assert json.loads((two / "final" / "config.json").read_text()) == json.loads((one / "final" / "config.json").read_text())

    # The optimizer state is gathered into torch.optim's own layout (numbered parameters).
    s1 = torch.load(one / "checkpoints" / "step_4" / "state.pt", weights_only=True)["optimizer"]
    s2 = torch.load(two / "checkpoints" / "step_4" / "state.pt", weights_only=True)["optimizer"]
    assert [g["params"] for g in s1["param_groups"]] == [g["params"] for g in s2["param_groups"]]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s1["state"][i][k], s2["state"][i][k], rtol=1e-4, atol=1e-6)

    assert json.loads((two / "progress.json").read_text())["samples_seen"] == STEPS * 4 * 2

    # The FSDP checkpoint is an ordinary one: a single process resumes from it (strict loads of
    # weights, EMA and optimizer state).
    shutil.rmtree(two / "checkpoints" / "step_4")
    shutil.rmtree(two / "final")
    proc = run_mm(args)
    assert "resuming" in proc.stdout and "from step_2" in proc.stdout
    assert (two / "final" / "model.safetensors").exists()
    v1 = [json.loads(r) for r in (one / "metrics.jsonl").read_text().splitlines() if '"val/psnr"' in r]
    v2 = [json.loads(r) for r in (two / "metrics.jsonl").read_text().splitlines() if '"val/psnr"' in r]
    assert [r["step"] for r in v2] == [r["step"] for r in v1] == [2, 4]  # validated under FSDP, logged once
    for r1, r2 in zip(v1, v2):
        assert r2["val/psnr"] == pytest.approx(r1["val/psnr"], rel=1e-4)


def test_optimizer_state_layouts_round_trip():
    """Name-keyed (FSDP's full form) <-> torch.optim's numbered form, on a real AdamW state."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    native = opt.state_dict()
    names = ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    by_name = ckpt.optimizer_by_name(native, names)
    assert by_name["param_groups"][0]["params"] == ["0.weight", "2.weight"]
    assert torch.equal(by_name["state"]["1.bias"]["exp_avg"], native["state"][4]["exp_avg"])
    back = ckpt.optimizer_by_index(by_name)
    assert back["param_groups"] == native["param_groups"]
    assert back["state"].keys() == native["state"].keys()
    opt.load_state_dict(back)  # torch accepts it as its own
    with pytest.raises(Exception, match="another config"):
        ckpt.optimizer_by_name(native, names[:-1])



def test_lifted_scalars_and_their_optimizer_state_round_trip():
    """FSDP2 cannot shard 0-dim parameters: lift_scalars holds them as 1-element vectors while
    training, and the optimizer state goes back to 0-dim for checkpoints (and forward on load)."""
    from mm.train.distributed import lift_scalars
    from mm.train.trainer import _reshape_optimizer_state

    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor(2.5))
    model.lin = torch.nn.Linear(2, 2)
    lifted = lift_scalars(model)
    assert lifted == {"scale": torch.Size([])}
    assert model.scale.shape == (1,) and model.scale.item() == 2.5 and model.scale.requires_grad
    assert model.lin.weight.shape == (2, 2)  # others untouched
    state = {"state": {"model.scale": {"step": torch.tensor(3.0), "exp_avg": torch.ones(1)},
                       "model.lin.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}}}
    _reshape_optimizer_state(state, lifted)  # saving: the single-process shapes
    assert state["state"]["model.scale"]["exp_avg"].shape == ()
    _reshape_optimizer_state(state, {name: (1,) for name in lifted})  # loading: as lifted
    assert state["state"]["model.scale"]["exp_avg"].shape == (1,)
    assert state["state"]["model.scale"]["step"].shape == ()  # the step count is left alone
    assert state["state"]["model.lin.weight"]["exp_avg"].shape == (2, 2)

def test_deepspeed_without_package_is_one_line_error(tmp_path, shapes_cache):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    proc = run_mm(["train", CONFIG, *tiny_vq_overrides(tmp_path / "run", shapes_cache)], check=False,
                  env=mm_env(ACCELERATE_USE_DEEPSPEED="true"))
    assert proc.returncode == 2
    assert "deepspeed package is not installed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
