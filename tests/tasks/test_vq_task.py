"""VQTask: the loss the trainer optimises, validation, grids, the GAN and perceptual options,
export, and `mm data codes`."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mm.config import Config
from mm.errors import MMError
from mm.models.vq import VQTokenizer
from mm.tasks.vq import VQTask, cli_codes, read_tar_samples


def tiny_config(**vq) -> Config:
    cfg = Config()
    cfg.run.stage = "vq"
    cfg.data.image_size = 16
    for k, v in {"channels": 8, "codebook_size": 32, "code_dim": 4, **vq}.items():
        setattr(cfg.vq, k, v)
    return cfg


def blocks_batch(n: int = 4, size: int = 16) -> torch.Tensor:
    """Coloured squares on grey, in [-1, 1]: easy enough to overfit in a few dozen steps."""
    x = torch.full((n, 3, size, size), -0.6)
    for i in range(n):
        x[i, i % 3, 2 + i:10 + i, 3:11] = 0.8
    return x


# norm none as configs/vq/shapes.yaml uses it (2x2 stem, L2); in a full-resolution stack with L1
# this overfit stalls near L1 0.12 without GroupNorm (see `norm` in mm/models/vq.py).
LAYOUTS = {"group": {}, "none": {"norm": "none", "patch_size": 2, "channel_mult": [1, 1],
                                 "layers_per_block": 2, "recon_loss": "l2"}}


@pytest.mark.parametrize("norm", list(LAYOUTS))
def test_overfits_one_batch(norm):
    task = VQTask(tiny_config(channels=16, **LAYOUTS[norm]))
    x = blocks_batch(2)
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    first, last = None, None
    for step in range(200):  # about 60 steps are needed
        loss, metrics = task.loss({"image": x}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_step(step)
        first = first if first is not None else loss.item()
        last = loss.item()
        if last < first / 10:
            break
    assert last < first / 10, (first, last)
    assert {"rec_loss", "codebook_loss", "commit_loss", "psnr", "batch_code_usage"} <= set(metrics)


def test_loss_is_reconstruction_plus_vq_terms():
    for kind in ("l1", "l2"):
        task = VQTask(tiny_config(recon_loss=kind, beta=0.5))
        x = blocks_batch(2)
        torch.manual_seed(3)
        loss, _m = task.loss({"image": x}, 0)
        torch.manual_seed(3)
        recon, aux = task.model(x)
        rec = (recon - x).abs().mean() if kind == "l1" else (recon - x).pow(2).mean()
        expected = rec + aux["codebook_loss"] + 0.5 * aux["commit_loss"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_validate_and_images():
    task = VQTask(tiny_config())
    x = blocks_batch(4)
    metrics = task.validate([{"image": x[:2]}, {"image": x[2:]}])
    assert set(metrics) == {"psnr", "ssim", "l1", "code_usage", "perplexity"}
    assert 0 < metrics["code_usage"] <= 100 and metrics["perplexity"] >= 1
    assert -1 <= metrics["ssim"] <= 1 and np.isfinite(metrics["psnr"])
    assert task.model.training  # put back as it was
    grids = task.images({"image": x})
    grid = grids["reconstructions"]
    assert isinstance(grid, Image.Image)
    # Four (original | reconstruction) pairs in one row, 16 px upscaled to 64.
    assert grid.size == (4 * (2 * 64 + 6), 64 + 4)


def test_discriminator_terms_train_the_right_networks():
    task = VQTask(tiny_config(disc_weight=0.5, disc_start=1))
    assert task.discriminator is not None
    x = blocks_batch(2)
    _loss0, m0 = task.loss({"image": x}, 0)  # before the warm-up ends: no GAN term
    assert "g_loss" not in m0
    d_loss, _ = task.discriminator_loss({"image": x}, 0)
    assert not d_loss.requires_grad
    loss, m = task.loss({"image": x}, 1)
    assert "g_loss" in m and m["disc_adaptive_weight"] >= 0
    loss.backward()
    assert all(p.grad is None for p in task.discriminator.parameters())  # generator step leaves D alone
    assert all(p.requires_grad for p in task.discriminator.parameters())
    task.model.zero_grad()
    d_loss, dm = task.discriminator_loss({"image": x}, 1)
    d_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.discriminator.parameters())
    assert all(p.grad is None for p in task.model.parameters())  # critic step leaves the VQ alone
    assert {"logits_real", "logits_fake"} <= set(dm)


def test_perceptual_path_missing_is_an_error():
    with pytest.raises(MMError, match="perceptual_path"):
        VQTask(tiny_config(perceptual_path="/nonexistent/vgg.safetensors"))


def test_perceptual_loss_from_local_vgg_safetensors(tmp_path):
    from safetensors.torch import save_file

    # Two stages of a VGG-layout net: conv0, (relu1), conv2, (relu3, pool4), conv5.
    g = torch.Generator().manual_seed(0)
    state = {"features.0.weight": torch.randn(4, 3, 3, 3, generator=g), "features.0.bias": torch.zeros(4),
             "features.2.weight": torch.randn(4, 4, 3, 3, generator=g), "features.2.bias": torch.zeros(4),
             "features.5.weight": torch.randn(6, 4, 3, 3, generator=g), "features.5.bias": torch.zeros(6)}
    save_file(state, str(tmp_path / "vgg.safetensors"))
    task = VQTask(tiny_config(perceptual_path=str(tmp_path / "vgg.safetensors"), perceptual_weight=1.0))
    assert task.perceptual.pool_after == [False, True, False]
    taps = task.perceptual(blocks_batch(1))
    assert [t.shape[1:] for t in taps] == [(4, 16, 16), (6, 8, 8)]
    _, m = task.loss({"image": blocks_batch(2)}, 0)
    assert m["perceptual_loss"] > 0
    from mm.tasks.vq import perceptual_distance

    x = blocks_batch(2)
    assert perceptual_distance(task.perceptual, x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_export_loads_back(tmp_path):
    task = VQTask(tiny_config())
    task.export(tmp_path / "vq")
    vq = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert vq.cfg.image_size == 16 and vq.cfg.codebook_size == 32
    x = blocks_batch(2)
    task.model.eval()
    assert torch.equal(vq.encode(x), task.model.encode(x))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder, sizes_per_shard):
    from mm.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(folder, "shards", samples_per_shard=3) as w:
        for i, size in enumerate(sizes_per_shard):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            sample = {"__key__": f"{i:06d}", "png": _png(Image.fromarray(arr)), "txt": f"caption {i}",
                      "json": json.dumps({"caption": f"caption {i}", "index": i}).encode()}
            w.write(sample)
        w.write({"__key__": "nopicture", "txt": "text only"})


def test_cli_codes_round_trip(tmp_path):
    vq = VQTokenizer(VQTask(tiny_config()).model.cfg).eval()
    vq.save_pretrained(tmp_path / "vq")
    # Five 16 px images and one 24 px image (resized to the VQ's 16), plus one without an image.
    _write_shards(tmp_path / "in", [16, 16, 16, 24, 16, 16])
    args = argparse.Namespace(vq=str(tmp_path / "vq"), data=str(tmp_path / "in"), out=str(tmp_path / "out"),
                              workers=2, batch_size=2)
    assert cli_codes(args) == 0
    from mm.data.transforms import load_image, to_tensor

    in_names = sorted(p.name for p in (tmp_path / "in").glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == in_names
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == \
        json.loads((tmp_path / "in" / "sizes.json").read_text())
    n = 0
    for name in in_names:
        before = read_tar_samples(str(tmp_path / "in" / name))
        after = read_tar_samples(str(tmp_path / "out" / name))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for b, a in zip(before, after):
            assert {k: v for k, v in a.items() if k != "codes.npy"} == b  # all fields kept, byte-equal
            if "png" not in b:
                assert "codes.npy" not in a
                continue
            codes = np.load(io.BytesIO(a["codes.npy"]), allow_pickle=False)
            assert codes.dtype == np.int16 and codes.shape == (4, 4)
            expected = vq.encode(to_tensor([load_image(b["png"], 16)]))[0].numpy()
            assert np.array_equal(codes, expected)
            n += 1
    assert n == 6
    # Tar entries are reproducible: fixed mtime.
    with tarfile.open(tmp_path / "out" / in_names[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_cli_codes_refuses_to_overwrite_its_input(tmp_path):
    VQTask(tiny_config()).export(tmp_path / "vq")
    _write_shards(tmp_path / "in", [16])
    args = argparse.Namespace(vq=str(tmp_path / "vq"), data=str(tmp_path / "in"), out=str(tmp_path / "in"),
                              workers=1, batch_size=4)
    with pytest.raises(MMError, match="input folder"):
        cli_codes(args)
    args.vq = str(tmp_path / "missing")
    with pytest.raises(MMError, match="not a VQ tokenizer folder"):
        cli_codes(args)
