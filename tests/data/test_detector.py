"""The deterministic shapes detector: accuracy on ground truth, robustness, spec matching."""

import copy

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mm.data.detector import connected_components, detect, fit_shape, match_spec
from mm.data.shapes import (
    CELLS,
    COLORS,
    SHAPES,
    make_object,
    render_scene,
    render_spec,
    sample_background,
    sample_rng,
    sample_scene,
    shape_mask,
)
from mm.data.shapes_text import held_out_prompts


def object_accuracy(size, n, seed=0, split="test", degrade=None, keys=("shape", "color", "size", "cell", "bbox")):
    """Objects detected with every attribute right / max(#truth, #detections), summed over images."""
    right = total = 0
    rng = np.random.default_rng(1)
    for i in range(n):
        scene = sample_scene(sample_rng(seed, split, i), size)
        img = render_scene(scene["objects"], scene["background"], size)
        if degrade:
            img = degrade(img, rng)
        truth = [tuple(str(o[k]) for k in keys) for o in scene["objects"]]
        found = [tuple(str(d[k]) for k in keys) for d in detect(img)]
        right += sum(1 for t in truth if t in found)
        total += max(len(truth), len(found))
    return right / total


@pytest.mark.parametrize("size, n", [(32, 300), (64, 150)])
def test_detector_recovers_ground_truth_objects(size, n):
    # Measured: 1.000 at 32, 48 and 64 px over 400 images each (980 objects).
    assert object_accuracy(size, n) >= 0.99


def test_detector_degrades_gracefully_on_noise_and_blur():
    def noise(img, rng):
        a = np.asarray(img).astype(float) + rng.normal(0, 10, (img.height, img.width, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def blur(img, rng):
        return img.filter(ImageFilter.GaussianBlur(0.6))

    keys = ("shape", "color", "cell")
    assert object_accuracy(32, 60, degrade=noise, keys=keys) >= 0.95
    assert object_accuracy(32, 60, degrade=blur, keys=keys) >= 0.95


@pytest.mark.parametrize("image", [
    np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),  # colour noise
    np.zeros((32, 32, 3), dtype=np.uint8),
    np.full((64, 64, 3), 255, dtype=np.uint8),
    np.random.default_rng(1).random((3, 32, 32)).astype(np.float32),  # CHW floats in 0..1
    np.full((32, 32, 3), np.nan),
    np.zeros((2, 2, 3), dtype=np.uint8),
    np.zeros((32, 32), dtype=np.uint8),
    np.zeros((5,)),
    Image.new("L", (32, 32), 128),
    Image.new("RGBA", (40, 24), (200, 30, 30, 255)),
])
def test_detector_never_crashes(image):
    found = detect(image)
    assert isinstance(found, list)
    for d in found:
        assert set(d) >= {"shape", "color", "size", "bbox", "cell"}


def test_detector_reads_arrays_like_images():
    scene = sample_scene(sample_rng(0, "val", 5), 32)
    img = render_scene(scene["objects"], scene["background"], 32)
    arr = np.asarray(img)
    assert detect(img) == detect(arr) == detect(arr.astype(np.float32) / 255) == detect(arr.transpose(2, 0, 1))


@pytest.mark.parametrize("side", [5, 7, 9, 11, 13, 19, 31])
def test_each_template_is_classified_as_itself(side):
    for shape in SHAPES:
        soft = np.pad(shape_mask(shape, side, side).astype(float), 3)  # as detect() crops: 3 px around
        got, fit = fit_shape(soft, (3, 3, 3 + side, 3 + side))
        assert (got, fit) == (shape, 1.0)


def test_connected_components_matches_a_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((24, 24)) < 0.45
        ours = connected_components(mask)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert len(ours) == n
        assert sorted(len(c) for c in ours) == sorted(int((labels == k).sum()) for k in range(1, n + 1))


# ---------------------------------------------------------------------------------------------
# match_spec

RED_ABOVE_BLUE = {"objects": [{"color": "red", "shape": "circle", "count": 1, "cell": None},
                              {"color": "blue", "shape": "square", "count": 1, "cell": None}],
                  "relation": {"a": 0, "b": 1, "relation": "above"}}


def det(color, shape, cell):
    return {"color": color, "shape": shape, "cell": cell, "size": "large", "bbox": [0, 0, 1, 1]}


def test_match_spec_scores_each_attribute():
    good = [det("red", "circle", "top left"), det("blue", "square", "bottom left")]
    assert match_spec(good, RED_ABOVE_BLUE) == {"color": True, "shape": True, "count": True,
                                                "position": True, "correct": True}
    swapped = [det("red", "circle", "bottom left"), det("blue", "square", "top left")]
    assert match_spec(swapped, RED_ABOVE_BLUE) == {"color": True, "shape": True, "count": True,
                                                   "position": False, "correct": False}
    same_row = [det("red", "circle", "center"), det("blue", "square", "middle left")]
    assert match_spec(same_row, RED_ABOVE_BLUE)["position"] is False
    wrong_colour = [det("green", "circle", "top left"), det("blue", "square", "bottom left")]
    r = match_spec(wrong_colour, RED_ABOVE_BLUE)
    assert (r["shape"], r["color"], r["count"], r["position"]) == (True, False, False, False)
    extra = good + [det("yellow", "diamond", "center")]
    r = match_spec(extra, RED_ABOVE_BLUE)
    assert (r["color"], r["count"], r["correct"]) == (True, False, False)
    assert match_spec([], RED_ABOVE_BLUE) == {"color": False, "shape": False, "count": False,
                                              "position": False, "correct": False}


def test_match_spec_counts_and_cells():
    three = {"objects": [{"color": "cyan", "shape": "triangle", "count": 3, "cell": None}], "relation": None}
    dets = [det("cyan", "triangle", c) for c in ("top left", "center", "bottom right")]
    assert match_spec(dets, three) == {"color": True, "shape": True, "count": True, "position": None,
                                       "correct": True}
    assert match_spec(dets[:2], three)["count"] is False
    placed = {"objects": [{"color": "red", "shape": "square", "count": 1, "cell": "top right"}]}
    assert match_spec([det("red", "square", "top right")], placed)["correct"]
    r = match_spec([det("red", "square", "top left")], placed)
    assert (r["color"], r["count"], r["position"], r["correct"]) == (True, True, False, False)


def test_rendered_spec_then_detected_is_correct_and_a_wrong_spec_is_not():
    img, _ = render_spec(RED_ABOVE_BLUE, image_size=64, seed=3)
    dets = detect(img)
    assert match_spec(dets, RED_ABOVE_BLUE)["correct"]
    flipped = dict(RED_ABOVE_BLUE, relation={"a": 0, "b": 1, "relation": "below"})
    assert match_spec(dets, flipped)["position"] is False


# ---------------------------------------------------------------------------------------------
# Rejection: detect + match_spec on real renders must fail every kind of wrong image (issue 15),
# or a T2I score of 100 % would not mean the prompts were drawn. Each wrong image is a true
# render of a mutated spec (or scene), checked against the original spec.

HELD_OUT = held_out_prompts()
OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
COLOR_NAMES = list(COLORS)


def _next(values, current, avoid=()):
    """The first value after ``current`` (cyclically) that is not ``current`` nor in ``avoid``."""
    values = list(values)
    i = values.index(current)
    return next(v for v in values[i + 1:] + values[:i] if v not in avoid)


def wrong_colour(spec):
    s = copy.deepcopy(spec)
    s["objects"][0]["color"] = _next(COLOR_NAMES, s["objects"][0]["color"])
    return s


def wrong_shape(spec):
    s = copy.deepcopy(spec)
    s["objects"][0]["shape"] = _next(SHAPES, s["objects"][0]["shape"])
    return s


def swapped_binding(spec):
    """Two groups' colours exchanged ("a red circle and a blue square" drawn as a blue circle and
    a red square); None when that would draw the same thing (one group, same colour or shape)."""
    s = copy.deepcopy(spec)
    if len(s["objects"]) < 2:
        return None
    a, b = s["objects"][0], s["objects"][1]
    if a["color"] == b["color"] or a["shape"] == b["shape"]:
        return None
    a["color"], b["color"] = b["color"], a["color"]
    return s


def moved(spec):
    """The stated cell changed, or the relation reversed; None when the spec says no position."""
    s = copy.deepcopy(spec)
    if s.get("relation"):
        s["relation"]["relation"] = OPPOSITE[s["relation"]["relation"]]
    elif any(g.get("cell") for g in s["objects"]):
        g = next(g for g in s["objects"] if g.get("cell"))
        g["cell"] = _next(CELLS, g["cell"])
    else:
        return None
    return s


def extra_object(spec):
    s = copy.deepcopy(spec)
    used = {g["color"] for g in s["objects"]}
    colour = _next(COLOR_NAMES, s["objects"][0]["color"], avoid=used)
    s["objects"].append({"color": colour, "shape": "square", "count": 1, "cell": None})
    return s


def missing_object(spec):
    """One object fewer; None for a one-object spec (a blank image, tested below)."""
    s = copy.deepcopy(spec)
    last = s["objects"][-1]
    if int(last.get("count", 1)) > 1:
        last["count"] -= 1
    elif len(s["objects"]) > 1:
        s["objects"].pop()
        s["relation"] = None  # it named the removed group
    else:
        return None
    return s


# mutation -> the attribute that must be wrong (besides "correct").
MUTATIONS = {wrong_colour: "color", wrong_shape: "shape or color", swapped_binding: "color",
             moved: "position", extra_object: "count", missing_object: "count"}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("mutate", list(MUTATIONS), ids=lambda f: f.__name__)
def test_detector_rejects_renders_of_a_wrong_spec(mutate, size):
    checked = 0
    for i, spec in enumerate(HELD_OUT):
        wrong = mutate(spec)
        if wrong is None:
            continue
        img, _ = render_spec(wrong, size, seed=i)
        r = match_spec(detect(img), spec)
        assert not r["correct"], (mutate.__name__, spec["prompt"], r)
        # The failure is the attribute the mutation broke ("shape or color": another group may
        # have the new shape, then only the colour-shape binding is wrong).
        assert not all(r[a] for a in MUTATIONS[mutate].split(" or ")), (mutate.__name__, spec["prompt"], r)
        checked += 1
    assert checked >= 12  # at least one kind of prompt fully covered
    # The unmutated spec, drawn the same way, passes: the rejection is the mutation's doing.
    assert all(match_spec(detect(render_spec(s, size, seed=i)[0]), s)["correct"] for i, s in enumerate(HELD_OUT))


def scene_spec(objects):
    """The spec a scene satisfies: its (colour, shape) groups with counts; a lone object's cell."""
    groups = {}
    for o in objects:
        groups.setdefault((o["color"], o["shape"]), []).append(o["cell"])
    return {"objects": [{"color": c, "shape": s, "count": len(cells), "cell": cells[0] if len(cells) == 1 else None}
                        for (c, s), cells in groups.items()], "relation": None}


def scene_mutations(objects, rng, size):
    """Wrong versions of a scene's object list (textured backgrounds, both object sizes)."""
    first, used = objects[0], {o["cell"] for o in objects}
    free = [c for c in CELLS if c not in used]
    return {
        "colour": [dict(first, color=_next(COLOR_NAMES, first["color"]), rgb=None)] + objects[1:],
        "shape": [dict(first, shape=_next(SHAPES, first["shape"]))] + objects[1:],
        "moved": [make_object(rng, first["shape"], first["color"], first["size"], free[0], size)] + objects[1:],
        "extra": objects + [make_object(rng, _next(SHAPES, first["shape"]), first["color"], "large", free[0], size)],
        "missing": objects[1:],
    }


@pytest.mark.parametrize("size", [32, 64])
def test_detector_rejects_wrong_versions_of_random_scenes(size):
    rejected = {}
    for i in range(40):
        rng = sample_rng(0, "test", i)
        scene = sample_scene(rng, size)
        objects, spec = scene["objects"], scene_spec(scene["objects"])
        truth = render_scene(objects, scene["background"], size)
        assert match_spec(detect(truth), spec)["correct"], (i, spec)
        for name, wrong in scene_mutations(objects, rng, size).items():
            if name == "moved" and spec["objects"][0]["cell"] is None:
                continue  # the first object's group has no single cell to leave
            r = match_spec(detect(render_scene(wrong, scene["background"], size)), spec)
            assert not r["correct"], (i, name, spec, r)
            rejected[name] = rejected.get(name, 0) + 1
    assert set(rejected) == {"colour", "shape", "moved", "extra", "missing"} and min(rejected.values()) >= 10


@pytest.mark.parametrize("size", [32, 64])
def test_detector_finds_nothing_in_blank_images(size):
    # Plain greys from black to white and every textured background of the generator.
    blanks = [Image.new("RGB", (size, size), (v, v, v)) for v in (0, 40, 128, 200, 255)]
    blanks += [render_scene([], sample_background(np.random.default_rng(k)), size) for k in range(30)]
    for img in blanks:
        assert detect(img) == []
    assert not any(match_spec([], spec)["correct"] for spec in HELD_OUT)


# ---------------------------------------------------------------------------------------------
# Robustness: VQ reconstructions are slightly blurred renders; the detector must still read them.


def held_out_pass_rate(size, degrade, renders=2):
    ok = [match_spec(detect(degrade(render_spec(spec, size, seed=100 * r + i)[0], size)), spec)["correct"]
          for r in range(renders) for i, spec in enumerate(HELD_OUT)]
    return sum(ok) / len(ok)


def gaussian_blur(img, size):
    return img.filter(ImageFilter.GaussianBlur(0.5))


def down_up(img, size):
    half = img.resize((size // 2, size // 2), Image.Resampling.BILINEAR)
    return half.resize((size, size), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("size", [32, 64])
def test_detector_reads_mildly_blurred_renders(size):
    # Measured: 100 % of 240 renders at 32, 48 and 64 px (radius 0.7: 98.3 / 98.8 / 99.6 %).
    assert held_out_pass_rate(size, gaussian_blur) == 1.0


@pytest.mark.parametrize("size", [
    pytest.param(32, marks=pytest.mark.xfail(reason=(
        "measured: the detector reads 40.0 % of these 2x bilinear down/up-sampled 32-px held-out "
        "renders (35.8 % before the soft template fit; 48 px: 80.8 %, was 59.2 %): a 5-px shape "
        "halved to 2.5 px is gone, not misread"))),
    pytest.param(64, marks=pytest.mark.xfail(reason=(
        "measured: the detector reads 95.0 % of these 2x bilinear down/up-sampled 64-px held-out "
        "renders (80.8 % before the soft template fit); the rest are small diamonds read as circles"))),
])
def test_detector_reads_down_up_sampled_renders(size):
    assert held_out_pass_rate(size, down_up) >= 0.98


def test_fit_shape_reads_a_blurred_diamond_whose_tips_are_trimmed():
    """Blur trims a diamond's tips first: its thresholded blob overlaps a circle template best,
    but the diamond drawn one pixel larger and softened explains the soft map best."""
    from mm.data.detector import _soft_blur, fit_shape

    canvas = np.zeros((17, 17))
    canvas[3:14, 3:14] = shape_mask("diamond", 11, 11)
    soft = _soft_blur(_soft_blur(canvas))
    ys, xs = np.nonzero(soft >= 0.5)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    assert box[2] - box[0] < 11  # the visible box lost the tips
    assert fit_shape(soft, box)[0] == "diamond"
    for shape in SHAPES:  # every crisp drawing fits itself exactly
        crisp = np.zeros((17, 17))
        crisp[3:14, 3:14] = shape_mask(shape, 11, 11)
        got, fit = fit_shape(crisp, (3, 3, 14, 14))
        assert got == shape and fit == pytest.approx(1.0)


def test_blurred_same_colour_neighbours_stay_two_objects():
    """The halos of two same-colour objects in neighbouring cells touch after blur; the detector
    splits the component again at half the core chroma."""
    objects = [make_object(np.random.default_rng(0), "square", "red", "small", cell, 48)
               for cell in ("top left", "middle left")]
    objects[0]["bbox"] = [2, 5, 11, 14]  # two pixels above ...
    objects[1]["bbox"] = [2, 16, 11, 25]  # ... the object in the next cell
    background = {"level": 128, "texture": "plain", "amplitude": 0, "period": 2, "noise_seed": 0}
    img = render_scene(objects, background, 48).filter(ImageFilter.GaussianBlur(1.2))
    found = detect(img)
    assert [(d["color"], d["shape"], d["cell"]) for d in found] == [
        ("red", "square", "top left"), ("red", "square", "middle left")]
