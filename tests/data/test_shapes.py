"""The built-in shapes data set: reproducible shards, disjoint splits, true captions and answers."""

import hashlib
import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mm.cli import main
from mm.data import shapes
from mm.data.shapes import CELLS, COLORS, SHAPES, make_sample, render_spec
from mm.data.shapes_text import held_out_prompt_strings, held_out_prompts, make_captions
from mm.errors import MMError


def write(out, *extra):
    return main(["data", "shapes", "--out", str(out), *extra])


def read_tars(folder):
    """{key: {ext: bytes}} over every shard of a folder, via the plain tarfile module."""
    samples = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Shards


def test_same_seed_gives_byte_identical_shards_and_another_seed_differs(tmp_path):
    args = ["--num-samples", "20", "--val-samples", "6", "--samples-per-shard", "8"]
    assert write(tmp_path / "a", *args) == 0
    assert write(tmp_path / "b", *args) == 0
    assert write(tmp_path / "c", *args, "--seed", "1") == 0
    a, b, c = all_files(tmp_path / "a"), all_files(tmp_path / "b"), all_files(tmp_path / "c")
    assert sorted(a) == ["prompts.json", "test/shapes-test-000000.tar", "test/sizes.json",
                         "train/shapes-train-000000.tar", "train/shapes-train-000001.tar",
                         "train/shapes-train-000002.tar", "train/sizes.json",
                         "val/shapes-val-000000.tar", "val/sizes.json"]
    assert a == b
    assert json.loads(a["train/sizes.json"]) == {"shapes-train-000000.tar": 8, "shapes-train-000001.tar": 8,
                                                 "shapes-train-000002.tar": 4}
    for name in a:
        if name.endswith(".tar"):
            assert a[name] != c[name], name


def test_fixture_shards_read_with_webdataset_in_the_documented_format(shapes_shards):
    import webdataset as wds

    from mm.data.shards import count_samples, expand_shards

    assert count_samples(expand_shards(str(shapes_shards / "train"))) == 64
    assert len(expand_shards(str(shapes_shards / "train"))) == 4
    assert count_samples(expand_shards(str(shapes_shards / "val"))) == 32
    urls = expand_shards(str(shapes_shards / "val"))
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert sample["png"].size == (32, 32) and sample["png"].mode == "RGB"
        assert sample["txt"] == meta["caption"]
        assert {"caption", "objects", "qa"} <= set(meta)
        assert 1 <= len(meta["objects"]) <= 4
        for o in meta["objects"]:
            assert set(o) >= {"shape", "color", "size", "bbox", "cell"}
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "large")
        for qa in meta["qa"]:
            assert len(qa["answers"]) == 10 and all(isinstance(a, str) for a in qa["answers"])
            assert qa["answer_type"] in ("yes/no", "number", "other")
        n += 1
    assert n == 32
    prompts = json.loads((shapes_shards / "prompts.json").read_text())
    assert prompts == held_out_prompts()


def test_splits_are_disjoint(shapes_shards):
    digests = {}
    for split in ("train", "val", "test"):
        samples = read_tars(shapes_shards / split)
        digests[split] = {hashlib.sha256(s["png"]).hexdigest() for s in samples.values()}
        assert len(digests[split]) == len(samples)  # no duplicate images within a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    # A larger check without shards: the streams themselves differ.
    train = {make_sample(0, "train", i, 32)["png"] for i in range(400)}
    val = {make_sample(0, "val", i, 32)["png"] for i in range(150)}
    assert len(train) == 400 and not train & val


@pytest.mark.parametrize("size", [32, 48, 64])
def test_objects_fit_their_cells_and_never_touch(size):
    sides = shapes.object_sizes(size)
    for i in range(60):
        meta = make_sample(3, "train", i, size)["json"]
        img = Image.open(io.BytesIO(make_sample(3, "train", i, size)["png"]))
        assert img.size == (size, size)
        boxes = []
        for o in meta["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert x1 - x0 == y1 - y0 == sides[o["size"]]
            assert shapes.cell_of((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, size, size) == o["cell"]
            boxes.append((x0, y0, x1, y1))
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                # At least one empty pixel between them along x or y (not even diagonal contact).
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
        assert len({o["cell"] for o in meta["objects"]}) == len(meta["objects"])


# ---------------------------------------------------------------------------------------------
# Captions: parse every claim and check it against the objects

NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
COLOR_RE, SHAPE_RE = "|".join(COLORS), "|".join(SHAPES)
NP = re.compile(rf"\b(a|an|one|two|three|four|\d+) (?:(small|large) )?({COLOR_RE}) ({SHAPE_RE})s?\b")
# Position phrases → predicate on (row, col), written out independently of the generator.
POS = [
    ("in the top left corner", lambda r, c: (r, c) == (0, 0)), ("in the top left", lambda r, c: (r, c) == (0, 0)),
    ("in the upper left", lambda r, c: (r, c) == (0, 0)), ("in the top right corner", lambda r, c: (r, c) == (0, 2)),
    ("in the top right", lambda r, c: (r, c) == (0, 2)), ("in the upper right", lambda r, c: (r, c) == (0, 2)),
    ("at the top in the middle", lambda r, c: (r, c) == (0, 1)), ("in the top center", lambda r, c: (r, c) == (0, 1)),
    ("in the bottom left corner", lambda r, c: (r, c) == (2, 0)), ("in the bottom left", lambda r, c: (r, c) == (2, 0)),
    ("in the lower left", lambda r, c: (r, c) == (2, 0)), ("in the bottom right corner", lambda r, c: (r, c) == (2, 2)),
    ("in the bottom right", lambda r, c: (r, c) == (2, 2)), ("in the lower right", lambda r, c: (r, c) == (2, 2)),
    ("at the bottom in the middle", lambda r, c: (r, c) == (2, 1)),
    ("in the bottom center", lambda r, c: (r, c) == (2, 1)),
    ("in the middle left", lambda r, c: (r, c) == (1, 0)), ("in the middle right", lambda r, c: (r, c) == (1, 2)),
    ("on the left side", lambda r, c: c == 0), ("on the right side", lambda r, c: c == 2),
    ("on the left", lambda r, c: c == 0), ("on the right", lambda r, c: c == 2),
    ("at the top", lambda r, c: r == 0), ("at the bottom", lambda r, c: r == 2),
    ("in the center", lambda r, c: (r, c) == (1, 1)), ("in the middle", lambda r, c: (r, c) == (1, 1)),
]
REL = {"above": lambda p, q: p[0] < q[0], "below": lambda p, q: p[0] > q[0],
       "to the left of": lambda p, q: p[1] < q[1], "to the right of": lambda p, q: p[1] > q[1]}


def rc(obj):
    return divmod(CELLS.index(obj["cell"]), 3)


def check_caption(caption, objects, background):
    """Assert every claim in ``caption`` holds; return the number of claims checked."""
    nps = list(NP.finditer(caption))
    assert nps, caption
    claims = 0
    groups = []
    for m in nps:
        count = int(m[1]) if m[1].isdigit() else NUM[m[1]]
        members = [o for o in objects if o["color"] == m[3] and o["shape"] == m[4]]
        assert len(members) == count, (caption, m[0])
        if m[2]:
            assert all(o["size"] == m[2] for o in members), (caption, m[0])
        groups.append(members)
        claims += 1
    for k, m in enumerate(nps):
        tail = caption[m.end():nps[k + 1].start() if k + 1 < len(nps) else len(caption)].strip(" ,")
        for phrase, pred in POS:
            if tail.startswith(phrase):
                assert all(pred(*rc(o)) for o in groups[k]), (caption, phrase)
                claims += 1
                break
        for word, pred in REL.items():
            if tail == word:
                assert all(pred(rc(a), rc(b)) for a in groups[k] for b in groups[k + 1]), (caption, word)
                claims += 1
    total = re.match(r"(two|three|four) shapes:", caption)
    if total:
        assert NUM[total[1]] == len(objects), caption
        assert sum(len(g) for g in groups) == len(objects), caption  # a listing names all
    bg = re.search(r"on a (\w+) background", caption)
    if bg:
        expected = {"striped": background["texture"] == "stripes",
                    "checkered": background["texture"] == "checker",
                    "dark": background["level"] < 90, "light": background["level"] > 170,
                    "gray": 90 <= background["level"] <= 170}[bg[1]]
        assert expected, caption
    return claims


def test_every_caption_is_true_of_its_image():
    mains = []
    for i in range(250):
        meta = make_sample(0, "train", i, 32)["json"]
        assert meta["caption"] == meta["captions"][0]
        assert len(set(meta["captions"])) == len(meta["captions"]) >= 2
        for cap in meta["captions"]:
            check_caption(cap, meta["objects"], meta["background"])
        mains.append(meta["caption"])
    # The templates vary: counts, positions and relations all appear.
    text = " ".join(mains)
    for needle in (" two ", " above ", " below ", "to the left of", "on the left", "there are",
                   "shapes:", "background", " small ", " large "):
        assert needle in " " + text + " ", needle


def test_caption_checker_catches_false_captions():
    objects = [{"shape": "circle", "color": "red", "size": "small", "cell": "top left"},
               {"shape": "square", "color": "blue", "size": "large", "cell": "bottom right"}]
    bg = {"level": 50, "texture": "plain"}
    check_caption("a red circle above a blue square", objects, bg)
    for wrong in ("two red circles", "a large red circle", "a red circle below a blue square",
                  "a red circle on the right", "a blue square on a light background", "three shapes: a red circle"):
        with pytest.raises(AssertionError):
            check_caption(wrong, objects, bg)


# ---------------------------------------------------------------------------------------------
# VQA


def oracle(question, objects):
    """The true answer of a generated question, computed independently from the objects."""
    colors, shapes_ = [o["color"] for o in objects], [o["shape"] for o in objects]
    yn = {True: "yes", False: "no"}
    at = {o["cell"]: o for o in objects}
    rules = [
        (r"How many (shapes are there|objects are in the image)\?", lambda m: str(len(objects))),
        (r"How many (\w+) shapes are there\?", lambda m: str(colors.count(m[1]))),
        (r"How many (\w+)s are there\?", lambda m: str(shapes_.count(m[1]))),
        (r"What color is the shape in the (.+)\?", lambda m: at[m[1]]["color"]),
        (r"What shape is in the (.+)\?", lambda m: at[m[1]]["shape"]),
        (r"What color is the (\w+)\?", lambda m: next(o["color"] for o in objects if o["shape"] == m[1])),
        (r"What shape is the (\w+) object\?", lambda m: next(o["shape"] for o in objects if o["color"] == m[1])),
        (r"Where is the (\w+) (\w+)\?",
         lambda m: next(o["cell"] for o in objects if (o["color"], o["shape"]) == (m[1], m[2]))),
        (r"Is there a (\w+) (\w+)\?", lambda m: yn[(m[1], m[2]) in list(zip(colors, shapes_))]),
        (r"Is there a (\w+) in the image\?", lambda m: yn[m[1] in shapes_]),
        (r"Are there any (\w+) shapes\?", lambda m: yn[m[1] in colors]),
        (r"Is the (\w+) (\w+) (above|below|to the left of|to the right of) the (\w+) (\w+)\?",
         lambda m: yn[REL[m[3]](rc(next(o for o in objects if (o["color"], o["shape"]) == (m[1], m[2]))),
                                rc(next(o for o in objects if (o["color"], o["shape"]) == (m[4], m[5]))))]),
    ]
    for pattern, answer in rules:
        m = re.fullmatch(pattern, question)
        if m:
            return answer(m)
    raise AssertionError(f"unrecognised question {question!r}")


def test_qa_answers_are_true_and_majority_correct():
    types, qtypes, varied, wrong_seen, words = Counter(), Counter(), 0, 0, 0
    for i in range(300):
        meta = make_sample(0, "train", i, 32)["json"]
        assert 4 <= len(meta["qa"]) <= 6
        for qa in meta["qa"]:
            truth = oracle(qa["question"], meta["objects"])
            assert qa["answer"] == truth, qa
            counts = Counter(qa["answers"])
            assert counts[truth] >= 5 and counts.most_common(1)[0][0] == truth, qa
            types[qa["answer_type"]] += 1
            qtypes[qa["question_type"]] += 1
            varied += len(counts) > 1
            words += any(a in ("one", "two", "three", "four", "zero") for a in qa["answers"])
            if qa["answer_type"] == "yes/no":
                wrong_seen += counts[truth] < 10
    assert set(types) == {"yes/no", "number", "other"}
    assert {"how many", "what color is the", "what shape is", "where is the", "is there a",
            "are there any", "is the"} <= set(qtypes)
    assert varied > 100 and words > 20 and wrong_seen > 10  # annotators disagree as real ones do


# ---------------------------------------------------------------------------------------------
# Held-out prompts and rendering a spec


def test_held_out_prompts_are_fixed_valid_and_never_training_captions():
    prompts = held_out_prompts()
    assert len(prompts) == 60 and len({p["prompt"] for p in prompts}) == 60
    assert Counter(p["tag"] for p in prompts) == {t: 12 for t in ("single", "two", "count", "position", "relation")}
    assert prompts[0]["prompt"] == "a red diamond"  # golden: the evaluation set never moves
    held = held_out_prompt_strings()
    for i in range(600):
        for cap in make_sample(0, "train", i, 32)["json"]["captions"]:
            assert cap not in held
    # Forcing the issue: a lone red diamond would often be captioned exactly "a red diamond".
    obj = [{"shape": "diamond", "color": "red", "size": "large", "cell": "center"}]
    for seed in range(50):
        caps = make_captions(np.random.default_rng(seed), obj, {"level": 128, "texture": "plain"})
        assert caps and "a red diamond" not in caps


def test_render_spec_draws_what_the_spec_says():
    from mm.data.detector import detect, match_spec

    for size in (32, 64):
        for k, spec in enumerate(held_out_prompts()):
            img, objects = render_spec(spec, image_size=size, seed=k)
            assert img.size == (size, size)
            assert len(objects) == sum(g["count"] for g in spec["objects"])
            result = match_spec(detect(img), spec)
            assert result["correct"], (spec["prompt"], result)


def test_render_spec_rejects_impossible_specs():
    with pytest.raises(MMError, match="cannot be laid out"):
        render_spec({"objects": [{"color": "red", "shape": "circle", "count": 1},
                                 {"color": "blue", "shape": "square", "count": 1, "cell": "top left"}],
                     "relation": {"a": 0, "b": 1, "relation": "above"}})
    with pytest.raises(MMError, match="1..9 objects"):
        render_spec({"objects": [{"color": "red", "shape": "circle", "count": 10}]})
    with pytest.raises(MMError, match="--image-size"):
        render_spec({"objects": [{"color": "red", "shape": "circle", "count": 1}]}, image_size=40)


# ---------------------------------------------------------------------------------------------
# Command-line errors and the cache


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--num-samples", "5", "--image-size", "20"], "--image-size must be a multiple of 16"),
    (["--num-samples", "5", "--image-size", "40"], "--image-size must be a multiple of 16"),
    (["--num-samples", "5", "--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
    (["--num-samples", "5", "--seed", "-1"], "--seed must be >= 0"),
    (["--num-samples", "5", "--val-samples", "-2"], "--val-samples must be >= 0"),
])
def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    assert write(tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "train").exists()


def test_cli_refuses_a_folder_that_already_holds_shards(tmp_path, capsys):
    assert write(tmp_path, "--num-samples", "3", "--val-samples", "0") == 0
    assert not (tmp_path / "val").exists()
    assert write(tmp_path, "--num-samples", "3") == 2
    assert "already holds shards" in capsys.readouterr().err


def test_ensure_shapes_builds_once_and_survives_a_lost_race(tmp_path, monkeypatch):
    folders = shapes.ensure_shapes(tmp_path, image_size=32, num_train=10, num_val=3, seed=0)
    assert set(folders) == {"train", "val", "test"}
    first = all_files(folders["train"].parent)
    ref = tmp_path / "ref"
    write(ref, "--num-samples", "10", "--val-samples", "3")
    assert first == all_files(ref)  # same bytes as the command writes

    def fail(*a, **k):
        raise AssertionError("a complete cache must not be regenerated")

    monkeypatch.setattr(shapes, "write_dataset", fail)
    assert shapes.ensure_shapes(tmp_path, 32, 10, 3, 0) == folders
    monkeypatch.undo()

    # Another process finishes first while this one is writing: ours is dropped, theirs kept.
    real = shapes.write_dataset

    def racing(out, *a, **k):
        monkeypatch.setattr(shapes, "write_dataset", real)
        shapes.ensure_shapes(tmp_path, 32, 12, 0, 0)  # the "other process" completes
        return real(out, *a, **k)

    monkeypatch.setattr(shapes, "write_dataset", racing)
    got = shapes.ensure_shapes(tmp_path, 32, 12, 0, 0)
    assert set(got) == {"train"} and len(list(got["train"].glob("*.tar"))) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no leftovers
