"""VQ tokenizer: shapes, straight-through gradients, the β placement, restarts, EMA, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F

from mm.errors import MMError
from mm.models.vq import Quantizer, VQTokenizer, VQTokenizerConfig

MULTS = {4: [1, 2, 2], 8: [1, 1, 2, 2], 16: [1, 1, 1, 2, 2]}


def tiny(**kw) -> VQTokenizerConfig:
    base = {"codebook_size": 32, "code_dim": 4, "downsample": 4, "channels": 8, "channel_mult": [1, 2, 2],
            "layers_per_block": 1, "mid_attention": False, "restart_buffer": 64, "image_size": 16}
    return VQTokenizerConfig(**{**base, **kw})


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_encode_decode_shapes(factor):
    vq = VQTokenizer(tiny(downsample=factor, channel_mult=MULTS[factor], image_size=32)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 32 // factor, 32 // factor) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    assert vq.decode(codes).shape == (2, 3, 32, 32)
    recon, aux = vq(x)
    assert recon.shape == x.shape
    assert torch.equal(aux["indices"], codes)  # forward and encode pick the same codes
    # Non-square images work too (the factor divides both sides).
    assert vq.encode(torch.zeros(1, 3, 32, 64)).shape == (1, 32 // factor, 64 // factor)


@pytest.mark.parametrize("factor,patch,mult", [(4, 4, [1]), (4, 2, [1, 2]), (8, 4, [1, 2]), (16, 4, [1, 1, 2])])
def test_patch_stem_shapes_and_export(factor, patch, mult, tmp_path):
    vq = VQTokenizer(tiny(downsample=factor, patch_size=patch, channel_mult=mult, image_size=32)).eval()
    assert vq.encoder.conv_in.in_channels == 3 * patch * patch  # the stem feeds p x p pixel patches
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 32 // factor, 48 // factor)
    assert vq.decode(codes).shape == (2, 3, 32, 48)
    vq.save_pretrained(tmp_path / "vq")
    assert torch.equal(VQTokenizer.from_pretrained(tmp_path / "vq").decode(codes), vq.decode(codes))


def test_patch_stem_is_space_to_depth():
    """The encoder sees pixel (r, c) of patch (i, j) as channel (ch, r, c) at (i, j), and the
    decoder's channels go back to the same pixels: the stem loses nothing and mixes no patches."""
    vq = VQTokenizer(tiny(downsample=4, patch_size=4, channel_mult=[1], image_size=16)).eval()
    seen = {}
    vq.encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    vq.encode(x)
    stem = seen["x"]  # (B, 3·16, 2, 2)
    assert stem.shape == (2, 48, 2, 2)
    assert stem[1, 2 * 16 + 1 * 4 + 3, 1, 0] == x[1, 2, 4 + 1, 0 + 3]  # channel 2, row 1, col 3 of patch (1, 0)
    vq.decoder.forward = lambda z: stem  # decoder output = the stem input: the image comes back exactly
    assert torch.equal(vq._decode(torch.zeros(2, 4, 2, 2)), x)


def test_norm_none_removes_every_group_norm_and_round_trips(tmp_path):
    grouped = VQTokenizer(tiny(mid_attention=True))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules())
    vq = VQTokenizer(tiny(norm="none", mid_attention=True)).eval()
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in vq.modules())
    # The same weights otherwise: only the norms' affine parameters are gone.
    gone = set(grouped.state_dict()) - set(vq.state_dict())
    assert gone and all("norm" in k for k in gone) and not set(vq.state_dict()) - set(grouped.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _ = vq(x)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    vq.save_pretrained(tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["norm"] == "none"
    back = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert torch.equal(back(x)[0], recon)


def test_bad_config_and_inputs_are_one_line_errors():
    with pytest.raises(MMError, match="vq.norm is 'batch'; use group or none"):
        VQTokenizer(tiny(norm="batch"))
    with pytest.raises(MMError, match="patch_size"):
        VQTokenizer(tiny(downsample=4, patch_size=8, channel_mult=[1]))
    with pytest.raises(MMError, match="patch_size 2 needs 2"):
        VQTokenizer(tiny(downsample=4, patch_size=2, channel_mult=[1, 2, 2]))
    with pytest.raises(MMError, match="channel_mult"):
        VQTokenizer(tiny(downsample=8, channel_mult=[1, 2, 2]))
    with pytest.raises(MMError, match="downsample"):
        VQTokenizer(tiny(downsample=2))
    vq = VQTokenizer(tiny())
    with pytest.raises(MMError, match="divisible"):
        vq.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(MMError, match="codes must be"):
        vq.decode(torch.full((1, 2, 2), 32))


@pytest.mark.parametrize("kind", ["l2", "ema"])
def test_straight_through_gradient_reaches_the_encoder(kind):
    q = Quantizer(tiny(quantizer=kind)).train()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_st, idx, _aux = q(z_e)
    r = torch.randn_like(z_st)
    (z_st * r).sum().backward()
    # Reference: the gradient of the identity through the (l2: normalised) encoder output.
    z_ref = z_e.detach().clone().requires_grad_(True)
    prepared = F.normalize(z_ref, dim=1) if kind == "l2" else z_ref
    (prepared * r).sum().backward()
    assert torch.allclose(z_e.grad, z_ref.grad, atol=1e-6)
    assert z_e.grad.abs().sum() > 0
    # The forward value is the chosen code, not the encoder output.
    codes = q.codebook()[idx]  # (B, h, w, d)
    assert torch.allclose(z_st, codes.permute(0, 3, 1, 2), atol=1e-6)


def test_gradients_flow_to_encoder_through_the_whole_model():
    vq = VQTokenizer(tiny()).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _ = vq(x)
    F.l1_loss(recon, x).backward()  # reconstruction only: the encoder learns via straight-through
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vq.decoder.conv_out.weight.grad.abs().sum() > 0


def test_vq_loss_golden_value_and_beta_on_the_commitment_term():
    cfg = tiny(codebook_size=2, code_dim=2, beta=0.25)
    q = Quantizer(cfg).train()
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z_e = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).requires_grad_(True)  # normalised: (0.6, 0.8)
    _, idx, aux = q(z_e)
    assert idx.item() == 1  # (0, 1) has the larger cosine
    # Hand values: z - q = (0.6, -0.2); mean square = (0.36 + 0.04) / 2 = 0.2 for both terms.
    assert aux["codebook_loss"].item() == pytest.approx(0.2, abs=1e-6)
    assert aux["commit_loss"].item() == pytest.approx(0.2, abs=1e-6)
    assert aux["vq_loss"].item() == pytest.approx(0.2 + 0.25 * 0.2, abs=1e-6)


def _grads(beta: float):
    q = Quantizer(tiny(codebook_size=8, code_dim=3, beta=beta)).train()
    with torch.no_grad():
        q.embedding.copy_(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    z_e = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    _, _, aux = q(z_e)
    aux["vq_loss"].backward()
    return z_e.grad.clone(), q.embedding.grad.clone()


def test_beta_scales_only_the_encoder_gradient():
    # diffusers' VQModel weights the codebook term by β; ours weights the encoder (commitment).
    enc_a, code_a = _grads(0.25)
    enc_b, code_b = _grads(1.0)
    assert torch.allclose(code_a, code_b)  # the codebook gradient ignores β
    assert torch.allclose(enc_b * 0.25, enc_a, atol=1e-7)  # the encoder gradient is linear in β
    assert enc_a.abs().sum() > 0 and code_a.abs().sum() > 0


@pytest.mark.parametrize("kind", ["l2", "ema"])
def test_dead_codes_are_restarted_from_recent_encoder_outputs(kind):
    q = Quantizer(tiny(codebook_size=16, code_dim=4, quantizer=kind, dead_code_steps=3)).train()
    direction = torch.tensor([1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():  # codes 0-3 near the data, 4-15 on the opposite side: never chosen
        q.embedding[:4] = direction + 0.3 * torch.randn(4, 4)
        q.embedding[4:] = -direction * 5
        if kind == "ema":
            q.embed_sum.copy_(q.embedding)

    def data():
        return (direction.view(1, 4, 1, 1) * 3 + 0.5 * torch.randn(8, 4, 4, 4))

    restarted = []
    for step in range(3):
        q(data())
        restarted.append(q.after_step(step))
    assert restarted[:2] == [0, 0] and restarted[2] >= 12  # 4-15 (and any of 0-3 left idle)
    assert (q.steps_unused[4:] == 0).all()  # their counters start again
    assert (q.embedding[4:] @ direction > 0).all()  # moved next to the data
    # The restarted codes now sit among the encoder outputs, so they get used.
    used = torch.zeros(16, dtype=torch.bool)
    for _ in range(3):
        _, idx, _ = q(data())
        used[idx.flatten()] = True
    assert used[4:].sum() >= 6


def test_no_restarts_when_switched_off():
    q = Quantizer(tiny(restart_dead_codes=False, dead_code_steps=1)).train()
    before = q.embedding.detach().clone()
    for step in range(3):
        q(torch.randn(2, 4, 2, 2))
        assert q.after_step(step) == 0
    assert torch.equal(before, q.embedding)


def test_eval_forward_changes_no_state():
    q = Quantizer(tiny(quantizer="ema")).eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())


def test_ema_codebook_moves_towards_its_inputs():
    q = Quantizer(tiny(codebook_size=2, code_dim=2, quantizer="ema", ema_decay=0.5)).train()
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        q.embed_sum.copy_(q.embedding)
    target = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1).expand(4, 2, 2, 2)
    for _ in range(20):
        q(target)
    assert torch.allclose(q.embedding[0], torch.tensor([2.0, 1.0]), atol=1e-3)


@pytest.mark.parametrize("kind", ["l2", "ema"])
def test_save_load_is_exact(tmp_path, kind):
    vq = VQTokenizer(tiny(quantizer=kind))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vq.train()
    vq(x)  # move the EMA codebook and fill the restart buffers
    vq.after_step(0)
    vq.eval()
    vq.save_pretrained(tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["quantizer"] == kind
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert loaded.cfg == vq.cfg
    for k, v in vq.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    codes = vq.encode(x)
    assert torch.equal(codes, loaded.encode(x))
    assert torch.equal(vq.decode(codes), loaded.decode(codes))
    assert torch.equal(vq(x)[0], loaded(x)[0])


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(MMError, match="not a VQ tokenizer folder"):
        VQTokenizer.from_pretrained(tmp_path / "nothing")
