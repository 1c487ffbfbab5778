"""`mm answer`, `mm eval vqa --model`, `mm export` of a VQA run, and one-line errors for bad input."""

import io
import json

import pytest
from PIL import Image

from mm.cli import main
from mm.eval.vqa import vqa_accuracy
from mm.generation.vqa import VOCAB_FILE, load_vqa_answerer

from .vqa_util import shared_assets, shared_run


@pytest.fixture
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture
def classifier(tmp_path_factory):
    return shared_run(tmp_path_factory, "classifier")


@pytest.fixture
def image_file(assets, tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(assets["items"][0]["png"])
    return path


def _question(assets, i=0):
    return assets["items"][0]["json"]["qa"][i]


def test_answer_prints_answer_and_top5(classifier, assets, image_file, capsys):
    _, _, final = classifier
    qa = _question(assets)
    assert main(["answer", "--model", str(final), "--image", str(image_file), "--question", qa["question"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    answerer = load_vqa_answerer(final, device="cpu")
    image = Image.open(image_file).convert("RGB")
    (top,) = answerer.top_k([image], [qa["question"]], 5)
    assert lines[0] == f"answer: {top[0][0]}"
    assert vqa_accuracy(top[0][0], qa["answers"]) == 1.0  # a training question of the overfit model
    assert lines[1] == "top-5:" and len(lines) == 7
    for line, (answer, score) in zip(lines[2:], top):
        value, text = line.split(maxsplit=1)
        assert text == answer and float(value) == pytest.approx(score, abs=1e-4)
    assert [float(line.split()[0]) for line in lines[2:]] == sorted((float(x.split()[0]) for x in lines[2:]),
                                                                    reverse=True)


def test_answer_with_generative_head_prints_the_answer(tmp_path_factory, assets, image_file, capsys):
    _, _, final = shared_run(tmp_path_factory, "generative")
    qa = _question(assets, 1)
    assert main(["answer", "--model", str(final), "--image", str(image_file), "--question", qa["question"]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("answer: ")
    assert vqa_accuracy(out[0][len("answer: "):], qa["answers"]) == 1.0


def test_eval_vqa_with_model_end_to_end(classifier, assets, tmp_path, capsys):
    _, _, final = classifier
    out = tmp_path / "metrics.json"
    assert main(["eval", "vqa", "--model", str(final), "--data", str(assets["shards"]), "--out", str(out),
                 "--batch-size", "5"]) == 0
    metrics = json.loads(out.read_text())
    results = json.loads((tmp_path / "metrics_results.json").read_text())
    qas = [qa for s in assets["items"] for qa in s["json"]["qa"]]
    assert len(results) == len(qas) == 24
    # The numbers are the official metric of exactly these answers, in shard order.
    answers = [r["answer"] for r in results]
    expected = round(100 * sum(vqa_accuracy(a, qa["answers"]) for a, qa in zip(answers, qas)) / len(qas), 2)
    assert metrics["overall"] == expected >= 95.0
    assert set(metrics["perAnswerType"]) == {qa["answer_type"] for qa in qas}
    assert "overall:" in capsys.readouterr().out


def test_export_of_a_vqa_run_matches_its_final_folder(classifier, assets, tmp_path):
    _, result, final = classifier
    out = tmp_path / "exported"
    assert main(["export", result["run_dir"], "--out", str(out)]) == 0
    assert json.loads((out / VOCAB_FILE).read_text()) == json.loads((final / VOCAB_FILE).read_text())
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in assets["items"] for _ in s["json"]["qa"]]
    questions = [qa["question"] for s in assets["items"] for qa in s["json"]["qa"]]
    a, b = load_vqa_answerer(out, device="cpu"), load_vqa_answerer(final, device="cpu")
    assert a.top_k(images, questions, 5) == b.top_k(images, questions, 5)


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("mm: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_give_one_line_errors(classifier, assets, image_file, tmp_path, capsys):
    _, _, final = classifier
    q = ["--question", "what color is the circle?"]
    _one_line_error(capsys, ["answer", "--model", str(final), "--image", str(tmp_path / "missing.png"), *q],
                    "image not found")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    _one_line_error(capsys, ["answer", "--model", str(final), "--image", str(broken), *q], "cannot read image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_file.read_bytes()[:60])
    _one_line_error(capsys, ["answer", "--model", str(final), "--image", str(truncated), *q], "cannot read image")
    _one_line_error(capsys, ["answer", "--model", str(final), "--image", str(image_file), "--question", "  \n"],
                    "question is empty")
    # The pretrained folder has no VQA head; a random folder is no model at all.
    _one_line_error(capsys, ["answer", "--model", str(assets["init"]), "--image", str(image_file), *q],
                    "no VQA head")
    _one_line_error(capsys, ["answer", "--model", str(tmp_path), "--image", str(image_file), *q],
                    "not an exported mm model")
    _one_line_error(capsys, ["eval", "vqa", "--model", str(assets["init"]), "--data", str(assets["shards"])],
                    "no VQA head")
    bad_vocab = tmp_path / "bad_vocab"
    bad_vocab.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad_vocab / name).write_bytes((final / name).read_bytes())
    (bad_vocab / VOCAB_FILE).write_text('{"head": "classifier", "answers": []}')
    _one_line_error(capsys, ["answer", "--model", str(bad_vocab), "--image", str(image_file), *q],
                    "answer strings")
