"""Bad input, property-based: never a traceback, always a one-line message or a correct result.

Example counts are bounded (``EXAMPLES``) and derandomized so the suite is fast and repeatable.
"""

from __future__ import annotations

import io
import json
import typing

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm.cli import main
from mm.config import Config, _field_types, valid_keys
from tests.helpers import ROOT, tiny_vq_overrides

from .conftest import VQ_CONFIG

EXAMPLES = {"config": 60, "images": 40}
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def assert_one_line_error(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mm: error: ") and "Traceback" not in err, err


# --- config overrides ---------------------------------------------------------------------------

KEYS = valid_keys(Config)


def key_type(key: str):
    section, name = key.split(".")
    tp = _field_types(type(getattr(Config(), section)))[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is not list and args else tp


NUMERIC = [k for k in KEYS if key_type(k) in (int, float)]
INTS = [k for k in KEYS if key_type(k) is int or key_type(k) == list[int]]
BOOLS = [k for k in KEYS if key_type(k) is bool]
# Counts and sizes: a negative value is never meaningful (0 may be, e.g. warmup_steps=0).
SIZES = [k for k in INTS if k not in ("run.seed",)]


def not_a_number(text: str) -> bool:
    try:
        float(text)
        return False
    except ValueError:
        return text.strip().lower() not in ("none", "null", "")


wrong_type = st.one_of(
    st.tuples(st.sampled_from(NUMERIC), st.text(max_size=12).filter(not_a_number)),
    st.tuples(st.sampled_from([k for k in KEYS if key_type(k) is int]),
              st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()).map(repr)),
    st.tuples(st.sampled_from(BOOLS), st.text(max_size=8).filter(
        lambda t: t.strip().lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"))),
).map(lambda kv: f"{kv[0]}={kv[1]}")
unknown_key = st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,12}){0,2}", fullmatch=True).filter(
    lambda k: k not in KEYS).map(lambda k: f"{k}=1")
negative_size = st.tuples(st.sampled_from(SIZES), st.integers(-10**9, -1)).map(lambda kv: f"{kv[0]}={kv[1]}")
no_equals = st.text(min_size=1, max_size=20).filter(lambda t: "=" not in t and not t.startswith("-"))
bad_override = st.one_of(wrong_type, unknown_key, negative_size, no_equals)


@settings(FUZZ, max_examples=EXAMPLES["config"])
@given(bad=bad_override, good_before=st.lists(st.sampled_from(["train.lr=1e-3", "log.every=5"]), max_size=2))
def test_bad_config_override_is_a_one_line_error(bad, good_before, tmp_path_factory, shapes_cache, capsys):
    run = tmp_path_factory.mktemp("cfg") / "run"
    tiny = tiny_vq_overrides(run, shapes_cache, **{"train.max_steps": 1, "train.checkpoint_every": 0})
    code = main(["train", str(ROOT / VQ_CONFIG), *tiny, *good_before, bad])  # tiny: a slip-through costs seconds
    assert_one_line_error(code, capsys.readouterr().err)
    assert not (run / "checkpoints").exists()  # refused before any work


# --- image files through ingest -----------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV", "LAB"]
FORMATS = ["png", "jpeg", "gif", "bmp", "tiff", "webp", "ppm"]


def encoded(mode: str, size: tuple[int, int], fmt: str, cut: float | None = None) -> dict:
    """An image file as the strategy below draws it (for explicit @example cases)."""
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    data = buf.getvalue()
    return {"mode": mode, "size": size, "fmt": fmt, "data": data[: int(len(data) * cut)] if cut else data, "cut": cut}


ODD_FILES = [encoded("I;16", (5, 3), "png"), encoded("F", (4, 4), "tiff"), encoded("1", (1, 1), "bmp"),
             encoded("RGBA", (9, 2), "webp"), encoded("CMYK", (6, 6), "jpeg"), encoded("RGB", (40, 40), "png", 0.5)]


@st.composite
def image_file(draw):
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    fmt = draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 255))
    im = Image.new(mode, size)
    if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB"):
        im = Image.frombytes(mode, size, bytes((seed + 37 * i) % 256 for i in range(len(im.tobytes()))))
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):  # this format cannot store this mode: raw bytes instead
        buf = io.BytesIO(im.tobytes()[:64] or b"\x00")
        fmt = "png"
    data = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.floats(0.0, 0.95)))
    if cut is not None:
        data = data[: int(len(data) * cut)]
    return {"mode": mode, "size": size, "fmt": fmt, "data": data, "cut": cut}


@settings(FUZZ, max_examples=EXAMPLES["images"])
@example(files=ODD_FILES, resize=0)
@given(files=st.lists(image_file(), min_size=1, max_size=4), resize=st.sampled_from([0, 8]))
def test_ingest_random_image_files_counted_or_converted(files, resize, tmp_path_factory):
    import tarfile

    from mm.data.ingest import ingest

    root = tmp_path_factory.mktemp("ingest")
    src = root / "src"
    src.mkdir()
    for i, f in enumerate(files):
        ext = "jpg" if f["fmt"] == "jpeg" else f["fmt"]
        (src / f"im{i}.{ext}").write_bytes(f["data"])
        (src / f"im{i}.txt").write_text(f"image {i} in mode {f['mode']}")
    summary = ingest(src, root / "out", resize=resize)
    # Every file is either written or skipped with a reason; every intact file is written.
    assert summary["ingested"] + summary["skipped_total"] == len(files)
    intact = [f for f in files if f["cut"] is None and readable(f["data"])]
    assert summary["ingested"] >= len(intact), (summary, [(f["mode"], f["fmt"]) for f in intact])
    # What is written decodes as an RGB image (of the requested size) with its caption.
    written = 0
    for tar_path in sorted((root / "out").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".png"):
                written += 1
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    assert im.mode == "RGB" and (not resize or im.size == (resize, resize))
            elif name.endswith(".json"):
                assert json.loads(data)["caption"].startswith("image ")
    assert written == summary["ingested"]


def readable(data: bytes) -> bool:
    """PIL opens and fully decodes it (the reference for 'an intact image file')."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - anything PIL cannot read is not an image
        return False



# --- prompts, questions and images through generate / caption / answer --------------------------

SCRIPTS = ["красный круг над синим квадратом", "赤い丸と青い四角", "دائرة حمراء", "लाल वृत्त", "🔴🟦🐱" * 30,
           "a red circle\x00\x1b[31m", "\u202etxet desrever", "bad bytes \udcff\udcfe", "\ud800 lone", "\t\n\r ",
           "word " * 2000]
prompt = st.one_of(st.just(""), st.sampled_from(SCRIPTS), st.text(max_size=200),
                   st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60))
EXAMPLES.update({"generate": 25, "caption": 20, "answer": 25})


@pytest.fixture(scope="module")
def vqa_models(tmp_path_factory):
    """Exported VQA folders (2 training steps each) for the classifier and the generative head."""
    from tests.tasks.vqa_util import shared_assets, train_vqa, vqa_config

    assets = shared_assets(tmp_path_factory)
    out = {}
    for head in ("classifier", "generative"):
        run = tmp_path_factory.mktemp(f"vqa_{head}") / "run"
        train_vqa(vqa_config(run, assets["init"], assets["shards"], head, steps=2))
        out[head] = run / "final"
    return out


def assert_ok_or_one_line_error(code: int, out: str, err: str) -> None:
    """Exit 0, or exit 2 with one error line (after one-line warnings about cleaned input)."""
    assert "Traceback" not in err, err
    if code != 0:
        notes = [line for line in err.splitlines() if line.startswith("mm: warning: ")]
        assert_one_line_error(code, "\n".join(line for line in err.splitlines() if line not in notes))


@settings(FUZZ, max_examples=EXAMPLES["generate"])
@example(prompts=["\ud800 lone", "word " * 2000], negative="\x00")
@given(prompts=st.lists(prompt, min_size=1, max_size=3), negative=prompt)
def test_generate_any_prompt(prompts, negative, bundle_dir, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("gen") / "grid.png"
    args = ["generate", "--model", str(bundle_dir), "--num-images", "1", "--out", str(out), "--seed", "1"]
    for p in prompts:
        args += ["--prompt", p]
    code = main([*args, "--negative-prompt", negative])
    captured = capsys.readouterr()
    assert code == 0, captured.err  # any text is a valid prompt (cleaned, with a warning when changed)
    with Image.open(out) as grid:
        assert grid.height > 128 * len(prompts)  # one row per prompt
    assert all(line.startswith("mm: ") for line in captured.out.splitlines()), captured.out


@settings(FUZZ, max_examples=EXAMPLES["caption"])
@example(files=ODD_FILES[:3], method="beam")
@given(files=st.lists(image_file(), min_size=1, max_size=3), method=st.sampled_from(["greedy", "beam", "top-p"]))
def test_caption_any_image_file(files, method, bundle_dir, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("cap")
    paths = []
    for i, f in enumerate(files):
        paths.append(folder / f"im{i}.{f['fmt']}")
        paths[-1].write_bytes(f["data"])
    code = main(["caption", "--model", str(bundle_dir), "--image", *map(str, paths), "--method", method,
                 "--beams", "2"])
    captured = capsys.readouterr()
    assert_ok_or_one_line_error(code, captured.out, captured.err)
    if code == 0:  # one line per image, in order
        lines = captured.out.splitlines()
        assert [line.split("\t")[0] for line in lines] == list(map(str, paths)), captured.out
    else:  # refused only when some file is not a readable image
        assert not all(f["cut"] is None and readable(f["data"]) for f in files), captured.err


@settings(FUZZ, max_examples=EXAMPLES["answer"])
@example(question="bad bytes \udcff what color?", file=ODD_FILES[0], head="generative")
@example(question="\u202e?", file=ODD_FILES[1], head="classifier")
@given(question=prompt, file=image_file(), head=st.sampled_from(["classifier", "generative"]))
def test_answer_any_question_and_image(question, file, head, vqa_models, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("ans") / f"im.{file['fmt']}"
    path.write_bytes(file["data"])
    code = main(["answer", "--model", str(vqa_models[head]), "--image", str(path), "--question", question])
    captured = capsys.readouterr()
    assert_ok_or_one_line_error(code, captured.out, captured.err)
    if code == 0:
        assert captured.out.startswith("answer: ") and question.split(), captured.out
    else:  # refused only for an empty question or a file that is not a readable image
        assert not question.split() or not readable(file["data"]), captured.err
