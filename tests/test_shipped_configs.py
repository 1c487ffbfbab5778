"""Every shipped YAML config loads, and its VQ section describes a buildable tokenizer.

A change to a base config (e.g. configs/vq/shapes.yaml) must not silently break the configs that
inherit from it; this catches it without training anything.
"""

from pathlib import Path

import pytest

from mm.config import load_config
from mm.models.vq import VQTokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_loads_and_its_vq_is_valid(path):
    cfg = load_config(path, [])
    VQTokenizerConfig.from_mm_config(cfg)  # raises MMError on an inconsistent VQ layout
    if cfg.vq.config:  # a nested VQ stage: the config it names loads and is valid too
        nested = load_config(cfg.vq.config, [])
        VQTokenizerConfig.from_mm_config(nested)
