"""VQA shards with one top-level question per sample (issue 7: {question, answers, answer_type})."""

import io

from PIL import Image

from mm.data.pipeline import make_loader
from mm.data.shards import ShardWriter, questions_of


def png():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_questions_of_both_formats():
    qa = [{"question": "what color?", "answers": ["red"] * 10, "answer_type": "other"}]
    assert questions_of({"qa": qa}) == qa
    assert questions_of({"question": "what color?", "answers": ["red"] * 10, "answer_type": "other",
                         "image_id": 3}) == qa
    assert questions_of({"caption": "x"}) is None and questions_of("nope") is None


def test_pipeline_reads_top_level_questions(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=4) as w:
        for i in range(8):
            w.write({"__key__": f"{i:06d}", "png": png(), "json": {
                "question": f"how many {i}?", "answers": [str(i)] * 10, "answer_type": "number"}})
    loader = make_loader([str(tmp_path)], batch_size=4, seed=0, mode="vqa", train=False)
    batches = list(loader)
    questions = [q for b in batches for q in b["question"]]
    assert sorted(questions) == sorted(f"how many {i}?" for i in range(8))
    assert all(a == [a[0]] * 10 for b in batches for a in b["answers"])
    assert sum(loader.skipped.values()) == 0
