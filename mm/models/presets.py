"""Named model sizes as data (open_clip style): ``create_model(name, **overrides)``, ``list_models()``.

Each preset is a dict of MMConfig fields. The vocabulary, codebook, grid and image size in a
preset are its reference setting (used for the parameter counts below); training code passes
the real ones from the tokenizer and VQ tokenizer through ``model_from_config``.

    name   width depth heads  text (w/d/h)   decoder  reference setting              params
    debug     32     2     2   32/1/2         1        vocab 256, K 32, 4×4, 16 px    ~0.09M (tests)
    tiny     192     4     6   128/2/4        2        vocab 1024, K 512, 8×8, 32 px  ~4.6M (demo)
    small    384    10     6   256/4/4        2        vocab 8192, K 4096, 16×16      ~40M
    base     640    12    10   512/4/8        2        vocab 32000, K 8192, 16×16     ~153M
    large   1024    14    16   768/6/12       2        vocab 32000, K 16384, 16×16    ~405M

Most parameters sit in the backbone (16·D² per block: self-attention, cross-attention, MLP).
"""

from __future__ import annotations

import dataclasses
import difflib

from mm.errors import MMError
from mm.models.model import MMConfig, MMModel

PRESETS: dict[str, dict] = {
    "debug": {"width": 32, "depth": 2, "heads": 2, "text_width": 32, "text_depth": 1, "text_heads": 2,
              "decoder_depth": 1, "embed_dim": 32, "vocab_size": 256, "codebook_size": 32, "code_grid": [4, 4],
              "image_size": 16, "patch_size": 4, "text_max_len": 16},
    "tiny": {"width": 192, "depth": 4, "heads": 6, "text_width": 128, "text_depth": 2, "text_heads": 4,
             "decoder_depth": 2, "embed_dim": 128, "vocab_size": 1024, "codebook_size": 512, "code_grid": [8, 8],
             "image_size": 32, "patch_size": 4, "text_max_len": 32},
    "small": {"width": 384, "depth": 10, "heads": 6, "text_width": 256, "text_depth": 4, "text_heads": 4,
              "decoder_depth": 2, "embed_dim": 256, "vocab_size": 8192, "codebook_size": 4096,
              "code_grid": [16, 16], "image_size": 128, "patch_size": 8, "text_max_len": 64},
    "base": {"width": 640, "depth": 12, "heads": 10, "text_width": 512, "text_depth": 4, "text_heads": 8,
             "decoder_depth": 2, "embed_dim": 512, "vocab_size": 32000, "codebook_size": 8192,
             "code_grid": [16, 16], "image_size": 256, "patch_size": 16, "text_max_len": 77},
    "large": {"width": 1024, "depth": 14, "heads": 16, "text_width": 768, "text_depth": 6, "text_heads": 12,
              "decoder_depth": 2, "embed_dim": 768, "vocab_size": 32000, "codebook_size": 16384,
              "code_grid": [16, 16], "image_size": 256, "patch_size": 16, "text_max_len": 77},
}

# Approximate parameter counts of each preset at its reference setting (checked by a test, ±15%).
TARGET_PARAMS = {"debug": 0.09e6, "tiny": 4.6e6, "small": 40e6, "base": 150e6, "large": 400e6}


def list_models() -> list[str]:
    return list(PRESETS)


def preset_config(name: str, **overrides) -> MMConfig:
    """The MMConfig of a preset with some fields replaced; unknown names/fields are one-line errors."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(PRESETS)}"
        raise MMError(f"unknown model preset '{name}'; {hint}")
    fields = {f.name for f in dataclasses.fields(MMConfig)}
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            raise MMError(f"unknown model field '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    values = {**PRESETS[name], **overrides}
    values["code_grid"] = list(values["code_grid"])
    return MMConfig(**values)


def create_model(name: str, **overrides) -> MMModel:
    """Build a freshly initialised MMModel from a preset, e.g. ``create_model("tiny", vocab_size=2000)``."""
    return MMModel(preset_config(name, **overrides))


def model_from_config(model_cfg, vocab_size: int, codebook_size: int, code_grid: tuple[int, int] | list[int],
                      image_size: int, text_max_len: int | None = None) -> MMModel:
    """Build the model of a run from ``Config.model`` (mm.config.ModelConfig) and the data/VQ facts.

    Fields of ModelConfig left as None keep the preset's value. ``text_encoder`` is "builtin" or a
    local Hugging Face folder (then the tokenizer must be that encoder's and ``vocab_size`` its size).
    """
    over = {"vocab_size": vocab_size, "codebook_size": codebook_size, "code_grid": list(code_grid),
            "image_size": image_size, "text_encoder": model_cfg.text_encoder,
            "freeze_text_encoder": model_cfg.freeze_text_encoder, "dropout": model_cfg.dropout}
    if text_max_len is not None:
        over["text_max_len"] = text_max_len
    for name in ("width", "depth", "heads", "mlp_ratio", "patch_size", "text_width", "text_depth",
                 "decoder_depth"):
        value = getattr(model_cfg, name, None)
        if value is not None:
            over[name] = value
    for name in ("text_heads", "mlp", "norm", "image_pos", "embed_dim", "init", "itm_pool",
                 "vqa_pool", "patch_stem", "vqa_fusion", "cross_pos", "cross_pos_patches", "t2i_cross", "t2i_mlp",
                 "t2i_attn", "t2i_text", "t2i_plan"):  # optional newer fields
        value = getattr(model_cfg, name, None)
        if value not in (None, ""):
            over[name] = value
    if isinstance(over.get("t2i_plan"), list) and len(over["t2i_plan"]) == 1:
        over["t2i_plan"] = over["t2i_plan"][0]  # one side is saved as the plain integer
    return create_model(model_cfg.preset, **over)
