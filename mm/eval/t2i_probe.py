"""Does a text-to-image model bind each word of a prompt? A likelihood probe, no sampling.

For shapes images it scores the image's true VQ codes under its true prompt and under every
prompt that differs in one attribute, and counts how often the true prompt has the highest
likelihood (teacher forcing, the model's calibrated code logits; for a model with a T2I plan, the
plan's too, and each part — every plan level and the codes — is also scored on its own):

- colour, shape, cell: one-object images, prompt "a {colour} {shape} in the {cell}";
  alternatives: the 5 other colours, 3 other shapes, 8 other cells (chance 1/6, 1/4, 1/9);
- count: images whose objects all share colour and shape, prompt "{n} {colour} {shape}s";
  alternatives: the other counts 1..4 (chance 1/4).

High probe accuracy with a low compositional score says the model has learned what a word means
but sampling does not realise it (exposure, guidance, temperature); a probe at chance says the
model has not learned the word. Used by ``scripts/t2i_probe.py`` and ``mm eval curves``.

``bookkeeping`` (sampling, not likelihood) asks whether the model knows what it has drawn: the
code rows above a one-object image's object (all background) are forced and the rest sampled —
how often is nothing drawn? — and the rows holding the object are forced — how often is a
second one drawn? The truth is 0 % for both (BENCHMARKS.md, session 17).
"""

from __future__ import annotations

from collections import Counter

import torch

from mm.data.shapes import CELLS, COLORS, SHAPES
from mm.data.shapes_text import noun_phrase
from mm.data.shapes_truth import is_shapes_meta
from mm.data.transforms import box_grid_span
from mm.errors import MMError

CHANCE = {"colour": 16.7, "shape": 25.0, "cell": 11.1, "count": 25.0}  # percent


def prompt_variants(objects: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """{attribute: (true prompt, [alternative prompts])} for the attributes an image can test."""
    out = {}
    if len(objects) == 1:
        o = objects[0]
        def one(color, shape, cell):
            return f"{noun_phrase(color, shape, 1)} in the {cell}"
        true = one(o["color"], o["shape"], o["cell"])
        out["colour"] = (true, [one(c, o["shape"], o["cell"]) for c in COLORS if c != o["color"]])
        out["shape"] = (true, [one(o["color"], s, o["cell"]) for s in SHAPES if s != o["shape"]])
        out["cell"] = (true, [one(o["color"], o["shape"], c) for c in CELLS if c != o["cell"]])
    if len({(o["color"], o["shape"]) for o in objects}) == 1:
        c, s, n = objects[0]["color"], objects[0]["shape"], len(objects)
        out["count"] = (noun_phrase(c, s, n), [noun_phrase(c, s, k) for k in range(1, 5) if k != n])
    return out


@torch.no_grad()
def log_likelihood_parts(model, tokenizer, codes: torch.Tensor, prompts: list[str],
                         plan: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{part: (P,)} for each prompt, codes (h, w) of one image: log p(codes | plan, prompt) as "codes" and,
    for a model with a T2I plan (the image's plan, (t, t) or (T,) for several sides), log p of each plan
    level given the levels before it as "plan{t}". Their sum is log p(plan, codes | prompt)."""
    ids, mask = tokenizer.encode(prompts, model.config.text_max_len)
    ids, mask = ids.to(codes.device), mask.to(codes.device)
    states, smask = model.encode_prompt(ids, mask)  # (P, L, D), (P, L)
    batch = codes.unsqueeze(0).expand(len(prompts), -1, -1)  # (P, h, w)
    plans = None if plan is None else plan.unsqueeze(0).expand(len(prompts), *plan.shape)  # (P, t, t) or (P, T)
    hidden = model.t2i_states(batch, states, smask, plans)  # (P, T+N, D)
    n_plan = model.code_embed.plan_len  # T, 0 without a plan
    logp = model.code_logits(hidden[:, n_plan:]).float().log_softmax(-1)  # (P, N, K)
    parts = {"codes": logp.gather(-1, batch.flatten(1).unsqueeze(-1)).squeeze(-1).sum(-1)}  # (P,)
    if n_plan:
        plan_logp = model.plan_logits(hidden[:, :n_plan]).float().log_softmax(-1)  # (P, T, V)
        token_logp = plan_logp.gather(-1, plans.flatten(1).unsqueeze(-1)).squeeze(-1)  # (P, T)
        sides = model.code_embed.plan
        for t, level in zip(sides, token_logp.split([t * t for t in sides], dim=1)):
            parts[f"plan{t}"] = level.sum(-1)
    return parts


def code_log_likelihood(model, tokenizer, codes: torch.Tensor, prompts: list[str],
                        plan: torch.Tensor | None = None) -> torch.Tensor:
    """log p(codes | prompt) for each prompt (P,), codes (h, w) of one image; for a model with a
    T2I plan, log p(plan, codes | prompt) with the image's plan ((t, t), or (T,) for several sides)."""
    return sum(log_likelihood_parts(model, tokenizer, codes, prompts, plan).values())


def probe_images(model, tokenizer, codes: torch.Tensor, metas: list[dict], hits: Counter, totals: Counter,
                 plans: torch.Tensor | None = None) -> None:
    """Add one image batch, codes (B, h, w) with their json metadata (and, for a model with a T2I plan,
    the images' plans (B, t, t)), to ``hits`` and ``totals``.
    A hit needs the true prompt strictly above every alternative: a model that ignores the text
    (all likelihoods equal) scores 0, not 100 %. A plan model's hits are also counted per part
    (key "attr@part", part = plan{t} or codes): which stage binds the word?"""
    for i, meta in enumerate(metas):
        if not is_shapes_meta(meta):  # other data sets (an ingested folder) have nothing to probe
            continue
        for attr, (true, others) in prompt_variants(meta["objects"]).items():
            parts = log_likelihood_parts(model, tokenizer, codes[i], [true, *others],
                                         None if plans is None else plans[i])
            scored = {"": sum(parts.values())} | ({f"@{k}": v for k, v in parts.items()} if len(parts) > 1 else {})
            for suffix, ll in scored.items():
                hits[attr + suffix] += int(bool(ll[0] > ll[1:].max()))
                totals[attr + suffix] += 1


def summary(hits: Counter, totals: Counter) -> dict:
    """{attr: {"accuracy", "images"}, "chance": ...} and, for a plan model, "by_part": {attr: {part: accuracy}}."""
    def pct(key):
        return round(100 * hits[key] / totals[key], 1)
    out = {a: {"accuracy": pct(a), "images": totals[a]} for a in sorted(totals) if "@" not in a}
    by_part: dict[str, dict[str, float]] = {}
    for key in sorted(k for k in totals if "@" in k):
        attr, part = key.split("@")
        by_part.setdefault(attr, {})[part] = pct(key)
    out["chance"] = dict(CHANCE)
    if by_part:
        out["by_part"] = by_part
    return out


@torch.no_grad()
def probe(model, tokenizer, vq, loader, max_images: int, device) -> dict:
    hits, totals, seen = Counter(), Counter(), 0
    for batch in loader:
        n = min(len(batch["meta"]), max_images - seen)
        images = batch["image"][:n].to(device)
        codes = vq.encode(images)  # (n, h, w)
        probe_images(model, tokenizer, codes, batch["meta"][:n], hits, totals, model.t2i_plan_tokens(images))
        seen += n
        if seen >= max_images:
            break
    return summary(hits, totals)


# ---------------------------------------------------------------------------------------------
# Bookkeeping: does the model know what it has already drawn?


def forced_rows(meta: dict, grid: tuple[int, int], image_size: int) -> dict[str, int]:
    """For a one-object shapes image: {"missing": r} when the object lies in the bottom third of the
    code rows (rows 0..r-1 hold no part of it), {"extra": r} when it lies in the top half (rows
    0..r-1 hold all of it). Empty for other images."""
    if not is_shapes_meta(meta) or len(meta["objects"]) != 1:
        return {}
    side = float(meta.get("image_size") or image_size)  # shapes images are square; boxes in their pixels
    r0, r1, _, _ = box_grid_span(meta["objects"][0]["bbox"], (side, side), grid)  # rows r0..r1-1
    h = grid[0]
    if r1 > r0 >= 2 * h // 3:
        return {"missing": r0}
    if r0 < r1 <= h // 2:
        return {"extra": r1}
    return {}


@torch.no_grad()
def continue_codes(model, codes: torch.Tensor, states, mask, rows: int, generator=None) -> torch.Tensor:
    """codes (B, h, w): keep the first ``rows`` code rows, sample the rest from the model (no
    guidance, temperature 1) given the text states; returns (B, h, w)."""
    if model.code_embed.plan:
        raise MMError("the bookkeeping probe forces code rows; a model with a T2I plan (model.t2i_plan) "
                      "decides the objects in its plan first: probe a model without one")
    b, h, w = codes.shape
    flat, keep = codes.flatten(1).clone(), rows * w
    logits, state = model.t2i_prefill(states, mask)
    for i in range(h * w):
        if i >= keep:
            probs = logits.float().softmax(-1)
            flat[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if i + 1 < h * w:
            logits = model.t2i_step(flat[:, i], state)
    return flat.view(b, h, w)


def object_counts(vq, codes: torch.Tensor) -> list[int]:
    """Objects the shapes detector finds in each decoded image of codes (B, h, w)."""
    from mm.data.detector import detect

    images = vq.decode(codes).float().clamp(-1, 1)  # (B, 3, H, W) in [-1, 1]
    pixels = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [len(detect(p)) for p in pixels]


@torch.no_grad()
def bookkeeping(model, tokenizer, vq, loader, max_images: int, device, samples: int = 8, seed: int = 0) -> dict:
    """missing: P(no object) after the empty rows above a bottom-third object are forced; extra:
    P(more than one object) after the rows holding a top-half object are forced. Prompt "a
    {colour} {shape}", ``samples`` continuations per image; the truth is 0 % for both."""
    grid, size = tuple(model.config.code_grid), model.config.image_size
    gen = torch.Generator(device=device).manual_seed(seed)
    counts, seen = {"missing": [], "extra": []}, 0
    for batch in loader:
        n = min(len(batch["meta"]), max_images - seen)
        codes = vq.encode(batch["image"][:n].to(device))  # (n, h, w)
        for i, meta in enumerate(batch["meta"][:n]):
            for kind, rows in forced_rows(meta, grid, size).items():
                o = meta["objects"][0]
                ids, mask = tokenizer.encode([noun_phrase(o["color"], o["shape"], 1)] * samples,
                                             model.config.text_max_len)
                states, smask = model.encode_prompt(ids.to(device), mask.to(device))
                out = continue_codes(model, codes[i:i + 1].expand(samples, -1, -1), states, smask, rows, gen)
                counts[kind] += object_counts(vq, out)
        seen += n
        if seen >= max_images:
            break
    out = {}
    for kind, bad in (("missing", lambda c: c == 0), ("extra", lambda c: c > 1)):
        c = counts[kind]
        out[kind] = {"wrong": round(100 * sum(map(bad, c)) / max(len(c), 1), 1), "one": round(
            100 * sum(x == 1 for x in c) / max(len(c), 1), 1), "samples": len(c)}
    return out
