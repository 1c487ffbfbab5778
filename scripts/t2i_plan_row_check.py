"""Does a coarse plan before the codes help T2I bind count and layout? A two-arm check.

Both arms train the same T2I-only model (the tiny preset, 8-px patches, learned + RoPE image
positions, bf16 autocast, batch 32, AdamW 2e-3 with warm-up and cosine decay, CFG dropout 0.1) on
the codes and complete captions of a demo's training shards, and score 240 held-out prompt images
(mm.eval.t2i.compositional_scores) at guidance 1.5 and 3:

- ``base``: the 12x12 VQ codes, as mm trains them;
- ``plan``: one extra first row — the VQ codes of the image average-pooled 4x (a 3x3 grid: one
  code per shapes cell, padded with code 0 to the row width) — so the model decides a coarse
  layout in 9 tokens before it draws the 144 fine codes. The plan row is dropped before decoding.

BENCHMARKS.md session 13: 1,500 steps, 20k images, 6.5 / 7.5 wall-minutes on 2 cores; at g = 1.5
the plan row scores 10.0 % vs 4.6 % (and 9.0 vs 7.1 % on 480 more images), colour and shape
+10 points, position still at chance. Usage (after ``mm demo --long --out D``):

    python scripts/t2i_plan_row_check.py base|plan STEPS N_SHARDS OUT_PREFIX [D]
"""

import glob
import io
import json
import math
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm.data.shapes_truth import names_every_object
from mm.data.tokenizer import load_tokenizer
from mm.eval.t2i import compositional_scores, eval_prompts
from mm.generation.pipeline import to_pil
from mm.generation.sampler import SamplingParams, sample_codes, seeds_tensor
from mm.models.presets import create_model
from mm.models.vq import VQTokenizer
from mm.tasks.objectives import cfg_drop, t2i_loss

PAD = 0  # fills the plan row to the code grid's width


def load(demo: str, n_shards: int, plan: bool, vq) -> tuple[torch.Tensor, list[list[str]]]:
    """Codes (N, 12 or 13, 12) and each image's complete captions from the demo's code shards."""
    codes, caps, imgs = [], [], []
    for tar in sorted(glob.glob(f"{demo}/data/codes/train/*.tar"))[:n_shards]:
        items = {}
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = t.extractfile(m).read()
        for it in items.values():
            meta = json.loads(it["json"])
            caps.append([c for c in meta["captions"] if names_every_object(c, meta)] or meta["captions"][:1])
            codes.append(np.load(io.BytesIO(it["codes.npy"])))
            if plan:
                imgs.append(np.asarray(Image.open(io.BytesIO(it["png"])).convert("RGB")))
    codes = torch.from_numpy(np.stack(codes)).long()  # (N, 12, 12)
    if plan:
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 48, 48)
        with torch.no_grad():
            coarse = torch.cat([vq.encode(F.avg_pool2d(x[i:i + 512], 4)) for i in range(0, len(x), 512)])  # (N, 3, 3)
        pad = torch.full((len(x), codes.shape[2] - coarse[0].numel()), PAD)
        codes = torch.cat([torch.cat([coarse.flatten(1), pad], 1)[:, None], codes], 1)  # (N, 13, 12)
    return codes, caps


def train(model, tok, codes, caps, steps: int) -> None:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95))
    g, start = torch.Generator().manual_seed(0), time.time()
    model.train()
    for s in range(steps):
        frac = (s + 1) / 100 if s < 100 else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 100) / max(1, steps - 100)))
        for group in opt.param_groups:
            group["lr"] = 2e-3 * frac
        idx = torch.randint(0, len(codes), (32,), generator=g)
        texts = [caps[i][int(torch.randint(0, len(caps[i]), (1,), generator=g))] for i in idx.tolist()]
        ids, mask = tok.encode(texts, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states, smask, _ = cfg_drop(model, *model.encode_prompt(ids, mask), 0.1)
            loss, metrics, _ = t2i_loss(model, codes[idx], states, smask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 250 == 0 or s == steps - 1:
            print(f"step {s} loss {loss.item():.3f} acc {metrics['t2i_acc']:.3f} {time.time() - start:.0f} s", flush=True)


@torch.no_grad()
def score(model, tok, vq, plan: bool, guidance: float, n: int = 240) -> dict:
    specs, out = eval_prompts(n), []
    for i in range(0, n, 60):
        ids, mask = tok.encode([s["prompt"] for s in specs[i:i + 60]], 32)
        text = model.encode_prompt(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(sample_codes(model, text, seeds_tensor(list(range(i, i + 60)), 60), SamplingParams(guidance)))
    codes = torch.cat(out)[:, 1:] if plan else torch.cat(out)  # drop the plan row
    return compositional_scores(to_pil(vq.decode(codes).float().clamp(-1, 1)), specs)


def main(arm: str, steps: int, n_shards: int, out: str, demo: str = "/tmp/exp/demo_long") -> None:
    if arm not in ("base", "plan"):
        sys.exit(f"arm must be base or plan, got {arm!r}")
    torch.manual_seed(0)
    vq = VQTokenizer.from_pretrained(f"{demo}/vq/final").eval()
    tok = load_tokenizer(f"{demo}/pretrain/tokenizer")
    codes, caps = load(demo, n_shards, arm == "plan", vq)
    print(arm, "images", len(codes), "grid", tuple(codes.shape[1:]), flush=True)
    model = create_model("tiny", vocab_size=len(tok), codebook_size=vq.cfg.codebook_size,
                         code_grid=list(codes.shape[1:]), image_size=48, patch_size=8, image_pos="both",
                         init="torch", text_max_len=32)
    train(model, tok, codes, caps, steps)
    model.eval()
    torch.save(model.state_dict(), out + ".pt")
    result = {g: score(model, tok, vq, arm == "plan", g) for g in (1.5, 3.0)}
    for g, r in result.items():
        print(f"guidance {g}: overall {100 * r['overall']:.1f} %", {k: round(100 * v, 1) for k, v in r.items()
                                                                  if isinstance(v, float)}, flush=True)
    json.dump({"arm": arm, "steps": steps, "images": len(codes), "scores": result}, open(out + ".json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
