"""Text for the shapes data set: captions, VQA questions with annotator answers, held-out prompts.

Every caption is true of its image: noun phrases count whole (colour, shape) groups ("two red
circles" means exactly two), a size is named only when the whole group shares it, and a
position or relation is stated only when it holds for every object it names. The held-out
text-to-image prompts use the same grammar but are never used as a training caption.
"""

from __future__ import annotations

import functools

import numpy as np

from mm.data.shapes import CELLS, COLORS, SHAPES, relation_holds

NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
                7: "seven", 8: "eight", 9: "nine"}
# Every phrase is true of its cell; "in the {cell}" (unambiguous) is always among them.
CELL_PHRASES = {
    "top left": ["in the top left", "in the top left corner", "in the upper left"],
    "top center": ["at the top", "in the top center", "at the top in the middle"],
    "top right": ["in the top right", "in the top right corner", "in the upper right"],
    "middle left": ["on the left", "in the middle left", "on the left side"],
    "center": ["in the center", "in the middle"],
    "middle right": ["on the right", "in the middle right", "on the right side"],
    "bottom left": ["in the bottom left", "in the bottom left corner", "in the lower left"],
    "bottom center": ["at the bottom", "in the bottom center", "at the bottom in the middle"],
    "bottom right": ["in the bottom right", "in the bottom right corner", "in the lower right"],
}
RELATION_WORDS = {"above": "above", "below": "below", "left of": "to the left of",
                  "right of": "to the right of"}


# ---------------------------------------------------------------------------------------------
# Noun phrases


def groups_of(objects: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(colour, shape, members) for each colour-shape pair, in order of first appearance."""
    out: dict[tuple[str, str], list[dict]] = {}
    for o in objects:
        out.setdefault((o["color"], o["shape"]), []).append(o)
    return [(c, s, members) for (c, s), members in out.items()]


def noun_phrase(color: str, shape: str, count: int, size: str | None = None, digits: bool = False) -> str:
    """'a red circle', 'two small blue squares', '3 green diamonds'."""
    adj = f"{size} {color}" if size else color
    if count == 1:
        return f"a {adj} {shape}"
    return f"{count if digits else NUMBER_WORDS[count]} {adj} {shape}s"


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def position_phrase(cells: list[str], rng) -> str | None:
    """A phrase true of every cell in ``cells``: the cell itself, or a shared row/column side."""
    if len(set(cells)) == 1:
        return str(rng.choice(CELL_PHRASES[cells[0]]))
    rows = {CELLS.index(c) // 3 for c in cells}
    cols = {CELLS.index(c) % 3 for c in cells}
    options = []
    if cols == {0}:
        options.append("on the left")
    if cols == {2}:
        options.append("on the right")
    if rows == {0}:
        options.append("at the top")
    if rows == {2}:
        options.append("at the bottom")
    return str(rng.choice(options)) if options else None


def _group_np(rng, color, shape, members, digits=False) -> str:
    sizes = {m["size"] for m in members}
    size = sizes.pop() if len(sizes) == 1 and rng.random() < 0.5 else None
    return noun_phrase(color, shape, len(members), size, digits)


# ---------------------------------------------------------------------------------------------
# Captions


def _background_word(background: dict) -> str:
    if background["texture"] == "stripes":
        return "striped"
    if background["texture"] == "checker":
        return "checkered"
    level = background["level"]
    return "dark" if level < 90 else "light" if level > 170 else "gray"


def _caption_listing(rng, objects, background) -> str:
    groups = groups_of(objects)
    parts = [_group_np(rng, c, s, m, digits=rng.random() < 0.1) for c, s, m in groups]
    text = join(parts)
    n = len(objects)
    kind = int(rng.integers(6))
    if kind == 1:
        return f"there {'is' if n == 1 and len(groups) == 1 else 'are'} {text}"
    if kind == 2:
        return f"{text} on a {_background_word(background)} background"
    if kind == 3:
        return f"a picture of {text}"
    if kind == 4:
        return f"an image with {text}"
    if kind == 5 and n > 1:
        return f"{NUMBER_WORDS[n]} shapes: {text}"
    return text


def _caption_positions(rng, objects, background) -> str | None:
    parts = []
    for c, s, m in groups_of(objects):
        where = position_phrase([o["cell"] for o in m], rng)
        if where:
            parts.append(f"{_group_np(rng, c, s, m)} {where}")
    return join(parts) if parts else None


def _caption_relation(rng, objects, background) -> str | None:
    groups = groups_of(objects)
    pairs = []
    for i, (ca, sa, ma) in enumerate(groups):
        for j, (cb, sb, mb) in enumerate(groups):
            for rel in RELATION_WORDS:
                if i != j and relation_holds(rel, [o["cell"] for o in ma], [o["cell"] for o in mb]):
                    pairs.append((i, j, rel))
    if not pairs:
        return None
    i, j, rel = pairs[int(rng.integers(len(pairs)))]
    a, b = groups[i], groups[j]
    return f"{_group_np(rng, *a)} {RELATION_WORDS[rel]} {_group_np(rng, *b)}"


def make_captions(rng: np.random.Generator, objects: list[dict], background: dict, num: int = 4) -> list[str]:
    """Up to ``num`` distinct true captions from varied templates; the first is the main one.

    Held-out prompt strings are skipped, so a text-to-image prompt is never a training caption.
    """
    held = held_out_prompt_strings()
    makers = [_caption_listing, _caption_positions, _caption_relation, _caption_listing]
    out: list[str] = []
    for _ in range(4 * num):
        maker = makers[int(rng.integers(len(makers)))]
        text = maker(rng, objects, background)
        if text and text not in held and text not in out:
            out.append(text)
        if len(out) == num:
            break
    if not out:  # every template hit a held-out prompt: a fully explicit listing never is one
        out.append("an image with " + join([noun_phrase(c, s, len(m)) for c, s, m in groups_of(objects)])
                   + f" on a {_background_word(background)} background")
    return out


# ---------------------------------------------------------------------------------------------
# VQA: questions and ten annotator answers each


def _variants(kind: str, value: str) -> list[str]:
    """Other ways annotators write a correct answer."""
    if kind == "number":
        n = int(value)
        return [NUMBER_WORDS[n]] + ([f"{n} shapes"] if n else ["none"])
    if kind == "color":
        return [f"the {value} one", f"{value} color", f"bright {value}"]
    if kind == "shape":
        return [f"a {value}", f"{value} shape"] + (["round"] if value == "circle" else [])
    if kind == "cell":
        words = value.split()
        alt = [f"in the {value}"]
        if len(words) == 2 and words[1] in ("left", "right") and words[0] in ("top", "bottom"):
            alt += [f"{'upper' if words[0] == 'top' else 'lower'} {words[1]}", f"{value} corner"]
        if value == "center":
            alt += ["middle"]
        return alt
    return ["yes"] if value == "yes" else ["no"]


def _wrong(kind: str, value: str, rng) -> str:
    if kind == "number":
        pool = [str(int(value) + 1)] + ([str(int(value) - 1)] if value != "0" else [])
    elif kind == "yesno":
        pool = ["no" if value == "yes" else "yes"]
    else:
        pool = [v for v in {"color": list(COLORS), "shape": SHAPES, "cell": CELLS}[kind] if v != value]
    return str(pool[int(rng.integers(len(pool)))])


def annotator_answers(kind: str, value: str, rng) -> list[str]:
    """Ten answers: the canonical one at least five times, a few paraphrases, rarely wrong."""
    n_wrong = min(2, int(rng.binomial(10, 0.06)))
    n_var = 0 if kind == "yesno" else min(3, int(rng.binomial(10 - n_wrong, 0.2)))
    variants = _variants(kind, value)
    answers = [value] * (10 - n_wrong - n_var)
    answers += [variants[int(rng.integers(len(variants)))] for _ in range(n_var)]
    answers += [_wrong(kind, value, rng) for _ in range(n_wrong)]
    return [answers[i] for i in rng.permutation(10)]


def _qa(question: str, qtype: str, kind: str, value, rng) -> dict:
    answer_type = {"number": "number", "yesno": "yes/no"}.get(kind, "other")
    value = str(value)
    return {"question": question, "answers": annotator_answers(kind, value, rng), "answer": value,
            "answer_type": answer_type, "question_type": qtype}


def _question_pool(rng, objects: list[dict]) -> list[tuple]:
    """Candidate (question, question_type, kind, value) tuples, each true of the image."""
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    pairs = [(o["color"], o["shape"]) for o in objects]
    color, shape = list(COLORS)[rng.integers(6)], SHAPES[rng.integers(4)]
    obj = objects[int(rng.integers(len(objects)))]
    pool = [
        (str(rng.choice(["How many shapes are there?", "How many objects are in the image?"])),
         "how many", "number", len(objects)),
        (f"How many {color} shapes are there?", "how many", "number", colors.count(color)),
        (f"How many {shape}s are there?", "how many", "number", shapes.count(shape)),
        (f"What color is the shape in the {obj['cell']}?", "what color is the", "color", obj["color"]),
        (f"What shape is in the {obj['cell']}?", "what shape is", "shape", obj["shape"]),
        (f"Is there a {color} {shape}?", "is there a", "yesno", "yes" if (color, shape) in pairs else "no"),
        (f"Is there a {obj['color']} {obj['shape']}?", "is there a", "yesno", "yes"),
        (f"Are there any {color} shapes?", "are there any", "yesno", "yes" if color in colors else "no"),
        (f"Is there a {shape} in the image?", "is there a", "yesno", "yes" if shape in shapes else "no"),
    ]
    if shapes.count(obj["shape"]) == 1:
        pool.append((f"What color is the {obj['shape']}?", "what color is the", "color", obj["color"]))
    if colors.count(obj["color"]) == 1:
        pool.append((f"What shape is the {obj['color']} object?", "what shape is the", "shape", obj["shape"]))
    if pairs.count((obj["color"], obj["shape"])) == 1:
        pool.append((f"Where is the {obj['color']} {obj['shape']}?", "where is the", "cell", obj["cell"]))
    unique = [o for o in objects if pairs.count((o["color"], o["shape"])) == 1]
    if len(unique) >= 2:
        a, b = (unique[i] for i in rng.choice(len(unique), 2, replace=False))
        rel = str(rng.choice(list(RELATION_WORDS)))
        truth = relation_holds(rel, [a["cell"]], [b["cell"]])
        pool.append((f"Is the {a['color']} {a['shape']} {RELATION_WORDS[rel]} the {b['color']} {b['shape']}?",
                     "is the", "yesno", "yes" if truth else "no"))
    return pool


def make_qa(rng: np.random.Generator, objects: list[dict], num: int = 6) -> list[dict]:
    """``num`` questions of mixed types (colour, shape, count, position, yes/no, existence)."""
    pool = _question_pool(rng, objects)
    seen, out = set(), []
    for i in rng.permutation(len(pool)):
        q = pool[int(i)]
        if q[0] not in seen:
            seen.add(q[0])
            out.append(_qa(*q, rng))
        if len(out) == num:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Held-out text-to-image prompts


def _spec(prompt: str, tag: str, groups: list[tuple], relation=None) -> dict:
    return {"prompt": prompt, "tag": tag,
            "objects": [{"color": c, "shape": s, "count": n, "cell": cell} for c, s, n, cell in groups],
            "relation": relation}


@functools.lru_cache(maxsize=1)
def _held_out() -> tuple[dict, ...]:
    rng = np.random.default_rng(20240601)  # fixed forever: the evaluation set must not move
    colors, out, seen = list(COLORS), [], set()

    def pick():
        return colors[int(rng.integers(6))], SHAPES[int(rng.integers(4))]

    def add(spec):
        if spec["prompt"] not in seen:
            seen.add(spec["prompt"])
            out.append(spec)

    for tag, target in (("single", 12), ("two", 12), ("count", 12), ("position", 12), ("relation", 12)):
        start = len(out)
        while len(out) - start < target:
            (c1, s1), (c2, s2) = pick(), pick()
            if tag == "single":
                add(_spec(noun_phrase(c1, s1, 1), tag, [(c1, s1, 1, None)]))
            elif tag == "two" and (c1, s1) != (c2, s2):
                add(_spec(f"{noun_phrase(c1, s1, 1)} and {noun_phrase(c2, s2, 1)}", tag,
                          [(c1, s1, 1, None), (c2, s2, 1, None)]))
            elif tag == "count":
                n = int(rng.integers(2, 5))
                add(_spec(noun_phrase(c1, s1, n), tag, [(c1, s1, n, None)]))
            elif tag == "position":
                cell = CELLS[int(rng.integers(9))]
                add(_spec(f"{noun_phrase(c1, s1, 1)} in the {cell}", tag, [(c1, s1, 1, cell)]))
            elif tag == "relation" and (c1, s1) != (c2, s2):
                rel = str(rng.choice(list(RELATION_WORDS)))
                add(_spec(f"{noun_phrase(c1, s1, 1)} {RELATION_WORDS[rel]} {noun_phrase(c2, s2, 1)}", tag,
                          [(c1, s1, 1, None), (c2, s2, 1, None)], {"a": 0, "b": 1, "relation": rel}))
    return tuple(out)


def held_out_prompts() -> list[dict]:
    """The fixed text-to-image evaluation prompts with their structured specs (60: 12 each of
    single object, two objects, counting, absolute position, relative position)."""
    import copy

    return copy.deepcopy(list(_held_out()))


@functools.lru_cache(maxsize=1)
def held_out_prompt_strings() -> frozenset[str]:
    return frozenset(p["prompt"] for p in _held_out())
