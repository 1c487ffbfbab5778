"""Every preset builds with the parameter count it promises; overrides and ModelConfig apply."""

import pytest
import torch

from mm.config import ModelConfig
from mm.errors import MMError
from mm.models.presets import TARGET_PARAMS, create_model, list_models, model_from_config, preset_config


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_with_its_parameter_count(name):
    with torch.device("meta"):  # no memory or init time for the large ones
        model = create_model(name)
    n = model.num_params()
    assert abs(n - TARGET_PARAMS[name]) <= 0.15 * TARGET_PARAMS[name], f"{name}: {n / 1e6:.1f}M"


def test_list_models_and_sizes_grow():
    assert list_models()[:5] == ["debug", "tiny", "small", "base", "large"]
    assert sorted(TARGET_PARAMS.values()) == [TARGET_PARAMS[n] for n in list_models()]


def test_tiny_runs_on_its_demo_shapes():
    model = create_model("tiny").eval()
    images = torch.randn(2, 3, 32, 32)
    codes = torch.randint(0, 512, (2, 8, 8))
    ids = torch.randint(0, 1024, (2, 10))
    with torch.no_grad():
        ts, tm = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
        assert model.t2i_logits(codes, ts, tm).shape == (2, 64, 512)
        assert model.image_embedding(images).shape == (2, 128)


def test_overrides_and_errors():
    cfg = preset_config("debug", width=48, heads=4)
    assert (cfg.width, cfg.heads, cfg.depth) == (48, 4, 2)
    with pytest.raises(MMError, match="did you mean 'tiny'"):
        create_model("tiyn")
    with pytest.raises(MMError, match="did you mean 'width'"):
        create_model("debug", widht=64)


def test_model_from_config_applies_model_section_overrides():
    mc = ModelConfig(preset="debug", width=64, depth=3, heads=4, decoder_depth=2, text_depth=2, mlp="swiglu",
                     norm="rmsnorm", image_pos="learned")
    model = model_from_config(mc, vocab_size=300, codebook_size=40, code_grid=(2, 4), image_size=24)
    c = model.config
    assert (c.width, c.depth, c.heads, c.decoder_depth, c.text_depth) == (64, 3, 4, 2, 2)
    assert (c.vocab_size, c.codebook_size, c.code_grid, c.image_size) == (300, 40, [2, 4], 24)
    assert (c.mlp, c.norm, c.image_pos) == ("swiglu", "rmsnorm", "learned")
    assert len(model.backbone.blocks) == 3 and model.decoder.tok.num_embeddings == 300
    out = model.t2i_logits(torch.randint(0, 40, (1, 2, 4)), None, None)
    assert out.shape == (1, 8, 40)
