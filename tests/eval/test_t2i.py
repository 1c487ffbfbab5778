"""T2I evaluation: Fréchet distance against known answers, compositional score, the command."""

import json

import numpy as np
import pytest
import torch

from mm.cli import main
from mm.errors import MMError
from mm.eval.t2i import (
    InceptionFeatures,
    compositional_scores,
    eval_prompts,
    feature_stats,
    frechet_distance,
    rendered_references,
)
from mm.generation.pipeline import to_pil
from tests.generation.conftest import bundle_dir  # noqa: F401  (the tiny exported model fixture)


def test_frechet_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 1 + 4
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, abs=1e-9)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_non_commuting_2x2():
    # For 2x2 SPD products, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expect = 0.25 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance(np.zeros(2), s1, np.array([0.5, 0.0]), s2)
    assert got == pytest.approx(expect, abs=1e-9)


def test_frechet_from_samples_approaches_the_answer():
    rng = np.random.default_rng(0)
    x = rng.normal([0, 0], [1, 2], size=(20000, 2))
    y = rng.normal([1, 0], [1, 1], size=(20000, 2))
    expect = 1.0 + (2 - 1) ** 2
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(expect, abs=0.08)


def test_frechet_with_fewer_samples_than_features_is_finite():
    rng = np.random.default_rng(1)
    d = frechet_distance(*feature_stats(rng.normal(size=(5, 16))), *feature_stats(rng.normal(size=(5, 16)) + 1))
    assert np.isfinite(d) and d > 0


def test_compositional_score_is_perfect_on_rendered_images_and_zero_on_blank():
    specs = eval_prompts(60)
    drawn = to_pil(rendered_references(specs, 32))
    scores = compositional_scores(drawn, specs)
    assert scores["overall"] == 1.0 and all(scores[a] == 1.0 for a in ("color", "shape", "count", "position"))
    assert set(scores["per_tag"]) == {"single", "two", "count", "position", "relation"}
    from PIL import Image

    blank = compositional_scores([Image.new("RGB", (32, 32), (128, 128, 128))] * 5, specs[:5])
    assert blank["overall"] == 0.0 and blank["color"] == 0.0


def test_inception_features_from_a_local_torchscript(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.shape[-1] == 299
            return x.mean(dim=(2, 3)) if return_features else x.sum()

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    feats = InceptionFeatures(path)(torch.zeros(2, 3, 16, 16))
    assert feats.shape == (2, 3) and np.allclose(feats, 127.5)
    with pytest.raises(MMError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MMError, match="TorchScript"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_eval_t2i_command(bundle_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m.json"
    code = main(["eval", "t2i", "--model", str(bundle_dir), "--num-prompts", "6", "--guidance", "2",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["num_images"] == 6 and m["fid_features"] == "mm" and m["fid_reference"] == "rendered"
    assert 0.0 <= m["t2i_compositional_accuracy"] <= 1.0 and np.isfinite(m["fid"]) and m["fid"] >= 0
    assert -100 <= m["itc_score"] <= 100
    assert set(m["compositional"]) >= {"overall", "color", "shape", "count", "position", "per_tag"}


def test_eval_t2i_with_shard_references(bundle_dir, shapes_shards, tmp_path, capsys):  # noqa: F811
    code = main(["eval", "t2i", "--model", str(bundle_dir), "--num-prompts", "4",
                 "--fid-data", str(shapes_shards / "val"), "--out", str(tmp_path / "m.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["fid_reference"] == "shards"


@pytest.mark.parametrize("extra,msg", [(["--num-prompts", "0"], "--num-prompts"),
                                       (["--guidance", "-2"], "--guidance"),
                                       (["--inception", "/nonexistent/inc.pt"], "Inception")])
def test_eval_t2i_bad_input(bundle_dir, capsys, extra, msg):  # noqa: F811
    code = main(["eval", "t2i", "--model", str(bundle_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
