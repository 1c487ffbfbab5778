"""Can the T2I model learn position words at all? A synthetic check outside the shapes captions.

Trains a small T2I model (128 wide, 4 blocks, no code weights) on N one-object renders captioned
only "a {colour} {shape} in the {cell}" (codes from the fixture VQ, tests/fixtures/vq48) and
prints the word-binding probe (mm.eval.t2i_probe) on 64 training and 64 unseen renders four
times during training. BENCHMARKS.md session 12: the cell probe on unseen renders goes 9 / 19 /
33 / 25 % at 200 / 400 / 600 / 800 steps (N = 2048, ~4 CPU-minutes). Session 13: with CROSS_POS = 1
(``model.cross_pos``: the learned positions on every cross-attention query) it goes 9 / 22 / 67 /
92 %. Usage:

    python scripts/t2i_position_synthetic.py [N_RENDERS] [STEPS] [WIDTH] [CROSS_POS] [TEXTURE] [WEIGHT] [FUTURE]

TEXTURE = 1 draws each render on a background of the shapes data (plain or textured, as its
scenes are) instead of the plain background of ``render_spec``; WEIGHT (with TEXTURE = 1) trains with the
object code weights of ``objectives.t2i_object_weight``; FUTURE > 0 adds the future-codes loss of
``objectives.t2i_future`` with that weight (3 x 3 regions, 24 positions per batch).
"""

import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mm.data.shapes import CELLS, COLORS, SHAPES, SIZES, make_object, render_scene, sample_background
from mm.data.tokenizer import load_tokenizer, train_tokenizer
from mm.eval import t2i_probe as P
from mm.eval.t2i import rendered_references
from mm.generation.pipeline import to_tensor
from mm.models.presets import create_model
from mm.models.vq import VQTokenizer
from mm.tasks.objectives import object_code_weights, object_weights, t2i_loss

ROOT = Path(__file__).resolve().parents[1]


def textured(specs: list[dict], seed: int) -> torch.Tensor:
    """The specs drawn as the shapes data draws its scenes: on its plain or textured backgrounds.
    Each spec's drawn object (with its bbox) is kept in ``spec["drawn"]``."""
    images = []
    for i, spec in enumerate(specs):
        rng = np.random.default_rng([seed + i, 7])
        o = spec["objects"][0]
        spec["drawn"] = make_object(rng, o["shape"], o["color"], SIZES[rng.integers(2)], o["cell"], 48)
        images.append(render_scene([spec["drawn"]], sample_background(rng), 48))
    return to_tensor(images, 48)


def make(vq, rng: random.Random, n: int, seed: int, texture: bool) -> tuple[list[dict], torch.Tensor]:
    """n random one-object specs with their prompts, and the VQ codes of their renders (n, 12, 12)."""
    specs = []
    for _ in range(n):
        c, s, cell = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(CELLS)
        specs.append({"prompt": f"a {c} {s} in the {cell}",
                      "objects": [{"color": c, "shape": s, "count": 1, "cell": cell}]})
    draw = textured if texture else (lambda sp, sd: rendered_references(sp, 48, seed=sd))
    with torch.no_grad():
        codes = torch.cat([vq.encode(draw(specs[i:i + 64], seed + i)) for i in range(0, n, 64)])
    return specs, codes


def probe(model, tok, specs: list[dict], codes: torch.Tensor) -> dict:
    hits, totals = Counter(), Counter()
    metas = [{"objects": [{**s["objects"][0], "size": "large"}]} for s in specs]
    model.eval()
    P.probe_images(model, tok, codes, metas, hits, totals)
    model.train()
    return {k: v["accuracy"] for k, v in P.summary(hits, totals).items() if k in P.CHANCE}


def main(n: int = 2048, steps: int = 800, width: int = 128, cross_pos: int = 0, texture: int = 0,
         weight: float = 1.0, future: float = 0.0) -> None:
    if weight != 1.0 and not texture:
        raise SystemExit("WEIGHT needs TEXTURE = 1 (the object boxes come from those renders)")
    torch.manual_seed(0)
    rng = random.Random(0)
    vq = VQTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "vq48").eval()
    train, train_codes = make(vq, rng, n, 0, bool(texture))
    test, test_codes = make(vq, rng, 64, 100000, bool(texture))
    tok = load_tokenizer(train_tokenizer([s["prompt"] for s in train], 300, tempfile.mkdtemp()))
    model = create_model("debug", width=width, depth=4, heads=4, text_width=width, text_depth=2, text_heads=4,
                         vocab_size=len(tok), codebook_size=vq.cfg.codebook_size, code_grid=[12, 12],
                         image_size=48, patch_size=16, text_max_len=24, image_pos="both",
                         cross_pos=bool(cross_pos), t2i_code_weights=weight != 1.0)
    if future:
        model.set_t2i_future(3)
    if weight != 1.0:
        boxes = object_weights([{"objects": [s["drawn"]]} for s in train], (12, 12), 48, 2.0)  # (n, 144)
        model.set_t2i_code_weights(object_code_weights(train_codes.flatten(1), boxes > 1, vq.cfg.codebook_size, weight))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (32,))
        ids, mask = tok.encode([train[i]["prompt"] for i in idx], max_len=24)
        states, smask = model.encode_prompt(ids, mask)
        loss, metrics, _ = t2i_loss(model, train_codes[idx], states, smask, future > 0, 24)
        if future:
            loss = loss + future * metrics["t2i_future"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0:
            print(f"step {step} loss {loss.item():.3f} train {probe(model, tok, train[:64], train_codes[:64])} "
                  f"unseen {probe(model, tok, test, test_codes)} {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:6]], *[float(a) for a in sys.argv[6:8]])
