"""MMModel: cached sampling equals full forward, causality, null context, save/load, gradients."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mm.errors import MMError
from mm.models.model import MMModel
from mm.models.presets import create_model

B = 3


@pytest.fixture
def model():
    return create_model("debug", code_grid=[3, 4]).eval()


def text(model, lengths=(5, 3, 1)):
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), max(lengths)))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


@pytest.mark.parametrize("kind,pos,cross", [("static", "rope2d", False), ("dynamic", "rope2d", False),
                                            ("static", "learned", False), ("static", "both", False),
                                            ("static", "both", True), ("dynamic", "learned", True)])
def test_t2i_with_kv_cache_equals_full_forward(kind, pos, cross):
    model = create_model("debug", code_grid=[3, 4], image_pos=pos, cross_pos=cross).eval()
    ids, mask = text(model)
    codes = torch.randint(0, model.config.codebook_size, (B, 3, 4))
    with torch.no_grad():
        ts, tm = model.encode_text(ids, mask)
        full = model.t2i_logits(codes, ts, tm)  # (B, 12, K)
        logits, state = model.t2i_prefill(ts, tm, cache=kind)
        steps = [logits]
        for n in range(11):
            steps.append(model.t2i_step(codes.flatten(1)[:, n], state))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_t2i_cfg_batch_with_padded_null_context_equals_separate_runs(model):
    ids, mask = text(model)
    codes = torch.randint(0, model.config.codebook_size, (B, 3, 4))
    with torch.no_grad():
        ts, tm = model.encode_text(ids, mask)
        cond = model.t2i_logits(codes, ts, tm)
        uncond = model.t2i_logits(codes, None, None)
        ns, nm = model.null_context(B, length=ts.shape[1])  # padded to the text length
        both = model.t2i_logits(torch.cat([codes, codes]), torch.cat([ts, ns]), torch.cat([tm, nm]))
    torch.testing.assert_close(both, torch.cat([cond, uncond]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond)  # the text matters


def test_t2i_is_causal_in_raster_order(model):
    codes = torch.randint(0, model.config.codebook_size, (1, 3, 4))
    changed = codes.clone()
    changed[0, 1, 2] = (changed[0, 1, 2] + 1) % model.config.codebook_size  # code 6
    with torch.no_grad():
        a, b = model.t2i_logits(codes, None, None), model.t2i_logits(changed, None, None)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # rows 0..6 cannot see code 6
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_caption_decoder_incremental_equals_full(model, kind):
    images = torch.randn(B, 3, 16, 16)
    ids = torch.randint(0, model.config.vocab_size, (B, 9))
    with torch.no_grad():
        states = model.image_states(images)
        full = model.caption_logits(states, ids)
        logits, state = model.caption_prefill(states, ids[:, :2], cache=kind)  # a 2-token prompt
        steps = [logits]
        for t in range(2, 9):
            steps.append(model.caption_step(ids[:, t], state))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 1:], atol=1e-5, rtol=1e-5)


def test_caption_right_padding_does_not_change_real_positions(model):
    states = torch.randn(2, 16, model.config.width)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    other = ids.clone()
    other[:, 5:] = 0  # different pad content after position 4
    a, b = model.caption_logits(states, ids), model.caption_logits(states, other)
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_itc_embeddings_use_the_null_context_and_are_normalised(model):
    images = torch.randn(B, 3, 16, 16)
    ids, mask = text(model)
    with torch.no_grad():
        img = model.image_embedding(images)
        ns, nm = model.null_context(B)
        torch.testing.assert_close(img, model.pool_image(model.image_states(images, ns, nm)))
        txt = model.text_embedding(ids, mask)
        fused = model.fuse(images, *model.encode_text(ids, mask))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))
    assert model.itm_logits(fused).shape == (B, 2)
    assert not torch.allclose(fused, model.image_states(images))  # text changes the fused states
    assert 1 < model.itc_logit_scale().item() <= 100


def test_every_parameter_gets_a_gradient_from_all_objectives(model):
    model.train()
    model.set_vqa_answers(7)
    images = torch.randn(B, 3, 16, 16)
    ids, mask = text(model)
    codes = torch.randint(0, model.config.codebook_size, (B, 3, 4))
    ts, tm = model.encode_text(ids, mask)
    img_states = model.image_states(images)
    sims = model.pool_image(img_states) @ model.pool_text(ts, tm).T * model.itc_logit_scale()
    fused = model.fuse(images, ts, tm)
    loss = (F.cross_entropy(sims, torch.arange(B)) + model.itm_logits(fused).sum() + model.vqa_logits(fused).sum()
            + model.caption_logits(img_states, ids).logsumexp(-1).mean()
            + model.t2i_logits(codes, ts, tm).logsumexp(-1).mean())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # an unused parameter would also break DDP


def test_save_and_load_are_exact(model, tmp_path):
    model.set_vqa_answers(5)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vqa_answers"] == 5 and cfg["code_grid"] == [3, 4]
    loaded = MMModel.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval().vqa_logits(model.image_states(images)),
                           loaded.vqa_logits(loaded.image_states(images)))
    with pytest.raises(MMError, match="not a saved mm model"):
        MMModel.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("cross", [False, True])
def test_grad_checkpointing_gives_the_same_gradients(cross):
    model = create_model("debug", code_grid=[3, 4], image_pos="both", cross_pos=cross)
    codes = torch.randint(0, model.config.codebook_size, (2, 3, 4))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.train().set_grad_checkpointing(on)
        model.t2i_logits(codes, None, None).square().mean().backward()
        grads.append((model.backbone.blocks[0].attn.qkv.weight.grad.clone(), model.code_embed.pos.table.table.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_are_one_line_errors(model):
    with pytest.raises(MMError, match=r"\(1, 3, 32, 32\)"):
        model.image_states(torch.randn(1, 3, 32, 32))
    with pytest.raises(MMError, match=r"\(1, 4, 4\)"):
        model.t2i_logits(torch.zeros(1, 4, 4, dtype=torch.long), None, None)
    with pytest.raises(MMError, match="set_vqa_answers"):
        model.vqa_logits(torch.randn(1, 16, model.config.width))


def test_init_choice_gpt_vs_torch():
    import math

    from mm.errors import MMError
    from mm.models.presets import create_model

    torch.manual_seed(0)
    gpt = create_model("tiny")
    torch.manual_seed(0)
    tor = create_model("tiny", init="torch")
    lin_gpt = [m for m in gpt.backbone.modules() if isinstance(m, torch.nn.Linear)]
    lin_tor = [m for m in tor.backbone.modules() if isinstance(m, torch.nn.Linear)]
    for a, b in zip(lin_gpt, lin_tor):
        fan_in = a.weight.shape[1]
        assert float(a.weight.std()) < 0.021  # N(0, 0.02), residual outputs smaller still
        assert abs(float(b.weight.std()) - 1 / math.sqrt(3 * fan_in)) < 0.1 / math.sqrt(3 * fan_in)
    emb = tor.code_embed.emb.weight
    assert abs(float(emb.std()) - 0.02) < 0.002  # embeddings stay N(0, 0.02) under both
    with pytest.raises(MMError, match="init"):
        create_model("debug", init="xavier")


def test_itm_and_vqa_pools_save_load_and_train(tmp_path):
    from mm.errors import MMError
    from mm.models.model import MMModel
    from mm.models.presets import create_model

    torch.manual_seed(0)
    model = create_model("debug", itm_pool="attn", vqa_pool="max")
    model.set_vqa_answers(5)
    assert any(n.startswith("itm_pool.") for n, _ in model.named_parameters())
    assert not any(n.startswith("vqa_pool.") for n, _ in model.named_parameters())  # max has no weights
    fused = torch.randn(2, 16, model.config.width, requires_grad=True)
    model.itm_logits(fused).sum().backward()
    assert model.itm_pool.probe.grad is not None and model.itm_pool.probe.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    back = MMModel.from_pretrained(tmp_path / "m")
    assert (back.config.itm_pool, back.config.vqa_pool) == ("attn", "max")
    torch.testing.assert_close(back.itm_logits(fused.detach()), model.itm_logits(fused.detach()))
    torch.testing.assert_close(back.vqa_logits(fused.detach()), model.vqa_logits(fused.detach()))
    with pytest.raises(MMError, match="vqa_pool"):
        create_model("debug", vqa_pool="cls")


def test_conv_patch_stem_gives_the_linear_stems_grid_and_loads_back(tmp_path):
    from mm.errors import MMError
    from mm.models.model import MMModel
    from mm.models.presets import create_model

    torch.manual_seed(0)
    model = create_model("debug", image_size=32, patch_size=8, patch_stem="conv")
    linear = create_model("debug", image_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    tokens, _, _ = model.patch_embed(x)
    assert tokens.shape == linear.patch_embed(x)[0].shape == (2, 16, model.config.width)
    # token n is patch n in row-major order: changing the pixels of patch (1, 2) moves token 6 most
    y = x.clone()
    y[:, :, 8:16, 16:24] += 1.0
    moved = (model.patch_embed(y)[0] - tokens).norm(dim=-1)[0]  # (16,)
    assert int(moved.argmax()) == 1 * 4 + 2
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(MMModel.from_pretrained(tmp_path / "m").image_states(x), model.image_states(x))
    with pytest.raises(MMError, match="power-of-two"):
        create_model("debug", patch_size=6, image_size=36, patch_stem="conv")
    with pytest.raises(MMError, match="patch_stem"):
        create_model("debug", patch_stem="resnet")


def test_late_vqa_fusion_reads_the_question_directly(tmp_path):
    from mm.errors import MMError
    from mm.models.model import MMModel
    from mm.models.presets import create_model

    torch.manual_seed(0)
    model = create_model("debug", vqa_fusion="late")
    model.set_vqa_answers(4)
    fused = torch.randn(2, 16, model.config.width)
    text, mask = torch.randn(2, 5, model.config.width), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    out = model.vqa_logits(fused, text, mask)
    v, q = fused.mean(1), torch.stack([text[0, :3].mean(0), text[1].mean(0)])
    torch.testing.assert_close(out, model.vqa_head(torch.cat([v, q, v * q], -1)))
    other = text.clone()
    other[0, 3:] = 100.0  # padding is not read
    torch.testing.assert_close(model.vqa_logits(fused, other, mask)[0], out[0])
    with pytest.raises(MMError, match="reads the question"):
        model.vqa_logits(fused)
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(MMModel.from_pretrained(tmp_path / "m").vqa_logits(fused, text, mask), out)


def test_reader_vqa_fusion_lets_the_question_tokens_look_at_the_patches(tmp_path):
    from mm.models.model import MMModel
    from mm.models.presets import create_model
    from mm.models.text_encoder import masked_mean

    torch.manual_seed(0)
    model = create_model("debug", vqa_fusion="reader").eval()
    model.set_vqa_answers(4)
    assert len(model.vqa_reader) == model.config.decoder_depth
    fused = torch.randn(2, 16, model.config.width)
    text, mask = torch.randn(2, 5, model.config.width), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    out = model.vqa_logits(fused, text, mask)
    r = text  # naive reference: the blocks one by one, question padding masked in self-attention
    for blk in model.vqa_reader:
        r = blk(r, fused, key_mask=mask)
    torch.testing.assert_close(out, model.vqa_head(torch.cat([fused.mean(1), masked_mean(r, mask)], -1)))
    other = text.clone()
    other[0, 3:] = 100.0  # padding is neither read nor pooled
    torch.testing.assert_close(model.vqa_logits(fused, other, mask)[0], out[0])
    moved = fused.clone()
    moved[:, 3] += 5.0  # one patch changes: the question tokens see it through cross-attention
    reread = text
    for blk in model.vqa_reader:
        reread = blk(reread, moved, key_mask=mask)
    assert (masked_mean(reread, mask) - masked_mean(r, mask)).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(MMModel.from_pretrained(tmp_path / "m").vqa_logits(fused, text, mask), out)
    plain = create_model("debug")  # a pretrained model without a reader gets one at VQA fine-tuning
    plain.config.vqa_fusion = "reader"
    plain.set_vqa_answers(3)
    assert plain.vqa_logits(fused, text, mask).shape == (2, 3)


def test_film_vqa_fusion_scales_each_patch_by_the_question(tmp_path):
    from mm.models.model import MMModel
    from mm.models.presets import create_model

    torch.manual_seed(0)
    model = create_model("debug", vqa_fusion="film").eval()
    model.set_vqa_answers(4)
    d = model.config.width
    fused = torch.randn(2, 16, d)
    text, mask = torch.randn(2, 5, d), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    out = model.vqa_logits(fused, text, mask)
    # naive reference, patch by patch
    rows = []
    for b, n in enumerate((3, 5)):
        q = text[b, :n].mean(0)
        gb = model.vqa_reader.weight @ q + model.vqa_reader.bias  # (2D,)
        gamma, beta = gb[:d], gb[d:]
        f = torch.stack([fused[b, i] * (1 + gamma) + beta for i in range(16)])
        rows.append(torch.cat([f.mean(0), f.max(0).values]))
    torch.testing.assert_close(out, model.vqa_head(torch.stack(rows)))
    other = text.clone()
    other[0, 3:] = 100.0  # padding is not read
    torch.testing.assert_close(model.vqa_logits(fused, other, mask)[0], out[0])
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(MMModel.from_pretrained(tmp_path / "m").vqa_logits(fused, text, mask), out)
    plain = create_model("debug")  # a pretrained model gets the FiLM projection at VQA fine-tuning
    plain.config.vqa_fusion = "film"
    plain.set_vqa_answers(3)
    assert plain.vqa_logits(fused, text, mask).shape == (2, 3)


def test_frozen_builtin_text_encoder_trains_only_its_projection(tmp_path):
    from mm.models.model import MMModel
    from mm.models.presets import create_model

    torch.manual_seed(0)
    model = create_model("debug", freeze_text_encoder=True)
    enc = model.text_encoder
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all(not n.startswith("proj.") for n in frozen)
    assert all(p.requires_grad for p in enc.proj.parameters())
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    states, _ = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
    states.square().mean().backward()
    assert all(p.grad is None for n, p in enc.named_parameters() if n in frozen)
    assert enc.proj.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")  # the flag is in config.json: a reload is frozen too
    again = MMModel.from_pretrained(tmp_path / "m")
    assert {n for n, p in again.text_encoder.named_parameters() if not p.requires_grad} == frozen
    assert all(p.requires_grad for p in create_model("debug").text_encoder.parameters())


def test_image_pos_both_adds_the_learned_table_and_keeps_rope():
    from mm.models.backbone import GridPositions

    torch.manual_seed(0)
    x, cells = torch.randn(2, 6, 16), torch.arange(6)
    rope_only, learned, both = (GridPositions(k, 16, 4, 2, 3) for k in ("rope2d", "learned", "both"))
    both.table.load_state_dict(learned.table.state_dict())
    y_rope, tables, _ = rope_only(x, cells)
    y_learned, none, _ = learned(x, cells)
    y_both, tables_both, _ = both(x, cells)
    assert torch.equal(y_rope, x) and none is None
    torch.testing.assert_close(y_both, y_learned)  # the same additive table
    assert not torch.allclose(y_both, x)
    for a, b in zip(tables, tables_both):  # and the same rotation tables
        torch.testing.assert_close(a, b)
    model = create_model("debug", image_pos="both")
    size = model.config.image_size
    assert model.image_states(torch.rand(1, 3, size, size)).shape[1] == model.patch_embed.grid ** 2


def test_cross_pos_adds_unit_positions_to_the_cross_attention_queries_only():
    """A naive block-by-block reference: cross(norm2(x) + LN(table)) with keys/values from the text."""
    torch.manual_seed(0)
    model = create_model("debug", code_grid=[3, 4], image_pos="both", cross_pos=True).eval()
    plain = create_model("debug", code_grid=[3, 4], image_pos="both").eval()
    plain.load_state_dict(model.state_dict())  # same weights: cross_pos adds no parameters
    ids, mask = text(model)
    codes = torch.randint(0, model.config.codebook_size, (B, 3, 4))
    with torch.no_grad():
        ts, tm = model.encode_text(ids, mask)
        got = model.t2i_logits(codes, ts, tm)
        cells = torch.arange(12)
        x = model.code_embed.emb(model.code_embed.inputs(codes)) + model.code_embed.pos.table(cells)
        rope = model.code_embed.pos.rope.full(cells)
        table = model.code_embed.pos.table(cells)
        qpos = (table - table.mean(-1, keepdim=True)) / (table.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        for blk in model.backbone.blocks:
            x = x + blk.attn(blk.norm1(x), causal=True, rope=rope)
            x = x + blk.cross(blk.norm2(x) + qpos, ts, key_mask=tm)
            x = x + blk.mlp(blk.norm3(x))
        want = model.t2i_head(model.backbone.norm(x))
        size = model.config.image_size
        images = torch.rand(2, 3, size, size)
        # patches get them too (with text: over the one-state null context attention has one key)
        assert not torch.allclose(model.image_states(images, ts[:2], tm[:2]), plain.image_states(images, ts[:2], tm[:2]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain.t2i_logits(codes, ts, tm))


def test_cross_pos_for_the_codes_only_leaves_the_patches_plain():
    from mm.models.classifier import ClassifierConfig

    torch.manual_seed(0)
    both = create_model("debug", code_grid=[3, 4], image_pos="both", cross_pos=True).eval()
    codes_only = create_model("debug", code_grid=[3, 4], image_pos="both", cross_pos=True, cross_pos_patches=False)
    plain = create_model("debug", code_grid=[3, 4], image_pos="both").eval()
    codes_only.load_state_dict(both.state_dict())
    plain.load_state_dict(both.state_dict())
    codes_only.eval()
    ids, mask = text(both)
    codes = torch.randint(0, both.config.codebook_size, (B, 3, 4))
    images = torch.rand(2, 3, both.config.image_size, both.config.image_size)
    with torch.no_grad():
        ts, tm = both.encode_text(ids, mask)
        torch.testing.assert_close(codes_only.t2i_logits(codes, ts, tm), both.t2i_logits(codes, ts, tm))
        torch.testing.assert_close(codes_only.image_states(images, ts[:2], tm[:2]), plain.image_states(images, ts[:2], tm[:2]))
    config = ClassifierConfig.from_mm_config(dataclasses.asdict(codes_only.config), ["a", "b"])
    assert not config.cross_pos and ClassifierConfig.from_mm_config(dataclasses.asdict(both.config), ["a"]).cross_pos


def test_cross_pos_needs_a_learned_table_and_round_trips(tmp_path):
    with pytest.raises(MMError, match="image_pos to learned or both"):
        create_model("debug", cross_pos=True)  # the preset's rope2d has no table
    model = create_model("debug", image_pos="learned", cross_pos=True).eval()
    model.save_pretrained(tmp_path)
    again = MMModel.from_pretrained(tmp_path)
    assert again.config.cross_pos and again.patch_embed.pos.cross
    codes = torch.randint(0, model.config.codebook_size, (1, *model.config.code_grid))
    with torch.no_grad():
        torch.testing.assert_close(again.t2i_logits(codes, None, None), model.t2i_logits(codes, None, None))


# option -> (first module, second module, its output weight, a weight to check gradients on)
T2I_OWN = {"t2i_cross": ("cross", "cross_b", "out", "q"), "t2i_mlp": ("mlp", "mlp_b", "proj", "fc"),
           "t2i_attn": ("attn", "attn_b", "out", "qkv")}


@pytest.mark.parametrize("option", list(T2I_OWN))
def test_t2i_own_weights_serve_only_the_code_stream(option, tmp_path):
    first, second, out, probe_w = T2I_OWN[option]
    torch.manual_seed(0)
    model = create_model("debug", code_grid=[3, 4], **{option: True}).eval()
    key = f"backbone.blocks.0.{second}.{probe_w}.weight"
    assert key in model.state_dict() and key not in create_model("debug").state_dict()
    ids, mask = text(model)
    codes = torch.randint(0, model.config.codebook_size, (B, 3, 4))
    images = torch.randn(B, 3, 16, 16)

    def outputs(m):
        with torch.no_grad():
            ts, tm = m.encode_text(ids, mask)
            return m.t2i_logits(codes, ts, tm), m.fuse(images, ts, tm)

    t2i, fused = outputs(model)
    # Routing: the T2I stream uses only the second module, understanding only the first.
    for name, changes_t2i in ((first, False), (second, True)):
        probe = MMModel(model.config)
        probe.load_state_dict(model.state_dict())
        for blk in probe.backbone.blocks:
            torch.nn.init.zeros_(getattr(getattr(blk, name), out).weight)
        t2i_p, fused_p = outputs(probe.eval())
        assert torch.allclose(t2i_p, t2i) != changes_t2i
        assert torch.allclose(fused_p, fused) == changes_t2i
    # Cached decoding uses the same weights as the full forward.
    with torch.no_grad():
        ts, tm = model.encode_text(ids, mask)
        logits, state = model.t2i_prefill(ts, tm, cache="static")
        steps = [logits] + [model.t2i_step(codes.flatten(1)[:, n], state) for n in range(11)]
    torch.testing.assert_close(torch.stack(steps, 1), t2i, atol=1e-5, rtol=1e-5)
    # Gradient checkpointing routes the same way; save/load round trip.
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.train().set_grad_checkpointing(on)
        model.t2i_logits(codes, None, None).square().mean().backward()
        blk = model.backbone.blocks[0]
        grads.append(getattr(getattr(blk, second), probe_w).weight.grad.clone())
        assert getattr(getattr(blk, first), probe_w).weight.grad is None
    torch.testing.assert_close(*grads)
    model.save_pretrained(tmp_path)
    loaded = MMModel.from_pretrained(tmp_path)
    assert getattr(loaded.config, option) and all(torch.equal(a, b) for a, b in
                                                 zip(model.state_dict().values(), loaded.state_dict().values()))


def test_t2i_text_gives_the_prompt_an_encoder_of_its_own(tmp_path):
    torch.manual_seed(0)
    plain = create_model("debug").eval()
    ids, mask = text(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_prompt(ids, mask), plain.encode_text(ids, mask))
    model = create_model("debug", t2i_text=True).eval()
    assert plain.t2i_text_encoder is None and "t2i_text_encoder.tok.weight" in model.state_dict()
    with torch.no_grad():
        assert not torch.allclose(model.encode_prompt(ids, mask)[0], model.encode_text(ids, mask)[0])
        model.t2i_text_encoder.load_state_dict(model.text_encoder.state_dict())  # same weights, same states
        torch.testing.assert_close(model.encode_prompt(ids, mask), model.encode_text(ids, mask))
        torch.nn.init.normal_(model.t2i_text_encoder.proj.weight)
    model.set_grad_checkpointing(True)
    assert model.t2i_text_encoder.grad_checkpointing and model.text_encoder.grad_checkpointing
    model.save_pretrained(tmp_path)
    loaded = MMModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_prompt(ids, mask), model.encode_prompt(ids, mask))
