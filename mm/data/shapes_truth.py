"""Is a shapes caption true of an image? A parser of the caption grammar and a truth function.

The grammar is the one ``mm.data.shapes_text`` writes (captions and held-out prompts)::

    caption    := [prefix] body [" on a " BACKGROUND " background"]
    prefix     := "there is " | "there are " | "a picture of " | "an image with " | COUNT " shapes: "
    body       := listing | placed | relation
    listing    := np ("," | " and ") np ...               "a red circle and two blue squares"
    placed     := np " " WHERE ("," | " and ") ...        "a red circle in the center and ..."
    relation   := np " " REL " " np                       "a red circle above two blue squares"
    np         := ("a" | COUNT) [SIZE] COLOR SHAPE["s"]   "a small red circle", "3 green diamonds"

Semantics (what the generator means, so every caption it writes is true of its own image):

- A noun phrase is a claim about a whole (colour, shape) group: "two red circles" means the
  image has exactly two red circles; "two small red circles" also that both are small.
- A listing names EVERY group of the image (``_caption_listing`` lists them all): it is false
  of an image with an extra group.
- A placed caption claims only the groups it names (``_caption_positions`` leaves out groups
  without a position phrase): each named group exists as stated and is where it says; other
  groups may exist. A relation caption likewise claims only its two groups and that every
  object of the first stands in the relation to every object of the second.
- Position phrases mean what ``position_phrase`` means: for a single object, a phrase of its cell
  in ``CELL_PHRASES`` (so "a red circle on the left" is the middle-left cell, "at the top" the top
  center); for a group of several, "on the left/right" = all in that column, "at the top/bottom"
  = all in that row.
- "N shapes:" claims N objects in all; a background word is ``_background_word`` of the image.

Text that is not in the grammar makes :func:`parse_caption` (and so :func:`caption_true_of`)
raise ``ValueError`` naming the text: a typo must not silently count as a false caption.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import numpy as np

from mm.data.shapes import CELLS, COLORS, SHAPES, SIZES, cell_of, relation_holds
from mm.data.shapes_text import CELL_PHRASES, NUMBER_WORDS, RELATION_WORDS, _background_word

BACKGROUND_WORDS = ("dark", "light", "gray", "striped", "checkered")
# Phrases a group of several objects can have: the row or column they all share.
SIDE_PHRASES = {"on the left": ("col", 0), "on the right": ("col", 2), "at the top": ("row", 0),
                "at the bottom": ("row", 2)}
# Longest first, so "in the top left corner" is tried before "in the top left".
WHERE_PHRASES = sorted({p for ps in CELL_PHRASES.values() for p in ps}, key=len, reverse=True)
COUNT_WORDS = {"a": 1, **{w: n for n, w in NUMBER_WORDS.items() if n > 0},
               **{str(n): n for n in range(1, 10)}}
TOTAL_WORDS = [w for w in COUNT_WORDS if w != "a"]  # "three shapes:", never "a shapes:"
REL_OF_WORDS = {words: rel for rel, words in RELATION_WORDS.items()}

_NP = re.compile(rf"^(?P<count>{'|'.join(COUNT_WORDS)}) (?:(?P<size>{'|'.join(SIZES)}) )?"
                 rf"(?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)})(?P<plural>s?)$")
_PREFIX = re.compile(rf"^(?:there is|there are|a picture of|an image with|(?P<total>{'|'.join(TOTAL_WORDS)})"
                     r" shapes:) (?P<rest>.+)$")
_SUFFIX = re.compile(rf"^(?P<rest>.+) on a (?P<background>{'|'.join(BACKGROUND_WORDS)}) background$")
_RELATION = re.compile(rf"^(?P<a>.+?) (?P<rel>{'|'.join(REL_OF_WORDS)}) (?P<b>.+)$")


@dataclass(frozen=True)
class Phrase:
    """One noun phrase: a claim about the whole (colour, shape) group, maybe with a place."""

    color: str
    shape: str
    count: int
    size: str | None = None
    where: str | None = None


@dataclass(frozen=True)
class Caption:
    kind: str  # "listing" | "placed" | "relation"
    phrases: tuple[Phrase, ...]
    relation: str | None = None  # a key of RELATION_WORDS ("left of"), for kind "relation"
    total: int | None = None  # from "N shapes:"
    background: str | None = None


# ---------------------------------------------------------------------------------------------
# Parsing


def _fail(text: str, why: str):
    raise ValueError(f"not a shapes caption: {text!r} ({why})")


def _noun_phrase(text: str, whole: str) -> Phrase:
    m = _NP.match(text)
    if not m:
        _fail(whole, f"{text!r} is not a noun phrase like 'two small red circles'")
    count = COUNT_WORDS[m["count"]]
    if (count > 1) != bool(m["plural"]):
        _fail(whole, f"{text!r}: count and plural disagree")
    return Phrase(m["color"], m["shape"], count, m["size"])


def _placed(part: str, whole: str) -> Phrase | None:
    """'a red circle in the center' -> Phrase with ``where``; None when no phrase ends it."""
    for where in WHERE_PHRASES:
        if part.endswith(" " + where) and _NP.match(part[: -len(where) - 1]):
            return replace(_noun_phrase(part[: -len(where) - 1], whole), where=where)
    return None


@functools.lru_cache(maxsize=65536)
def parse_caption(text: str) -> Caption:
    """The structure of a shapes caption (lower-cased, spaces and a final period ignored)."""
    whole = text
    text = " ".join(text.lower().split()).rstrip(".")
    total = background = None
    if m := _PREFIX.match(text):
        text, total = m["rest"], COUNT_WORDS[m["total"]] if m["total"] else None
    if m := _SUFFIX.match(text):
        text, background = m["rest"], m["background"]
    parts = re.split(r",? and |, ", text)
    if not all(parts):
        _fail(whole, "an empty part between commas or 'and'")
    if len(parts) == 1 and (m := _RELATION.match(parts[0])):
        a, b = _noun_phrase(m["a"], whole), _noun_phrase(m["b"], whole)
        return Caption("relation", (a, b), REL_OF_WORDS[m["rel"]], total, background)
    if all(_NP.match(p) for p in parts):
        return Caption("listing", tuple(_noun_phrase(p, whole) for p in parts), None, total, background)
    placed = [_placed(p, whole) for p in parts]
    if all(placed):
        return Caption("placed", tuple(placed), None, total, background)
    bad = next(p for p, q in zip(parts, placed) if q is None)
    _fail(whole, f"{bad!r} is neither a noun phrase nor a placed one, and a caption does not mix them")


# ---------------------------------------------------------------------------------------------
# The image side


@dataclass(frozen=True)
class Scene:
    """What captions can talk about: (colour, shape) -> [(size, cell)], object count, background."""

    groups: dict
    total: int
    background: str | None


def is_shapes_meta(meta) -> bool:
    """True when ``meta`` is shapes metadata a caption can be checked against."""
    try:
        scene_of(meta)
        return True
    except ValueError:
        return False


def _cell(obj: dict, meta: dict) -> str:
    if obj.get("cell") in CELLS:
        return obj["cell"]
    x0, y0, x1, y1 = obj["bbox"]  # older metadata: the cell of the box centre
    size = int(meta["image_size"])
    return cell_of((x0 + x1) / 2, (y0 + y1) / 2, size, size)


def scene_of(meta: dict) -> Scene:
    """The Scene of a sample's json metadata; ValueError when it is not shapes metadata."""
    try:
        groups: dict = {}
        for o in meta["objects"]:
            if o["color"] not in COLORS or o["shape"] not in SHAPES or o["size"] not in SIZES:
                raise ValueError(f"unknown colour, shape or size in {o}")
            groups.setdefault((o["color"], o["shape"]), []).append((o["size"], _cell(o, meta)))
        bg = meta.get("background")
        return Scene(groups, len(meta["objects"]), _background_word(bg) if bg else None)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not shapes metadata (objects with shape, color, size and cell): {e!r}") from None


# ---------------------------------------------------------------------------------------------
# Truth


def _where_holds(where: str, cells: list[str]) -> bool:
    """The phrase is one ``position_phrase`` could give these cells (see the module docstring)."""
    if len(set(cells)) == 1:
        return where in CELL_PHRASES[cells[0]]
    if where not in SIDE_PHRASES:
        return False
    axis, index = SIDE_PHRASES[where]
    return all(divmod(CELLS.index(c), 3)[0 if axis == "row" else 1] == index for c in cells)


def _phrase_holds(p: Phrase, scene: Scene) -> bool:
    members = scene.groups.get((p.color, p.shape), [])
    if len(members) != p.count:
        return False
    if p.size and any(size != p.size for size, _ in members):
        return False
    return p.where is None or _where_holds(p.where, [cell for _, cell in members])


def holds(caption: Caption, scene: Scene) -> bool:
    """Whether a parsed caption is true of a scene."""
    if caption.background and caption.background != scene.background:
        return False  # also when the metadata has no background: the claim cannot be checked
    if caption.total is not None and caption.total != scene.total:
        return False
    if not all(_phrase_holds(p, scene) for p in caption.phrases):
        return False
    if caption.kind == "listing":  # names every group, no more, no fewer
        return {(p.color, p.shape) for p in caption.phrases} == set(scene.groups)
    if caption.kind == "relation":
        a, b = ([cell for _, cell in scene.groups[(p.color, p.shape)]] for p in caption.phrases)
        return relation_holds(caption.relation, a, b)
    return True


def caption_true_of(caption: str, meta: dict) -> bool:
    """True when the shapes caption is true of the image with json metadata ``meta``.

    Raises ValueError when the caption is not in the shapes grammar or ``meta`` is not shapes
    metadata (see the module docstring for what each kind of caption claims).
    """
    return holds(parse_caption(caption), scene_of(meta))


def truth_matrix(captions: list[str], metas: list[dict]) -> np.ndarray:
    """(images, captions) bool matrix: entry [i, t] says caption t is true of image i.
    Raises ValueError as :func:`caption_true_of` does."""
    parsed = [parse_caption(c) for c in captions]
    scenes = [scene_of(m) for m in metas]
    return np.array([[holds(c, s) for c in parsed] for s in scenes], dtype=bool).reshape(len(scenes), len(parsed))


def names_every_object(caption: str, meta: dict) -> bool:
    """True when a true caption accounts for every object of the image (its groups' counts add up
    to the object count): "a red circle above a blue square" of an image with a third object does
    not. Text-to-image trains on such captions so that a prompt asks for nothing but what it says.
    Raises ValueError as :func:`caption_true_of` does."""
    return sum(p.count for p in parse_caption(caption).phrases) == scene_of(meta).total
