"""The shapes caption truth function: hand-made true and false cases, every generated caption
true of its own image, held-out prompts true of their renders, unparseable text rejected."""

import pytest

from mm.data.shapes import make_sample, render_spec
from mm.data.shapes_text import held_out_prompts
from mm.data.shapes_truth import caption_true_of, is_shapes_meta, parse_caption, truth_matrix


def obj(color, shape, cell, size="large"):
    return {"color": color, "shape": shape, "cell": cell, "size": size}


# Two red circles (top left, middle left; both small), a large blue square at the bottom right,
# on a plain dark background.
META = {"objects": [obj("red", "circle", "top left", "small"), obj("red", "circle", "middle left", "small"),
                    obj("blue", "square", "bottom right")],
        "background": {"level": 50, "texture": "plain"}}

TRUE = [
    "two red circles and a blue square",
    "a blue square and two red circles",          # order does not matter
    "2 small red circles and a large blue square",
    "there are two red circles and a blue square",
    "a picture of two red circles and a blue square",
    "an image with two red circles and a blue square on a dark background",
    "three shapes: two red circles and a blue square",
    "two red circles on the left and a blue square in the bottom right corner",
    "a blue square in the lower right",            # a placed caption claims only its groups
    "two red circles on the left",
    "two red circles to the left of a blue square",
    "two red circles above a large blue square",
    "a blue square to the right of two small red circles",
    "Two red circles, and a blue square.",         # case, Oxford comma and final period
]
FALSE = {
    "swapped colour": "two blue circles and a red square",
    "wrong count": "three red circles and a blue square",
    "wrong count (one of two)": "a red circle and a blue square",
    "listing missing a group": "two red circles",
    "listing with an extra group": "two red circles, a blue square and a green triangle",
    "wrong shape": "two red squares and a blue square",
    "wrong cell": "a blue square in the top right",
    "single object phrase of another cell": "a blue square on the right",  # that is middle right
    "group side not shared": "two red circles at the top",
    "wrong relation": "two red circles below a blue square",
    "relation the wrong way": "a blue square to the left of two red circles",
    "relation with a missing group": "a green triangle above a blue square",
    "wrong size": "two red circles and a small blue square",
    "size not shared by the group": "two large red circles and a blue square",
    "wrong background": "two red circles and a blue square on a light background",
    "wrong total": "four shapes: two red circles and a blue square",
}


@pytest.mark.parametrize("caption", TRUE)
def test_true_captions(caption):
    assert caption_true_of(caption, META) is True


@pytest.mark.parametrize("why", FALSE)
def test_false_captions(why):
    assert caption_true_of(FALSE[why], META) is False


def test_background_words_follow_texture_then_level():
    def meta(level, texture):
        return {"objects": [obj("red", "circle", "center")], "background": {"level": level, "texture": texture}}

    assert caption_true_of("a red circle on a striped background", meta(50, "stripes"))
    assert caption_true_of("a red circle on a checkered background", meta(200, "checker"))
    assert caption_true_of("a red circle on a light background", meta(200, "noise"))
    assert caption_true_of("a red circle on a gray background", meta(120, "plain"))
    assert not caption_true_of("a red circle on a dark background", meta(50, "stripes"))


def test_single_object_position_phrases_name_its_cell():
    meta = {"objects": [obj("green", "diamond", "top center")], "background": {"level": 50, "texture": "plain"}}
    for where in ("at the top", "in the top center", "at the top in the middle"):
        assert caption_true_of(f"a green diamond {where}", meta)
    assert not caption_true_of("a green diamond in the center", meta)
    assert not caption_true_of("a green diamond in the middle", meta)


@pytest.mark.parametrize("text", ["a red blob", "two red circle", "a red circles", "red circles",
                                  "a red circle and", "a red circle in the sky", "hello world",
                                  "a red circle and a blue square in the center",  # mixes listing and placed
                                  ""])
def test_unparseable_text_raises_a_clear_value_error(text):
    with pytest.raises(ValueError, match="not a shapes caption"):
        caption_true_of(text, META)


def test_non_shapes_metadata_is_told_apart():
    assert is_shapes_meta(META) and is_shapes_meta(make_sample(0, "val", 0, 32)["json"])
    assert not is_shapes_meta({"caption": "a dog"}) and not is_shapes_meta(None)
    with pytest.raises(ValueError, match="not shapes metadata"):
        caption_true_of("a red circle", {"caption": "a dog"})


def test_every_generated_caption_is_true_of_its_own_image():
    checked = 0
    for split in ("train", "test"):
        for i in range(1500):
            meta = make_sample(0, split, i, 32)["json"]
            for caption in meta["captions"]:
                assert caption_true_of(caption, meta), (caption, meta["objects"], meta["background"])
                checked += 1
    assert checked > 5000


def test_cell_falls_back_to_the_box_centre():
    meta = make_sample(0, "val", 3, 32)["json"]
    for o in meta["objects"]:
        del o["cell"]
    assert all(caption_true_of(c, meta) for c in meta["captions"])


def test_held_out_prompts_parse_and_are_true_of_their_renders():
    for i, spec in enumerate(held_out_prompts()):
        parse_caption(spec["prompt"])
        _, objects = render_spec(spec, 32, seed=i)
        assert caption_true_of(spec["prompt"], {"objects": objects}), spec


def test_truth_matrix_has_each_caption_true_of_its_own_image():
    metas = [make_sample(0, "val", i, 32)["json"] for i in range(50)]
    captions = [m["caption"] for m in metas]
    truth = truth_matrix(captions, metas)
    assert truth.shape == (50, 50) and truth.diagonal().all()
    assert truth.sum() < 50 * 50 / 4  # captions are specific: far from true of everything


def test_names_every_object_counts_the_objects_a_caption_accounts_for():
    from mm.data.shapes_truth import names_every_object

    objects = [{"shape": "circle", "color": "red", "size": "small", "cell": "top left"},
               {"shape": "square", "color": "blue", "size": "large", "cell": "bottom left"},
               {"shape": "square", "color": "blue", "size": "large", "cell": "bottom right"}]
    meta = {"objects": objects}
    assert names_every_object("a red circle and two blue squares", meta)
    assert names_every_object("a red circle in the top left and two blue squares at the bottom", meta)
    assert not names_every_object("a red circle above two blue squares", {"objects": objects[:2]})
    assert names_every_object("a red circle above a blue square", {"objects": objects[:2]})
    assert not names_every_object("a red circle in the top left", meta)
    # every held-out prompt names every object of its render: T2I prompts ask for nothing else
    for i, spec in enumerate(held_out_prompts()):
        _, drawn = render_spec(spec, 48, seed=i)
        assert names_every_object(spec["prompt"], {"objects": drawn}), spec["prompt"]
    with pytest.raises(ValueError):
        names_every_object("a dog", meta)
