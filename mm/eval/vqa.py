"""The official VQAv2 accuracy (GT-Vision-Lab/VQA ``vqaEval.py``), re-derived rule by rule.

Per question, with the 10 human answers as references:

1. Newlines and tabs become spaces and outer spaces are stripped, in the prediction and in every
   reference.
2. Only if the references are NOT all identical are references and prediction normalised:
   ``process_punctuation`` then ``process_digit_article`` (below). When all 10 references are
   the same string nothing is normalised, so "Yes" scores 0 against ten "yes" — a quirk of the
   official tool that we keep on purpose, because published numbers include it.
3. For each reference, leave it out; the prediction scores min(1, matches among the other 9 / 3).
   The question's accuracy is the mean over the 10 leave-one-out subsets. With m matching
   references this gives 0, 0.3, 0.6, 0.9 and 1.0 for m = 0, 1, 2, 3, >= 4.
4. Overall, per answer type and per question type: round(100 * sum / count, 2).

(The official tool removes the left-out answer by dict equality; every official file has
distinct ``answer_id`` s, so this is leave-one-out by position, which is what we do. An older
revision of vqaEval.py normalised the prediction always and references by punctuation only; we
follow the current rules, as DESIGN.md §6 says.)

``mm eval vqa`` has two forms: (a) official files in, official numbers out; (b) ``--model DIR
--data SHARDS`` answers the shard questions with a VQA model, writes the results file in the
official format and scores it like (a).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from mm.data.shards import qa_question_type
from mm.errors import MMError

# --- The official normalisation tables ------------------------------------------------------
# Copied as data, character for character, including the official oddities (capitalised keys
# such as "Im" that can never match after lowercasing, and "somebody'd" -> "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]  # not "." (own rule), not "'" or ":"
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that
# always succeeds, so the rule is "drop every period not followed by a digit" ("2.5" survives).
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the third argument is `count`,
# so at most re.UNICODE == 32 periods are removed. Kept for exactness.
PERIOD_MAX_REMOVALS = 32


def clean_whitespace(text: str) -> str:
    """Newlines and tabs -> spaces, then strip outer spaces (applied to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation rule.

    Each punctuation mark is deleted if it touches a space anywhere in the answer (``"red, blue"``)
    or if the answer contains a digit-comma-digit (``"1,000"``, and then ALL marks are deleted);
    otherwise it becomes a space (``"t-shirt"`` -> ``"t shirt"``). The decision is made on the
    original text, mark by mark. Periods are dropped unless a digit follows.
    """
    out = text
    has_number_comma = DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out, count=PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop a/an/the, expand contractions, single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """The full official normalisation of one answer (whitespace, punctuation, digits/articles).

    Also what training targets use. Remember that the metric skips it when the references are
    all identical; ``vqa_accuracy`` handles that.
    """
    return process_digit_article(process_punctuation(clean_whitespace(s)))


def soft_score(count: int) -> float:
    """Training target for an answer given by ``count`` annotators: min(count / 3, 1)."""
    return min(count / 3.0, 1.0)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Accuracy of one prediction against the (usually 10) reference answers, in 0..1."""
    if not isinstance(prediction, str):
        raise MMError(f"a VQA prediction must be a string, got {type(prediction).__name__}: {prediction!r}")
    if not gt_answers:
        raise MMError("a VQA question has no reference answers; each needs its 10 human answers")
    refs = [clean_whitespace(a) for a in gt_answers]
    pred = clean_whitespace(prediction)
    if len(set(refs)) > 1:  # all-identical references are compared raw (official behaviour)
        refs = [process_digit_article(process_punctuation(a)) for a in refs]
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for left_out in range(len(refs)):
        matches = sum(1 for j, a in enumerate(refs) if j != left_out and a == pred)
        accs.append(min(1, float(matches) / 3))
    return float(sum(accs)) / len(accs)


# --- Whole-file evaluation -----------------------------------------------------------------

def _percent(values: list[float]) -> float:
    # Same arithmetic order as the official tool so rounding ties come out identical.
    return round(100 * float(sum(values)) / len(values), 2)


def _check_annotations(annotations: dict) -> list[dict]:
    anns = annotations.get("annotations") if isinstance(annotations, dict) else None
    if not isinstance(anns, list) or not anns:
        raise MMError('annotations must be the official VQA JSON {"annotations": [...]} '
                      "with at least one question")
    seen = set()
    for ann in anns:
        missing = [k for k in ("question_id", "question_type", "answer_type", "answers")
                   if not isinstance(ann, dict) or k not in ann]
        if missing:
            qid = ann.get("question_id", "?") if isinstance(ann, dict) else "?"
            raise MMError(f"annotation for question {qid} lacks {', '.join(missing)}; "
                          "use the official VQAv2 annotation format")
        if ann["question_id"] in seen:
            raise MMError(f"question {ann['question_id']} is annotated twice; "
                          "each question id must appear once")
        seen.add(ann["question_id"])
        answers = ann["answers"]
        if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise MMError(f"question {ann['question_id']} needs a list of answers [{{\"answer\": str, ...}}]")
    return anns


def _check_results(results: list, annotated: set) -> dict:
    if not isinstance(results, list):
        raise MMError('results must be a JSON array [{"question_id": ..., "answer": ...}] (official format)')
    by_qid = {}
    for r in results:
        if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("answer"), str):
            raise MMError(f'every result needs "question_id" and a string "answer"; got {str(r)[:80]}')
        if r["question_id"] in by_qid:
            raise MMError(f"question {r['question_id']} has two results; give one answer per question")
        by_qid[r["question_id"]] = r["answer"]
    missing = annotated - by_qid.keys()
    extra = by_qid.keys() - annotated
    if missing or extra:
        # The official loadRes asserts exactly this: results must cover exactly the annotated ids.
        raise MMError(
            f"results do not correspond to the annotations: {len(missing)} annotated questions have no "
            f"answer (e.g. {sorted(missing, key=str)[:3]}) and {len(extra)} answered questions are not "
            f"annotated (e.g. {sorted(extra, key=str)[:3]}); answer exactly the annotated question ids")
    return by_qid


def _check_questions(questions, annotated: set) -> None:
    if questions is None:
        return
    qs = questions.get("questions") if isinstance(questions, dict) else None
    if not isinstance(qs, list):
        raise MMError('questions must be the official VQA JSON '
                      '{"questions": [{"question_id", "image_id", "question"}]}')
    known = {q.get("question_id") for q in qs if isinstance(q, dict)}
    unknown = annotated - known
    if unknown:
        raise MMError(f"{len(unknown)} annotated questions are missing from the questions file "
                      f"(e.g. {sorted(unknown, key=str)[:3]}); use the questions file of the same split")


def evaluate_vqa(results: list, annotations: dict, questions: dict | None = None) -> dict:
    """Official VQAv2 numbers from the official JSON structures.

    Returns ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float},
    "perQuestion": {question_id: float}}``, all in percent rounded to 2 decimals. Raises MMError
    when the results do not cover exactly the annotated question ids.
    """
    anns = _check_annotations(annotations)
    annotated = {a["question_id"] for a in anns}
    _check_questions(questions, annotated)
    answer_of = _check_results(results, annotated)

    all_accs, per_answer_type, per_question_type, per_question = [], {}, {}, {}
    for ann in anns:  # annotation order, like the official tool (sums are order-sensitive)
        acc = vqa_accuracy(answer_of[ann["question_id"]], [a["answer"] for a in ann["answers"]])
        all_accs.append(acc)
        per_question_type.setdefault(ann["question_type"], []).append(acc)
        per_answer_type.setdefault(ann["answer_type"], []).append(acc)
        per_question[ann["question_id"]] = round(100 * acc, 2)
    return {
        "overall": _percent(all_accs),
        "perAnswerType": {t: _percent(v) for t, v in per_answer_type.items()},
        "perQuestionType": {t: _percent(v) for t, v in per_question_type.items()},
        "perQuestion": per_question,
    }


# --- Form (b): answers from a model on VQA shards -------------------------------------------

def iter_vqa_shards(data: str):
    """Yield (image bytes, image extension, sample key, qa dict) for every question in the shards.

    Shards follow DESIGN.md §4: ``{key}.json`` with ``qa: [{question, answers (10), answer_type}]``
    (or a single ``question``/``answers``/``answer_type`` at top level) beside an image.
    """
    import webdataset as wds

    from mm.data.shards import expand_shards

    for sample in wds.WebDataset(expand_shards(data), shardshuffle=False, empty_check=False):
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        if ext is None or "json" not in sample:
            continue
        meta = json.loads(sample["json"])
        qas = meta.get("qa") or ([meta] if "question" in meta and "answers" in meta else [])
        for qa in qas:
            if not isinstance(qa, dict) or "question" not in qa or not qa.get("answers"):
                raise MMError(f"sample {sample['__key__']} in {data} has a VQA entry without "
                              "question/answers; each needs a question and its human answers")
            yield sample[ext], ext, sample["__key__"], qa


def vqa_files_from_samples(samples) -> tuple[dict, dict, list]:
    """Official-format annotations and questions from (key, qa) pairs, ids numbered in order."""
    anns, qs, image_ids = [], [], {}
    for key, qa in samples:
        image_id = image_ids.setdefault(key, len(image_ids))
        qid = len(qs)
        qs.append({"question_id": qid, "image_id": image_id, "question": qa["question"], "key": key})
        anns.append({
            "question_id": qid, "image_id": image_id,
            "question_type": qa_question_type(qa),
            "answer_type": qa.get("answer_type", "other"),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(qa["answers"])],
            # official: the most frequent human answer
            "multiple_choice_answer": qa.get("multiple_choice_answer",
                                             Counter(qa["answers"]).most_common(1)[0][0]),
        })
    return {"annotations": anns}, {"questions": qs}, [q["question_id"] for q in qs]


def results_from_model(args: argparse.Namespace) -> tuple[list, dict, dict]:
    """Form (b): answer every shard question with the model in ``args.model``.

    HOOK for the VQA model: ``mm.generation.vqa.load_vqa_answerer(model_dir)`` returns a callable
    ``answer(images: list[PIL.Image.Image], questions: list[str]) -> list[str]``. Everything
    else here (reading shards, batching, building the official files) is model-independent.
    """
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise MMError("evaluating a model folder needs a VQA model: "
                      "train one with mm train configs/vqa/shapes.yaml")
    if not getattr(args, "data", None):
        raise MMError("--model needs --data SHARDS with VQA questions (e.g. the shapes val split)")
    import io

    from PIL import Image

    import mm.generation.vqa as vqa_generation  # looked up at call time, so tests can stand in for it
    from mm.data.shards import eval_split

    data = eval_split(args.data)  # a data set root -> its test (else val) split, said on stderr
    answer = vqa_generation.load_vqa_answerer(str(model_dir))

    batch_size = max(1, int(getattr(args, "batch_size", 64) or 64))
    keyed, answers, batch = [], [], []

    def flush():
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in batch]
        answers.extend(answer(images, [q for _, q in batch]))
        batch.clear()

    for image_bytes, _, key, qa in iter_vqa_shards(data):
        keyed.append((key, qa))
        batch.append((image_bytes, qa["question"]))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not keyed:
        raise MMError(f"no VQA questions in {data}; shards need a json with qa [{{question, answers}}]")
    annotations, questions, qids = vqa_files_from_samples(keyed)
    results = [{"question_id": q, "answer": str(a)} for q, a in zip(qids, answers)]
    return results, annotations, questions


# --- Command line ---------------------------------------------------------------------------

def _load_json(path: str | None, what: str, flag: str):
    if not path:
        raise MMError(f"{what} file missing: pass {flag} FILE.json")
    p = Path(path)
    if not p.is_file():
        raise MMError(f"{what} file not found: {p}; check {flag}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MMError(f"{what} file {p} is not valid JSON ({e}); give the official VQA JSON") from None


def _print_metrics(metrics: dict) -> None:
    print(f"overall: {metrics['overall']:.2f}")
    for name in ("perAnswerType", "perQuestionType"):
        print(f"{name}:")
        for t, v in sorted(metrics[name].items()):
            print(f"  {t}: {v:.2f}")


def cli_eval_vqa(args: argparse.Namespace) -> int:
    """``mm eval vqa``: (a) official results + annotations + questions files, or (b) a model."""
    if getattr(args, "model", None):
        if getattr(args, "predictions", None):
            raise MMError("give either --predictions (score a results file) "
                          "or --model (answer with a model), not both")
        results, annotations, questions = results_from_model(args)
        if args.out:  # the results file of form (b), beside the metrics
            res_path = Path(args.out).with_name(Path(args.out).stem + "_results.json")
            res_path.parent.mkdir(parents=True, exist_ok=True)
            res_path.write_text(json.dumps(results))
            print(f"results: {res_path}")
    else:
        if not args.predictions:
            raise MMError("mm eval vqa needs --predictions RES.json --annotations ANN.json "
                          "--questions QUES.json, or --model DIR --data SHARDS")
        results = _load_json(args.predictions, "results", "--predictions")
        annotations = _load_json(args.annotations, "annotations", "--annotations")
        questions = _load_json(args.questions, "questions", "--questions")
    metrics = evaluate_vqa(results, annotations, questions)
    summary = {k: metrics[k] for k in ("overall", "perAnswerType", "perQuestionType")}
    _print_metrics(summary)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0
