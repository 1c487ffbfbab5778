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
    t2i_ceiling,
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


class IdentityVQ(torch.nn.Module):
    """A perfect tokenizer: the "codes" are the image itself."""

    def encode(self, images):
        return images

    def decode(self, codes):
        return codes


class BlankVQ(IdentityVQ):
    """A tokenizer that loses everything: every reconstruction is plain mid grey."""

    def decode(self, codes):
        return torch.zeros_like(codes)


CEILING_KEYS = {"overall", "color", "shape", "count", "position", "per_tag", "raw", "images",
                "renders_per_prompt", "image_size"}


@pytest.mark.parametrize("size", [32, 64])
def test_t2i_ceiling_is_perfect_for_a_lossless_vq_and_zero_for_a_blanking_one(size):
    perfect = t2i_ceiling(IdentityVQ(), 60, size, renders_per_prompt=2)
    assert set(perfect) == CEILING_KEYS and perfect["images"] == 120
    assert perfect["overall"] == 1.0 and all(perfect[a] == 1.0 for a in ("color", "shape", "count", "position"))
    assert set(perfect["per_tag"]) == {"single", "two", "count", "position", "relation"}
    assert set(perfect["per_tag"].values()) == {1.0}
    assert perfect["raw"]["overall"] == 1.0  # the detector reads every true render
    blank = t2i_ceiling(BlankVQ(), 60, size, renders_per_prompt=2)
    assert blank["overall"] == 0.0 and blank["color"] == blank["shape"] == 0.0
    assert set(blank["per_tag"].values()) == {0.0}
    assert blank["raw"]["overall"] == 1.0  # the renders were fine; the VQ lost them


def test_t2i_ceiling_renders_differ_between_renders_of_a_prompt():
    # Render r of prompt i uses seed + i + r * num_prompts: the two renders of a prompt are two
    # different drawings, and render 0 is the FID reference drawing.
    seen = []

    class Recorder(IdentityVQ):
        def encode(self, images):
            seen.append(images.clone())
            return images

    t2i_ceiling(Recorder(), 3, 32, seed=5, renders_per_prompt=2)
    images = torch.cat(seen)  # (6, 3, 32, 32), render-major
    assert images.shape == (6, 3, 32, 32)
    specs = eval_prompts(3)
    assert torch.equal(images[:3], rendered_references(specs, 32, 5))
    assert not any(torch.equal(images[i], images[i + 3]) for i in range(3))
    with pytest.raises(MMError, match="renders_per_prompt"):
        t2i_ceiling(IdentityVQ(), 3, 32, renders_per_prompt=0)


def test_t2i_ceiling_runs_on_a_tiny_trained_vq():
    # A few hundred steps do not make a good VQ: this checks the plumbing (real encode/decode,
    # codes, batching), not the value.
    import torch.nn.functional as F

    from mm.data.shapes import render_scene, sample_rng, sample_scene
    from mm.generation.pipeline import to_tensor
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    torch.manual_seed(0)
    vq = VQTokenizer(VQTokenizerConfig(codebook_size=64, code_dim=4, downsample=4, patch_size=4, channels=32,
                                       channel_mult=[1], mid_attention=False, image_size=32)).train()
    opt = torch.optim.Adam(vq.parameters(), 2e-3)
    for step in range(200):
        scenes = [sample_scene(sample_rng(0, "train", 16 * step + j), 32) for j in range(16)]
        x = to_tensor([render_scene(s["objects"], s["background"], 32) for s in scenes], 32)
        recon, aux = vq(x)
        loss = F.mse_loss(recon, x) + aux["vq_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        vq.after_step(step)
    got = t2i_ceiling(vq.eval(), 60, 32, renders_per_prompt=2, batch=32)
    assert set(got) == CEILING_KEYS and got["images"] == 120 and got["raw"]["overall"] == 1.0
    assert 0.0 <= got["overall"] <= 1.0 and set(got["per_tag"]) == {"single", "two", "count", "position", "relation"}


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
    # The ceiling: the same prompts' true renders through the bundle's (random) VQ.
    assert 0.0 <= m["t2i_ceiling"] <= 1.0 and m["t2i_ceiling"] == m["ceiling"]["overall"]
    assert m["ceiling"]["images"] == 12 and m["ceiling"]["image_size"] == 16
    assert "t2i_ceiling" in capsys.readouterr().err
    assert (m["top_k"], m["temperature"]) == (0, 1.0)


def test_eval_t2i_sampling_settings_reach_the_sampler(bundle_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    from mm.generation.pipeline import TextToImagePipeline

    seen = []
    original = TextToImagePipeline.generate_codes

    def spy(self, prompts, **kw):
        seen.append((kw["top_k"], kw["temperature"]))
        return original(self, prompts, **kw)

    monkeypatch.setattr(TextToImagePipeline, "generate_codes", spy)
    code = main(["eval", "t2i", "--model", str(bundle_dir), "--num-prompts", "4", "--top-k", "3",
                 "--temperature", "0.7", "--out", str(tmp_path / "m.json")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    assert seen == [(3, 0.7)] and (m["top_k"], m["temperature"]) == (3, 0.7)


def test_eval_t2i_with_shard_references(bundle_dir, shapes_shards, tmp_path, capsys):  # noqa: F811
    code = main(["eval", "t2i", "--model", str(bundle_dir), "--num-prompts", "4",
                 "--fid-data", str(shapes_shards / "val"), "--out", str(tmp_path / "m.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["fid_reference"] == "shards"


@pytest.mark.parametrize("extra,msg", [(["--num-prompts", "0"], "--num-prompts"),
                                       (["--guidance", "-2"], "--guidance"),
                                       (["--top-k", "-1"], "--top-k"),
                                       (["--temperature", "0"], "--temperature"),
                                       (["--inception", "/nonexistent/inc.pt"], "Inception")])
def test_eval_t2i_bad_input(bundle_dir, capsys, extra, msg):  # noqa: F811
    code = main(["eval", "t2i", "--model", str(bundle_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
