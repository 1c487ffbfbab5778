"""A checkpoint from elsewhere never runs code: `mm train` on a run folder whose newest complete
checkpoint holds a pickle with a payload refuses it in one line, and the payload never runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_model

from mm.cli import main
from tests.helpers import ROOT

from .conftest import VQ_CONFIG, vq_args


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("planted", ["state.pt", "rng_rank0.pt", "model.safetensors"])
def test_train_refuses_planted_pickle(planted, tmp_path, shapes_cache, capsys):
    from mm.config import load_config
    from mm.train.setup import make_task

    run, marker = tmp_path / "run", tmp_path / "payload_ran"
    args = vq_args(run, shapes_cache, **{"train.max_steps": 4})
    # A complete-looking checkpoint: real weights of this config, plain states, COMPLETE marker.
    step = run / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    model = make_task(load_config(ROOT / VQ_CONFIG, args[2:])).model
    save_model(model, str(step / "model.safetensors"))
    torch.save({"optimizer": {"state": {}, "param_groups": []}}, step / "state.pt")
    torch.save({"torch": torch.get_rng_state()}, step / "rng_rank0.pt")
    progress = {"step": 2, "batches": 2, "samples": 8, "nonfinite": 0, "nonfinite_total": 0, "skipped": {}}
    (step / "progress.json").write_text(json.dumps({"progress": progress, "step": 2}))
    (step / "COMPLETE").write_text("2")
    with open(step / planted, "wb") as f:  # the planted file: a pickle whose loading runs a command
        torch.save({"optimizer": Payload(marker)}, f)

    code = main([args[0], str(ROOT / VQ_CONFIG), *args[2:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and err.startswith("mm: error:") and planted in err, err
    assert "refusing to load" in err or "could not load" in err, err
