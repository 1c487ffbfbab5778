"""TextToImagePipeline: loading, images, seeds, prompt cleaning, save/load round trip."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from mm.errors import MMError
from mm.generation.pipeline import TextToImagePipeline, clean_prompt
from mm.models.model import MMModel


@pytest.fixture(scope="module")
def pipe(bundle_dir):
    return TextToImagePipeline.from_pretrained(bundle_dir, device="cpu")


def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)) and len(a) == len(b)


def test_images_and_per_prompt_seeds(pipe):
    images = pipe(["a red circle", "two blue squares"], num_images_per_prompt=2, guidance_scale=3.0, seed=7)
    assert len(images) == 4 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    alone = pipe(["two blue squares"], num_images_per_prompt=2, guidance_scale=3.0, seed=7)
    assert same(images[2:], alone)  # the same whatever else is in the call
    assert not same(images[:1], images[1:2])  # seed + j: different images per prompt


def test_save_load_round_trip_generates_identical_images(pipe, tmp_path):
    kwargs = {"num_images_per_prompt": 2, "guidance_scale": 2.5, "top_k": 10, "seed": 3, "negative_prompt": "a cyan square"}
    before = pipe(["a green triangle"], **kwargs)
    pipe.save_pretrained(tmp_path / "copy")
    again = TextToImagePipeline.from_pretrained(tmp_path / "copy", device="cpu")(["a green triangle"], **kwargs)
    assert same(before, again)


def test_run_folder_uses_final(bundle_dir, tmp_path):
    import shutil

    shutil.copytree(bundle_dir, tmp_path / "run" / "final")
    p = TextToImagePipeline.from_pretrained(tmp_path / "run", device="cpu")
    assert p.source == tmp_path / "run" / "final"


def test_negative_prompt_changes_images(pipe):
    a = pipe.generate_codes(["a red circle"], guidance_scale=4.0, seed=1)
    b = pipe.generate_codes(["a red circle"], guidance_scale=4.0, seed=1, negative_prompt="three purple circles")
    assert not torch.equal(a, b)


def test_empty_prompt_is_unconditional_with_warning(pipe):
    with pytest.warns(UserWarning, match="empty prompt"):
        guided = pipe.generate_codes([""], guidance_scale=5.0, seed=2)
    with pytest.warns(UserWarning, match="empty prompt"):
        plain = pipe.generate_codes(["  "], guidance_scale=1.0, seed=2)
    assert torch.equal(guided, plain)  # cond and uncond are both the null context


def test_long_prompt_is_truncated_with_warning(pipe):
    long = " ".join(["red circle"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        codes = pipe.generate_codes([long], seed=0)
    assert codes.shape == (1, 4, 4)


def test_control_characters_and_invalid_bytes_are_stripped(pipe):
    with pytest.warns(UserWarning, match="control characters"):
        assert clean_prompt("a red\x00 circle\x1b") == "a red circle"
    with pytest.warns(UserWarning):
        assert clean_prompt(b"a red \xff circle") == "a red circle"
    with pytest.warns(UserWarning):
        assert clean_prompt("a red \udcff circle\u200b") == "a red circle"  # surrogate-escaped byte, ZW space
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_prompt("  a red\tcircle ") == "a red circle"  # plain whitespace: no warning
        clean = pipe.generate_codes(["a red circle"], seed=4)
    with pytest.warns(UserWarning):
        assert torch.equal(pipe.generate_codes(["a red\x07 circle"], seed=4), clean)


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_images_per_prompt": 0}, "images per prompt"),
    ({"num_images_per_prompt": 2000}, "images per prompt"),
    ({"guidance_scale": -1.0}, "guidance"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_k": -2}, "top-k"),
    ({"temperature": 0.0}, "temperature"),
    ({"negative_prompt": ["a", "b"]}, "negative prompts"),
])
def test_bad_arguments(pipe, kwargs, msg):
    with pytest.raises(MMError, match=msg):
        pipe(["a red circle"], **kwargs)


def test_unknown_model_folder(tmp_path):
    with pytest.raises(MMError, match="not an exported mm model"):
        TextToImagePipeline.from_pretrained(tmp_path / "nothing")


def test_a_model_with_its_own_t2i_text_encoder_reads_prompts_with_it(pipe):
    torch.manual_seed(0)
    model = MMModel(dataclasses.replace(pipe.base_model.config, t2i_text=True))
    model.load_state_dict(pipe.base_model.state_dict(), strict=False)  # the T2I encoder stays random
    own = TextToImagePipeline(model, pipe.vq, pipe.tokenizer, device="cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("T2I read the prompt with the understanding encoder")

    model.text_encoder.forward = refuse
    codes = own.generate_codes(["a red circle"], guidance_scale=3.0, seed=1)
    assert not torch.equal(codes, pipe.generate_codes(["a red circle"], guidance_scale=3.0, seed=1))
