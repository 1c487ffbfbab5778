"""The VQAv2 metric against scores derived by hand from the official rules.

Leave-one-out arithmetic used below, with m of the 10 references equal to the prediction:
  m = 1: the matching reference left out -> 0 matches -> 0; the 9 others -> 1 match -> 1/3;
         mean = 9 * (1/3) / 10 = 0.3
  m = 2: 2 matching left out -> 1/3 each; 8 others -> 2/3 each; (2/3 + 16/3) / 10 = 0.6
  m = 3: 3 matching left out -> 2/3 each; 7 others -> 3/3 = 1; (2 + 7) / 10 = 0.9
  m >= 4: every subset of 9 still holds >= 3 matches -> 1.0
"""

import json

import pytest

from mm.cli import main
from mm.errors import MMError
from mm.eval.vqa import (
    evaluate_vqa,
    normalize_answer,
    process_punctuation,
    soft_score,
    vqa_accuracy,
)


def refs(*pairs):
    """refs(("yes", 3), ("no", 7)) -> 10 reference strings."""
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


# --- Normalisation rules ---------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("yes.", "yes"),                      # period not followed by a digit is dropped
    ("2.5", "2.5"),                       # decimal point survives
    (".5", ".5"),                         # period followed by a digit survives
    ("5.", "5"),
    ("e.g.", "eg"),
    ("1,000", "1000"),                    # digit-comma-digit: all punctuation deleted, not spaced
    ("1,000.", "1000"),                   # ... and the final period dropped
    ("2,3 and a-b", "23 and ab"),         # digit comma digit anywhere deletes every mark, '-' too
    ("red, white", "red white"),          # ',' touches a space -> deleted
    ("red,white", "red white"),           # ',' between letters -> space
    ("t-shirt", "t shirt"),
    ("red/blue /green", "redblue green"),  # ' /' somewhere -> EVERY '/' is deleted
    ("hello!", "hello"),
    ("(red)", "red"),
    ("it's", "it's"),                     # apostrophe is not punctuation here
    ("10:30", "10:30"),                   # neither is ':'
    ("$5", "$5"),                         # nor '$'
    ("Two", "2"),                         # lowercase then number words
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                 # only none/zero..ten are mapped
    ("three.", "3"),                      # period dropped before the number word is mapped
    ("A dog", "dog"),                     # articles dropped
    ("an apple", "apple"),
    ("the", ""),
    ("the 3", "3"),
    ("dont", "don't"),                    # contraction table
    ("whats", "what's"),
    ("cant", "can't"),
    ("Im", "im"),                         # key "Im" is capitalised in the table: never matches
    ("somebody'd", "somebodyd"),          # the table's reverse entry, kept as is
    ("red   ball", "red ball"),           # whitespace runs collapse
    ("  \tyes\n", "yes"),                 # newlines/tabs -> spaces, then strip
    ("red\nball", "red ball"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_rule_removes_at_most_32_periods():
    # Official: periodStrip.sub("", text, re.UNICODE) passes re.UNICODE (32) as `count`.
    assert process_punctuation("." * 40) == "." * 8


# --- Per-question accuracy -------------------------------------------------------------------

@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_arithmetic(m, expected):
    gts = ["cat"] * m + ["dog"] * (10 - m)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, gts, expected", [
    # All 10 references identical: NO normalisation, exact string match only.
    ("Yes", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 10, 1.0),
    ("two", ["2"] * 10, 0.0),
    ("2", ["2"] * 10, 1.0),
    ("yes.", ["yes"] * 10, 0.0),
    # ... but whitespace is still cleaned, in the prediction and the references.
    (" yes \n", ["yes"] * 10, 1.0),
    ("yes", ["yes\n"] + ["yes"] * 9, 1.0),             # references identical after stripping
    # References not all identical: both sides normalised.
    ("Yes", refs(("yes", 9), ("no", 1)), 1.0),
    ("two", refs(("two", 9), ("2", 1)), 1.0),          # every reference becomes "2"
    ("Yes.", refs(("yes", 1), ("no", 9)), 0.3),
    ("the dog", refs(("a dog", 2), ("cat", 8)), 0.6),
    ("1000", refs(("1,000", 3), ("100", 7)), 0.9),
    ("2.5", refs(("2.5", 1), ("25", 9)), 0.3),         # "2.5" != "25"
    ("dont know", refs(("don't know", 3), ("no", 7)), 0.9),
    ("whats up", refs(("what's up", 4), ("no", 6)), 1.0),
    ("t-shirt", refs(("t shirt", 2), ("shirt", 8)), 0.6),
    ("red/blue /green", refs(("redblue green", 1), ("red blue green", 9)), 0.3),
    ("\tred ball\n", refs(("red  ball", 2), ("ball", 8)), 0.6),
    # Empty predictions match nothing ... unless references normalise to "" too.
    ("", refs(("yes", 5), ("no", 5)), 0.0),
    ("", refs(("the", 2), ("yes", 8)), 0.6),           # "the" -> ""
    ("   ", refs(("the", 4), ("a", 6)), 1.0),          # every reference -> ""
])
def test_vqa_accuracy_cases(prediction, gts, expected):
    assert vqa_accuracy(prediction, gts) == pytest.approx(expected)


def test_soft_score():
    assert [soft_score(c) for c in range(5)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])


def test_bad_inputs_are_mmerrors():
    with pytest.raises(MMError):
        vqa_accuracy("yes", [])
    with pytest.raises(MMError):
        vqa_accuracy(None, ["yes"] * 10)


# --- Whole-file evaluation -------------------------------------------------------------------

def official_files():
    """Four questions: accuracies 1.0 (yes/no), 0.3 and 0.6 (number), 0.0 (other)."""
    spec = [
        (1, "is the", "yes/no", refs(("yes", 10)), "yes"),
        (2, "how many", "number", refs(("2", 1), ("3", 9)), "two"),
        (3, "how many", "number", refs(("4", 2), ("5", 8)), "4"),
        (4, "what color is the", "other", refs(("red", 5), ("blue", 5)), "green"),
    ]
    anns = [{"question_id": q, "image_id": 10 + q, "question_type": qt, "answer_type": at,
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                         for i, a in enumerate(gts)],
             "multiple_choice_answer": gts[-1]} for q, qt, at, gts, _ in spec]
    questions = {"questions": [{"question_id": q, "image_id": 10 + q, "question": f"q{q}?"}
                               for q, *_ in spec]}
    results = [{"question_id": q, "answer": pred} for q, *_, pred in spec]
    return results, {"annotations": anns}, questions


def test_evaluate_vqa_breakdown_and_rounding():
    results, anns, questions = official_files()
    m = evaluate_vqa(results, anns, questions)
    # overall: 100 * (1 + 0.3 + 0.6 + 0) / 4 = 47.5
    assert m["overall"] == 47.5
    # number: 100 * 0.9 / 2 = 45.0 ; yes/no 100 ; other 0
    assert m["perAnswerType"] == {"yes/no": 100.0, "number": 45.0, "other": 0.0}
    assert m["perQuestionType"] == {"is the": 100.0, "how many": 45.0, "what color is the": 0.0}
    assert m["perQuestion"] == {1: 100.0, 2: 30.0, 3: 60.0, 4: 0.0}


def test_evaluate_vqa_rounds_to_two_decimals():
    results, anns, questions = official_files()
    results = results[:3]  # drop question 4 from both files
    anns = {"annotations": anns["annotations"][:3]}
    m = evaluate_vqa(results, anns, questions)
    # 100 * 1.9 / 3 = 63.333... -> 63.33
    assert m["overall"] == 63.33
    results[0]["answer"] = "no"  # (0 + 0.3 + 0.6) / 3 = 0.3 -> 30.0; number unchanged
    results[1]["answer"] = "3"   # 9 of 10 match -> 1.0: (0 + 1 + 0.6) / 3 = 53.333 -> 53.33
    m = evaluate_vqa(results, anns, questions)
    assert m["overall"] == 53.33
    assert m["perAnswerType"]["number"] == 80.0
    results[2]["answer"] = "5"   # (0 + 1 + 1) / 3 = 66.666 -> 66.67
    assert evaluate_vqa(results, anns, questions)["overall"] == 66.67


@pytest.mark.parametrize("change", ["missing", "extra", "duplicate"])
def test_results_must_cover_exactly_the_annotated_questions(change):
    results, anns, questions = official_files()
    if change == "missing":
        results = results[:-1]
    elif change == "extra":
        results = results + [{"question_id": 99, "answer": "yes"}]
    else:
        results = results + [dict(results[0])]
    with pytest.raises(MMError, match="question"):
        evaluate_vqa(results, anns, questions)


def test_questions_file_must_match():
    results, anns, questions = official_files()
    questions["questions"] = questions["questions"][:2]
    with pytest.raises(MMError, match="questions file"):
        evaluate_vqa(results, anns, questions)


def test_cli_form_a(tmp_path, capsys):
    results, anns, questions = official_files()
    paths = {}
    for name, obj in [("res", results), ("ann", anns), ("ques", questions)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = tmp_path / "sub" / "m.json"
    rc = main(["eval", "vqa", "--predictions", str(paths["res"]), "--annotations", str(paths["ann"]),
               "--questions", str(paths["ques"]), "--out", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    assert set(written) == {"overall", "perAnswerType", "perQuestionType"}
    assert written["overall"] == 47.5 and written["perAnswerType"]["number"] == 45.0
    assert "overall: 47.50" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    results, anns, questions = official_files()
    (tmp_path / "res.json").write_text(json.dumps(results[:2]))
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    (tmp_path / "ques.json").write_text("{not json")
    base = ["eval", "vqa", "--predictions", str(tmp_path / "res.json"),
            "--annotations", str(tmp_path / "ann.json")]
    assert main(base + ["--questions", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(base + ["--questions", str(tmp_path / "ques.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "ques.json").write_text(json.dumps(questions))
    assert main(base + ["--questions", str(tmp_path / "ques.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm: error: results do not correspond") and err.count("\n") == 1


def test_cli_form_b_without_model_folder(tmp_path, capsys):
    assert main(["eval", "vqa", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert "mm train configs/vqa/shapes.yaml" in capsys.readouterr().err


def test_cli_form_b_reads_shards_and_scores_model_answers(tmp_path, monkeypatch, capsys):
    import io

    from PIL import Image

    import mm.generation.vqa
    from mm.data.shards import ShardWriter

    def png():
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    data = tmp_path / "shards"
    with ShardWriter(data, samples_per_shard=1) as w:  # two shards, read in order
        w.write({"__key__": "000000", "png": png(), "json": {"caption": "x", "qa": [
            {"question": "what color is the circle?", "answers": ["red"] * 10, "answer_type": "other"},
            {"question": "how many shapes?", "answers": ["2"] * 9 + ["two"], "answer_type": "number"}]}})
        w.write({"__key__": "000001", "png": png(), "json": {"caption": "y", "qa": [
            {"question": "what color is the square?", "answers": ["blue"] * 10, "answer_type": "other"}]}})

    batches = []

    def load_vqa_answerer(model_dir):
        def answer(images, questions):
            batches.append(len(images))
            assert all(im.mode == "RGB" and im.size == (8, 8) for im in images)
            return ["red" if q.startswith("what color") else "two" for q in questions]
        return answer

    monkeypatch.setattr(mm.generation.vqa, "load_vqa_answerer", load_vqa_answerer)
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "m.json"
    rc = main(["eval", "vqa", "--model", str(model), "--data", str(data), "--out", str(out),
               "--batch-size", "2"])
    assert rc == 0 and batches == [2, 1]
    m = json.loads(out.read_text())
    # red vs 10x red -> 1; "two" vs 9x "2" + "two" -> normalised, 10 matches -> 1; red vs blue -> 0
    assert m["overall"] == 66.67
    assert m["perAnswerType"] == {"other": 50.0, "number": 100.0}
    assert m["perQuestionType"] == {"what color": 50.0, "how many": 100.0}
    results = json.loads((tmp_path / "m_results.json").read_text())
    assert results == [{"question_id": 0, "answer": "red"}, {"question_id": 1, "answer": "two"},
                       {"question_id": 2, "answer": "red"}]
