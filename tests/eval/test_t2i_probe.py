"""mm.eval.t2i_probe (scripts/t2i_probe.py, mm eval curves): the likelihood probe of what a
text-to-image model binds from its prompt.

A model that ignores the text scores 0 on every attribute (ties are not hits); a tiny model
with query positions (``cross_pos``) overfit on nine renders that differ only in their cell
scores 100 % on the cell (every alternative the probe scores is a prompt it trained on; without
cross_pos the same model's score swung between 11 and 100 % with fp32 rounding, session 14); the
prompt alternatives are the right ones for hand-made scenes.
"""

from collections import Counter
from pathlib import Path

import pytest
import torch

from mm.data.shapes import CELLS
from mm.eval import t2i_probe as probe
from mm.eval.t2i import rendered_references
from mm.models.vq import VQTokenizer

ROOT = Path(__file__).resolve().parents[2]


def obj(color, shape, cell):
    return {"color": color, "shape": shape, "cell": cell, "size": "large"}


def test_prompt_variants_of_hand_made_scenes():
    variants = probe.prompt_variants
    one = variants([obj("red", "circle", "center")])
    assert one["colour"][0] == one["cell"][0] == "a red circle in the center"
    assert len(one["colour"][1]) == 5 and len(one["shape"][1]) == 3 and len(one["cell"][1]) == 8
    assert "a red square in the center" in one["shape"][1] and "a red circle in the top left" in one["cell"][1]
    assert one["count"] == ("a red circle", ["two red circles", "three red circles", "four red circles"])
    two = variants([obj("blue", "square", "top left"), obj("blue", "square", "center")])
    assert set(two) == {"count"} and two["count"][0] == "two blue squares"
    assert variants([obj("blue", "square", "top left"), obj("red", "square", "center")]) == {}


@pytest.fixture(scope="module")
def cell_data(tmp_path_factory):
    """Codes of nine renders of a red circle, one per cell, a tokenizer and the VQ."""
    from mm.data.tokenizer import load_tokenizer, train_tokenizer

    vq = VQTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "vq48").eval()
    specs = [{"prompt": f"a red circle in the {c}", "objects": [{"color": "red", "shape": "circle", "count": 1,
                                                                  "cell": c}]} for c in CELLS]
    with torch.no_grad():
        codes = vq.encode(rendered_references(specs, 48, seed=0))  # (9, 12, 12)
    words = [s["prompt"] for s in specs]
    tok = load_tokenizer(train_tokenizer(words * 4, 300, tmp_path_factory.mktemp("tok")))
    metas = [{"objects": [{**obj("red", "circle", c), "bbox": [0, 0, 15, 15]}], "image_size": 48} for c in CELLS]
    return codes, metas, [s["prompt"] for s in specs], tok, vq


def tiny_model(tok, vq):
    from mm.models.presets import create_model

    torch.manual_seed(0)
    return create_model("debug", width=64, depth=2, heads=4, text_width=64, text_depth=1, text_heads=4,
                        vocab_size=len(tok), codebook_size=vq.cfg.codebook_size, code_grid=[12, 12],
                        image_size=48, patch_size=16, text_max_len=24, image_pos="both", cross_pos=True)


def cell_accuracy(model, tok, codes, metas) -> float:
    hits, totals = Counter(), Counter()
    model.eval()
    probe.probe_images(model, tok, codes, metas, hits, totals)
    return probe.summary(hits, totals)["cell"]["accuracy"]


def test_probe_is_zero_without_text_and_full_after_learning_the_cells(cell_data):
    from mm.tasks.objectives import t2i_loss

    codes, metas, prompts, tok, vq = cell_data
    model = tiny_model(tok, vq)
    for block in model.backbone.blocks:  # the codes can no longer see the text: every prompt ties
        torch.nn.init.zeros_(block.cross.out.weight)
        torch.nn.init.zeros_(block.cross.out.bias)
    assert cell_accuracy(model, tok, codes, metas) == 0.0

    model = tiny_model(tok, vq)
    ids, mask = tok.encode(prompts, max_len=24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):
        states, smask = model.encode_text(ids, mask)
        loss, _, _ = t2i_loss(model, codes, states, smask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cell_accuracy(model, tok, codes, metas) == 100.0
    hits, totals = Counter(), Counter()  # metadata that is not shapes' (an ingested folder): skipped
    probe.probe_images(model, tok, codes, [{"label": "cat"}, {}, None, {"objects": "x"}], hits, totals)
    assert not totals


def test_forced_rows_pick_bottom_third_and_top_half_objects():
    def meta(*boxes):
        return {"objects": [{**obj("red", "circle", "center"), "bbox": list(b)} for b in boxes], "image_size": 48}

    grid = (12, 12)  # 4 px per code row at 48 px
    assert probe.forced_rows(meta((0, 33, 15, 47)), grid, 48) == {"missing": 8}  # rows 8..11: 0..7 are empty
    assert probe.forced_rows(meta((16, 0, 31, 15)), grid, 48) == {"extra": 4}  # rows 0..3 hold all of it
    assert probe.forced_rows(meta((16, 16, 31, 31)), grid, 48) == {}  # the middle: neither
    assert probe.forced_rows(meta((0, 33, 15, 47), (16, 0, 31, 15)), grid, 48) == {}  # two objects
    assert probe.forced_rows({"label": "cat"}, grid, 48) == {}
    big = {"objects": [{**obj("red", "circle", "center"), "bbox": [0, 66, 30, 94]}], "image_size": 96}
    assert probe.forced_rows(big, grid, 48) == {"missing": 8}  # boxes in the stored 96-px image's pixels


def test_continue_codes_keeps_the_prefix_and_samples_the_rest_from_the_model(cell_data):
    codes, _, prompts, tok, vq = cell_data
    model = tiny_model(tok, vq).eval()
    ids, mask = tok.encode(prompts[:2], max_len=24)
    states, smask = model.encode_prompt(ids, mask)
    assert torch.equal(probe.continue_codes(model, codes[:2], states, smask, 12), codes[:2])  # all forced
    with torch.no_grad():
        model.t2i_head.bias.fill_(-50.0)
        model.t2i_head.bias[5] = 50.0  # the model is sure of code 5 everywhere
    out = probe.continue_codes(model, codes[:2], states, smask, 7, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :7], codes[:2, :7]) and bool((out[:, 7:] == 5).all())


def test_object_counts_read_the_vq_decodes(cell_data):
    codes, _, _, _, vq = cell_data
    assert probe.object_counts(vq, codes) == [1] * 9  # one red circle per render
    with torch.no_grad():
        blank = vq.encode(torch.zeros(1, 3, 48, 48))  # a plain grey image
    assert probe.object_counts(vq, blank) == [0]
    two = codes[:1].clone()
    two[:, 8:] = codes[8:9, 8:]  # the bottom-right render's lower rows pasted under the top-left one
    assert probe.object_counts(vq, two) == [2]
