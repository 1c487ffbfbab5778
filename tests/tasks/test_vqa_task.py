"""VQA fine-tuning: answer vocabulary and soft scores, both heads overfit, export round trip."""

import json

import pytest
import torch

from mm.errors import MMError
from mm.eval.vqa import vqa_accuracy
from mm.generation.vqa import VOCAB_FILE, load_vqa_answerer, save_answer_vocab
from mm.tasks.vqa import VQATask, build_answer_vocab, most_common_answer, soft_targets

from .vqa_util import shared_assets, shared_run, vqa_config


@pytest.fixture
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Vocabulary and targets on a constructed case


QUESTIONS = [
    ["yes"] * 10,                                              # yes 10
    ["Yes", "yes.", "no", "no", "no", "yes", "yes", "YES", "no", "yes"],  # yes 6, no 4
    ["two", "2", "2 ", "2\n", "the 2", "3", "3", "three", "2", "2"],  # 2 7 (two, the 2), 3 3
    ["red", "Red", "red!", "the red one", "blue", "", "a", "red", "red", "blue"],  # red 5, blue 2, "red 1" 1 (number words become digits)
]


def test_answer_vocab_counts_normalised_answers_and_breaks_ties_by_text():
    answers, counts = build_answer_vocab(QUESTIONS, 10)
    # "" and "a" normalise to nothing and are dropped; "yes." "YES" "the 2" "two" "red!" merge
    assert dict(zip(answers, counts)) == {"yes": 16, "2": 7, "red": 5, "no": 4, "3": 3, "blue": 2, "red 1": 1}
    assert answers == ["yes", "2", "red", "no", "3", "blue", "red 1"]
    top3, _ = build_answer_vocab(QUESTIONS, 3)
    assert top3 == ["yes", "2", "red"]
    tied, _ = build_answer_vocab([["y", "x", "z"], ["z", "x", "y"]], 2)  # all count 2: alphabetical
    assert tied == ["x", "y"]
    assert build_answer_vocab(reversed(QUESTIONS), 10)[0] == answers  # order of reading does not matter
    with pytest.raises(MMError):
        build_answer_vocab([["", "the"]], 5)


def test_soft_scores_are_min_count_over_three():
    answers, _ = build_answer_vocab(QUESTIONS, 5)  # yes, 2, red, no, 3 (blue left out)
    index = {a: i for i, a in enumerate(answers)}
    t = soft_targets(QUESTIONS, index)
    expected = torch.tensor([
        [1.0, 0, 0, 0, 0],
        [1.0, 0, 0, 1.0, 0],          # yes 6 -> 1, no 4 -> 1
        [0, 1.0, 0, 0, 1.0],          # 2 x7 -> 1, 3 x3 -> 1
        [0, 0, 1.0, 0, 0],            # red 5; blue (2) is not in the vocabulary
    ])
    assert torch.equal(t, expected)
    t = soft_targets([["no", "x", "x", "no", "y", "y", "y", "y", "yes", "z"]], index)
    assert t[0, index["no"]].item() == pytest.approx(2 / 3)
    assert t[0, index["yes"]].item() == pytest.approx(1 / 3)
    assert t[0].sum().item() == pytest.approx(1.0)
    assert most_common_answer(QUESTIONS[2]) == "2"
    assert most_common_answer(["y", "x", "x", "y"]) == "x"  # tie: by text


def test_setup_builds_saves_and_resumes_the_vocabulary(assets, tmp_path):
    cfg = vqa_config(tmp_path / "run", assets["init"], assets["shards"])
    task = VQATask(cfg)
    task.setup(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / VOCAB_FILE).read_text())
    expected, counts = build_answer_vocab(
        [qa["answers"] for s in assets["items"] for qa in s["json"]["qa"]], cfg.vqa.answer_vocab_size)
    assert saved["answers"] == task.answers == expected and saved["counts"] == counts
    assert saved["head"] == "classifier" and task.model.config.vqa_answers == len(expected)
    assert task.model.vqa_logits(torch.zeros(2, 3, task.model.config.width)).shape == (2, len(expected))
    # A resumed run reads the saved list (a changed data set must not reshape the head).
    save_answer_vocab(tmp_path / "run" / VOCAB_FILE, ["yes", "no"], [5, 4], "classifier", False)
    again = VQATask(cfg)
    again.setup(tmp_path / "run")
    assert again.answers == ["yes", "no"] and again.model.config.vqa_answers == 2
    cfg.vqa.head = "generative"
    with pytest.raises(MMError, match="vqa.head=classifier"):
        VQATask(cfg).setup(tmp_path / "run")


def test_task_refuses_mismatched_inputs(assets, tmp_path):
    with pytest.raises(MMError, match="init_from"):
        VQATask(vqa_config(tmp_path, tmp_path / "nothing", assets["shards"]))
    with pytest.raises(MMError, match="data.image_size=16"):
        VQATask(vqa_config(tmp_path, assets["init"], assets["shards"], data__image_size=32))


# ---------------------------------------------------------------------------------------------
# Overfitting through the trainer, export, reload


def _pil_batch(items):
    import io

    from PIL import Image

    images, questions, refs = [], [], []
    for s in items:
        for qa in s["json"]["qa"]:
            images.append(Image.open(io.BytesIO(s["png"])).convert("RGB"))
            questions.append(qa["question"])
            refs.append(qa["answers"])
    return images, questions, refs


def _accuracy(answers, refs):
    return 100 * sum(vqa_accuracy(a, r) for a, r in zip(answers, refs)) / len(refs)


def test_classifier_head_overfits_and_round_trips(assets, tmp_path_factory):
    trainer, result, final = shared_run(tmp_path_factory, "classifier")
    assert result["val/vqa_accuracy"] >= 95.0, result
    for name in ("config.json", "model.safetensors", "tokenizer", VOCAB_FILE):
        assert (final / name).exists(), name
    vocab = json.loads((final / VOCAB_FILE).read_text())
    assert vocab["head"] == "classifier"
    assert json.loads((final / "config.json").read_text())["vqa_answers"] == len(vocab["answers"])

    images, questions, refs = _pil_batch(assets["items"])
    in_memory = trainer.task.answerer()
    loaded = load_vqa_answerer(final, device="cpu")
    assert loaded(images, questions) == in_memory(images, questions)
    assert _accuracy(loaded(images, questions), refs) >= 95.0
    top_a, top_b = loaded.top_k(images, questions, 5), in_memory.top_k(images, questions, 5)
    assert [[a for a, _ in row] for row in top_a] == [[a for a, _ in row] for row in top_b]
    assert torch.allclose(torch.tensor([[s for _, s in r] for r in top_a]),
                          torch.tensor([[s for _, s in r] for r in top_b]), atol=1e-6)
    assert all(len(row) == 5 and row[0][1] >= row[-1][1] for row in top_a)


def test_generative_head_overfits_greedy_and_ranked(assets, tmp_path_factory):
    trainer, result, final = shared_run(tmp_path_factory, "generative")
    assert result["val/vqa_accuracy"] >= 95.0, result
    assert json.loads((final / VOCAB_FILE).read_text())["head"] == "generative"
    assert json.loads((final / "config.json").read_text())["vqa_answers"] == 0

    images, questions, refs = _pil_batch(assets["items"])
    loaded = load_vqa_answerer(final, device="cpu")
    greedy = loaded(images, questions)
    assert greedy == trainer.task.answerer()(images, questions)
    assert _accuracy(greedy, refs) >= 95.0
    loaded.rank = True  # ALBEF/BLIP: rank the answer list by decoder log-likelihood
    ranked = loaded.top_k(images, questions, 3)
    assert all(a in loaded.answers for row in ranked for a, _ in row)
    assert all(row[0][1] >= row[1][1] >= row[2][1] for row in ranked)
    assert _accuracy([row[0][0] for row in ranked], refs) >= 95.0


def test_shipped_shapes_config_pretrains_first_and_fine_tunes():
    from pathlib import Path

    from mm.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "vqa" / "shapes.yaml", ["run.dir=/tmp/unused"])
    assert cfg.run.stage == "vqa" and cfg.run.init_from == "" and cfg.data.train == ["builtin:shapes"]
    pre = load_config(cfg.vqa.pretrain_config)  # resolved relative to the YAML file
    assert pre.run.stage == "pretrain"
    assert (pre.data.image_size, pre.data.text_max_len) == (cfg.data.image_size, cfg.data.text_max_len)
