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


def test_vq_configs_pin_the_layout_they_document():
    """configs/vq/real.yaml inherits from the shapes config; its photo layout must not drift when
    the shapes recipe changes (norm, stem, loss, schedule)."""
    shapes = load_config(ROOT / "configs/vq/shapes.yaml", [])
    assert (shapes.vq.norm, shapes.vq.patch_size, shapes.vq.recon_loss) == ("none", 2, "l2")
    assert shapes.vq.downsample == 4 and shapes.vq.codebook_size == 512  # the 8x8, 512 codes
    real = load_config(ROOT / "configs/vq/real.yaml", [])
    assert (real.vq.norm, real.vq.patch_size, real.vq.recon_loss) == ("group", 1, "l1")
    assert real.vq.code_dim == 8 and real.train.min_lr_ratio == 0.1


def readme_train_commands() -> list[list[str]]:
    """The `mm train CONFIG key=value ...` commands of README.md, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("mm train configs/"):
            commands.append(line.split()[2:])
    return commands


def test_readme_train_commands_give_valid_configs():
    """Every documented `mm train` command loads and builds its VQ layout (no training): a
    change to a base config once broke the README's 64 px VQ command silently."""
    commands = readme_train_commands()
    assert len(commands) >= 3
    for config, *overrides in commands:
        cfg = load_config(ROOT / config, overrides)
        VQTokenizerConfig.from_mm_config(cfg)
