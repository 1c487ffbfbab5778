"""scripts/vqa_question_probe.py: the spread is 0 for a model whose cross-attention is cut, > 0 otherwise."""

import importlib.util
from pathlib import Path

import torch

from mm.generation import vqa as gen
from mm.models.model import MMModel
from tests.tasks.vqa_util import make_pretrained, samples

ROOT = Path(__file__).resolve().parents[2]


def load_probe():
    spec = importlib.util.spec_from_file_location("vqa_question_probe", ROOT / "scripts" / "vqa_question_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_run(tmp_path: Path, cut: bool) -> Path:
    run = tmp_path / ("cut" if cut else "open")
    init = make_pretrained(run / "final", samples(8))
    model = MMModel.from_pretrained(init)
    model.set_vqa_answers(3)
    if cut:  # the question can reach the patches only through cross-attention
        for block in model.backbone.blocks:
            torch.nn.init.zeros_(block.cross.out.weight)
            torch.nn.init.zeros_(block.cross.out.bias)
    model.save_pretrained(run / "final")
    gen.save_answer_vocab(run / "answer_vocab.json", ["yes", "no", "red"], [3, 2, 1], "classifier", False)
    return run


def test_probe_spread_is_zero_without_cross_attention_and_positive_with_it(tmp_path, capsys):
    probe = load_probe()
    probe.probe(str(make_run(tmp_path, cut=True)), images=4)
    cut = capsys.readouterr().out
    assert "fused 0.000" in cut and "cross-attention by block 0.000" in cut
    probe.probe(str(make_run(tmp_path, cut=False)), images=4)
    out = capsys.readouterr().out
    fused = [float(line.split("fused ")[1].split(",")[0]) for line in out.splitlines()]
    assert len(fused) == 2 and min(fused) > 0.0
    x = [torch.ones(2, 3), torch.ones(2, 3) * 2]
    assert abs(probe.spread(x) - torch.stack(x).std(0).mean().item() / torch.stack(x).std().item()) < 1e-6
