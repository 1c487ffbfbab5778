"""The streaming pipeline: determinism, splitting, equal epochs, corrupt input, exact resume."""

import io
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm.data.pipeline import make_loader
from mm.data.shards import ShardWriter
from mm.data.transforms import crop_box, load_image
from mm.errors import MMError


class ByteTokenizer:
    """Picklable stand-in for mm.data.tokenizer: one id per byte, 0 = padding."""

    def encode(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode())[:max_len]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long) + 1
        return ids, ids != 0


def png(i: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, i: int, qa: int = 0, codes: bool = False) -> dict:
    meta = {"caption": f"caption {key}"}
    if qa:
        meta["qa"] = [{"question": f"q{q} of {key}?", "answers": [f"a{q}"] * 10, "answer_type": "other"}
                      for q in range(qa)]
    s = {"__key__": key, "png": png(i), "txt": f"caption {key}", "json": meta}
    if codes:
        buf = io.BytesIO()
        np.save(buf, np.full((2, 3), i, dtype=np.int16))
        s["codes.npy"] = buf.getvalue()
    return s


def write_shards(folder: Path, counts: list[int], prefix: str = "shards", **kw) -> list[str]:
    """Shards with the given sample counts (uneven allowed); keys are "{prefix}{shard}_{j}"."""
    i = 0
    for shard, n in enumerate(counts):
        with ShardWriter(folder, prefix, samples_per_shard=10**6, start_index=shard) as w:
            for j in range(n):
                w.write(sample(f"{prefix}{shard}_{j:03d}", i, **kw))
                i += 1
    return [str(folder / f"{prefix}-{s:06d}.tar") for s in range(len(counts))]


@pytest.fixture
def shards(tmp_path):
    write_shards(tmp_path, [12, 9, 15, 4, 10, 8])
    return str(tmp_path)


def keys(loader, n):
    return [b["key"] for b in islice(loader, n)]


def test_same_seed_same_order_and_seed_matters(shards):
    a = keys(make_loader([shards], batch_size=4, seed=1, shuffle_buffer=8), 10)
    b = keys(make_loader([shards], batch_size=4, seed=1, shuffle_buffer=8), 10)
    c = keys(make_loader([shards], batch_size=4, seed=2, shuffle_buffer=8), 10)
    assert a == b
    assert a != c


def test_batch_contents(shards):
    loader = make_loader([shards], batch_size=4, seed=0, tokenizer=ByteTokenizer(), text_max_len=12,
                         image_size=16, augment=True)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["caption"] == [f"caption {k}" for k in batch["key"]]
    assert batch["meta"][0]["caption"] == batch["caption"][0]
    assert batch["input_ids"].shape == (4, 12) and batch["attention_mask"].dtype == torch.bool
    assert "codes" not in batch and batch["skipped"] == {}
    assert loader.state_dict()["batch"] == 1


def test_eval_is_one_ordered_pass_split_by_rank(shards):
    all_keys = [k for b in make_loader([shards], batch_size=5, seed=0, train=False) for k in b["key"]]
    assert len(all_keys) == 58 and all_keys == sorted(all_keys)
    split = [[k for b in make_loader([shards], batch_size=5, seed=0, train=False, rank=r, world_size=2,
                                     num_workers=w) for k in b["key"]] for r, w in ((0, 0), (1, 2))]
    assert split[0] == all_keys[0::2] and split[1] == all_keys[1::2]


def test_two_ranks_two_workers_disjoint_with_equal_counts(tmp_path):
    write_shards(tmp_path, [14, 3, 9, 6, 11, 2, 8, 5])  # uneven: 58 samples
    seen, lengths = [], []
    for rank in range(2):
        loader = make_loader([str(tmp_path)], batch_size=4, seed=3, rank=rank, world_size=2,
                             num_workers=2, shuffle_buffer=8)
        lengths.append(loader.batches_per_epoch)
        batches = list(islice(loader, loader.batches_per_epoch))
        assert len(batches) == loader.batches_per_epoch and all(len(b["key"]) == 4 for b in batches)
        seen.append({k for b in batches for k in b["key"]})
    assert lengths == [58 // 8, 58 // 8]
    assert not seen[0] & seen[1]


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    write_shards(tmp_path, [20, 7])  # 2 shards, 2 ranks x 2 workers = 4 slots
    seen = []
    for rank in range(2):
        loader = make_loader([str(tmp_path)], batch_size=3, seed=0, rank=rank, world_size=2, num_workers=2)
        seen.append({k for b in islice(loader, loader.batches_per_epoch) for k in b["key"]})
    assert not seen[0] & seen[1]


def test_uneven_shards_give_equal_batch_counts_per_epoch(tmp_path):
    write_shards(tmp_path, [30, 1, 2, 1])  # rank 1's shards alone would hold 2 or 3 samples
    for rank in range(2):
        loader = make_loader([str(tmp_path)], batch_size=4, seed=0, rank=rank, world_size=2, num_workers=0)
        assert loader.batches_per_epoch == 34 // 8
        batches = list(islice(loader, 3 * loader.batches_per_epoch))
        assert len(batches) == 3 * loader.batches_per_epoch and all(len(b["key"]) == 4 for b in batches)
        assert loader.epoch == 3


def test_truncated_shard_in_the_middle_is_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path, [6, 6, 6, 6])
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with tarfile.open(urls[2]) as tar:  # cut before sample 3's first member: only sizes.json tells
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("shards2_003."))
    Path(urls[2]).write_bytes(Path(urls[2]).read_bytes()[:cut])
    loader = make_loader([str(tmp_path)], batch_size=4, seed=0, train=False)
    got = [k for b in loader for k in b["key"]]
    assert loader.skipped == {"truncated_shard": 2}
    assert {f"shards0_{j:03d}" for j in range(6)} | {f"shards3_{j:03d}" for j in range(6)} <= set(got)
    assert {"shards2_000", "shards2_001"} <= set(got) and len(got) < 20
    train = make_loader([str(tmp_path)], batch_size=4, seed=0, num_workers=2)
    assert len(list(islice(train, 12))) == 12 and train.skipped.get("truncated_shard", 0) > 0


def test_corrupt_samples_counted_by_reason(tmp_path):
    with ShardWriter(tmp_path, "shards", samples_per_shard=100) as w:
        for j in range(10):
            w.write(sample(f"good{j}", j))
        w.write({"__key__": "text", "png": b"this is not an image", "txt": "x"})
        w.write({"__key__": "empty", "png": b"", "txt": "x"})
        w.write({"__key__": "nocap", "png": png(1)})
        w.write({"__key__": "blankcap", "png": png(1), "txt": "   "})
        w.write({"__key__": "noimg", "txt": "x"})
        w.write({"__key__": "badjson", "png": png(1), "txt": "x", "json": b"{not json"})
        w.write({"__key__": "cutpng", "png": png(5, size=32)[:-30], "txt": "x"})
    loader = make_loader([str(tmp_path)], batch_size=3, seed=0, train=False)
    got = [k for b in loader for k in b["key"]]
    assert sorted(got) == sorted(f"good{j}" for j in range(10))
    assert loader.skipped == {"not_image": 2, "empty_file": 1, "missing_caption": 2,
                              "missing_image": 1, "bad_json": 1}
    # pixels only: a missing caption is fine
    image = make_loader([str(tmp_path)], batch_size=3, seed=0, train=False, mode="image")
    assert sum(len(b["key"]) for b in image) == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_equals_uninterrupted_stream(tmp_path, workers):
    write_shards(tmp_path, [9, 7, 5, 11])
    with ShardWriter(tmp_path, "bad", samples_per_shard=100) as w:  # skip counts must resume too
        for j in range(6):
            w.write(sample(f"bad_ok{j}", 100 + j))
            w.write({"__key__": f"bad_text{j}", "png": b"nope", "txt": "x"})
    kw = {"batch_size": 3, "seed": 5, "num_workers": workers, "augment": True, "shuffle_buffer": 6,
          "tokenizer": ByteTokenizer(), "image_size": 8}
    full_loader = make_loader([str(tmp_path)], **kw)
    assert full_loader.batches_per_epoch == 14  # 44 samples // 3: several epochs below
    full = list(islice(full_loader, 33))
    for n in (5, 19):
        resumed = make_loader([str(tmp_path)], start_batch=n, **kw)
        for a, b in zip(full[n:], islice(resumed, 33 - n)):
            assert a["key"] == b["key"]
            assert a["skipped"] == b["skipped"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert resumed.state_dict()["batch"] == 33
    assert full_loader.skipped.get("not_image", 0) > 0
    # the augmentation really is random per epoch: the same key in two epochs is cropped differently
    by_key = {}
    for b in full:
        for k, img in zip(b["key"], b["image"]):
            by_key.setdefault(k, []).append(img)
    assert any(len(v) > 1 and not torch.equal(v[0], v[1]) for v in by_key.values())


def test_state_dict_round_trip(shards):
    a = make_loader([shards], batch_size=4, seed=0)
    first = keys(a, 3)
    b = make_loader([shards], batch_size=4, seed=0)
    b.load_state_dict(a.state_dict())
    assert keys(b, 2) == keys(a, 2) and b.skipped == a.skipped
    with pytest.raises(MMError, match="seed"):
        make_loader([shards], batch_size=4, seed=1).load_state_dict(a.state_dict())
    assert first


def test_mixture_weights_roughly_respected(tmp_path):
    a = write_shards(tmp_path / "a", [20, 20], prefix="a")
    b = write_shards(tmp_path / "b", [20, 20], prefix="b")
    loader = make_loader([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1], batch_size=10,
                         seed=0, shuffle_buffer=20)
    got = [k[0] for batch in islice(loader, 60) for k in batch["key"]]
    assert 0.68 < got.count("a") / len(got) < 0.82
    assert a and b
    with pytest.raises(MMError, match="weights"):
        make_loader([str(tmp_path / "a")], weights=[1, 2], batch_size=2, seed=0)


def test_vqa_mode_one_item_per_question(tmp_path):
    write_shards(tmp_path, [4, 3], qa=3)
    loader = make_loader([str(tmp_path)], batch_size=4, seed=0, train=False, mode="vqa",
                         tokenizer=ByteTokenizer(), text_max_len=16)
    batches = list(loader)
    ids = [q for b in batches for q in b["question_id"]]
    assert len(ids) == 21 and len(set(ids)) == 21 and loader.batches_per_epoch == len(batches) == 6
    b = batches[0]
    assert b["question_id"][:3] == [f"{b['key'][0]}_{q}" for q in range(3)]
    assert b["question"][1] == f"q1 of {b['key'][1]}?"
    assert all(len(a) == 10 for a in b["answers"]) and b["answer_type"][0] == "other"
    assert b["question_ids"].shape == (4, 16) and b["question_mask"].any(1).all()
    train = make_loader([str(tmp_path)], batch_size=4, seed=0, mode="vqa")
    assert train.batches_per_epoch == 21 // 4
    noqa = make_loader([str(write_shards(tmp_path / "c", [2])[0])], batch_size=1, seed=0, train=False, mode="vqa")
    assert list(noqa) == [] and noqa.skipped == {"no_questions": 2}
    with ShardWriter(tmp_path / "d", "shards") as w:
        w.write({"__key__": "oddqa", "png": png(0), "txt": "x", "json": {"qa": ["not a dict"]}})
    odd = make_loader([str(tmp_path / "d")], batch_size=1, seed=0, train=False, mode="vqa")
    assert list(odd) == [] and odd.skipped == {"bad_json": 1}


def skewed_vqa_shards(folder: Path) -> str:
    """Two question types, "common" three times as frequent as "rare" (4 questions per image)."""
    with ShardWriter(folder, "shards", samples_per_shard=15) as w:
        for j in range(30):
            qa = [{"question": f"{t} {q} of {j}?", "answers": ["x"] * 10, "question_type": t}
                  for q, t in enumerate(["common", "common", "common", "rare"])]
            w.write({"__key__": f"s{j:03d}", "png": png(j), "txt": "x", "json": {"qa": qa}})
    return str(folder)


def test_vqa_balance_flattens_question_types_and_resumes_exactly(tmp_path):
    from mm.data.pipeline import question_type_keep

    data = skewed_vqa_shards(tmp_path)
    assert question_type_keep([data], 1.0) == {"common": pytest.approx(1 / 3), "rare": 1.0}
    assert question_type_keep([data], 0.5) == {"common": pytest.approx(3 ** -0.5), "rare": 1.0}
    kw = {"batch_size": 8, "seed": 3, "mode": "vqa", "shuffle_buffer": 16, "image_size": 8}

    def share_of_rare(loader, n=40):
        types = [t for b in islice(loader, n) for t in b["question_type"]]
        return types.count("rare") / len(types)

    assert 0.18 < share_of_rare(make_loader([data], **kw)) < 0.32  # as written: 1 in 4
    assert 0.42 < share_of_rare(make_loader([data], balance=1.0, **kw)) < 0.58  # flat
    # f^(1/2): rare 1 / (1 + sqrt 3) = 0.37
    assert 0.30 < share_of_rare(make_loader([data], balance=0.5, **kw)) < 0.44
    full = [b["question_id"] for b in islice(make_loader([data], balance=1.0, **kw), 30)]
    assert full != [b["question_id"] for b in islice(make_loader([data], **kw), 30)]
    resumed = make_loader([data], balance=1.0, start_batch=17, **kw)
    assert [b["question_id"] for b in islice(resumed, 13)] == full[17:]
    # an eval pass is never thinned: every question once
    val = make_loader([data], balance=1.0, **{**kw, "train": False})
    assert sum(len(b["question_id"]) for b in val) == 120
    with pytest.raises(MMError, match="vqa_balance"):
        make_loader([data], balance=1.5, **kw)
    with pytest.raises(MMError, match="no VQA questions"):
        make_loader(write_shards(tmp_path / "plain", [3])[:1], balance=1.0, **kw)


def test_codes_passthrough(tmp_path):
    write_shards(tmp_path, [5], codes=True)
    batch = next(iter(make_loader([str(tmp_path)], batch_size=5, seed=0, train=False)))
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (5, 2, 3)
    assert batch["codes"][:, 0, 0].tolist() == list(range(5))


def test_pipe_url(tmp_path):
    write_shards(tmp_path, [5, 6])
    pipe = f"pipe:cat {tmp_path}/shards-{{000000..000001}}.tar"
    local = [k for b in make_loader([str(tmp_path)], batch_size=4, seed=0, train=False) for k in b["key"]]
    piped = [k for b in make_loader([pipe], batch_size=4, seed=0, train=False) for k in b["key"]]
    assert piped == local
    train = make_loader([pipe], batch_size=4, seed=0)
    assert train.batches_per_epoch == 2 and len(keys(train, 4)) == 4


def test_crop_is_a_function_of_the_seed_only():
    assert crop_box(40, 30, True, 7) == crop_box(40, 30, True, 7) != crop_box(40, 30, True, 8)
    x0, y0, x1, y1 = crop_box(40, 30, True, 7)
    assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30 and (x1 - x0) * (y1 - y0) >= 0.79 * 900 * 0.9
    assert crop_box(40, 30, False, 0) == (5, 0, 35, 30)
    img = load_image(png(3, size=8), 8)
    assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(png(3, size=8)))))


def test_builtin_shapes_with_the_real_tokenizer(shapes_shards, tmp_path):
    from mm.data.tokenizer import load_tokenizer, train_tokenizer

    val = str(shapes_shards / "val")
    captions = [c for b in make_loader([val], batch_size=8, seed=0, train=False) for c in b["caption"]]
    tok = load_tokenizer(train_tokenizer(captions, 300, tmp_path / "tok"))
    vqa = make_loader([val], batch_size=8, seed=0, train=False, mode="vqa", tokenizer=tok, num_workers=2)
    batches = list(vqa)
    expected = sum(len(m["qa"]) for b in make_loader([val], batch_size=8, seed=0, train=False) for m in b["meta"])
    assert sum(len(b["question"]) for b in batches) == expected and vqa.skipped == {}
    assert all(len(a) == 10 for b in batches for a in b["answers"])
    b = batches[0]
    assert b["question_mask"].any(1).all() and tok.decode(b["question_ids"][0]) == b["question"][0]
    train = make_loader([str(shapes_shards / "train")], batch_size=8, seed=0, tokenizer=tok, augment=True,
                        text_max_len=96)
    batch = next(iter(train))
    assert train.batches_per_epoch == 64 // 8 and tok.decode(batch["input_ids"][0]) == batch["caption"][0]


def test_caption_choice_first_random_complete_and_resume(tmp_path):
    from mm.data.pipeline import choose_caption
    from mm.data.shapes import make_sample
    from mm.data.shapes_truth import caption_true_of, names_every_object, parse_caption

    with ShardWriter(tmp_path, "shapes", samples_per_shard=100) as w:
        samples = [make_sample(0, "train", i, 48) for i in range(40)]
        for s in samples:
            w.write(s)
    metas = {s["__key__"]: s["json"] for s in samples}
    kw = {"batch_size": 8, "seed": 3, "tokenizer": ByteTokenizer(), "text_max_len": 200}
    first = [b for b in islice(make_loader([str(tmp_path)], **kw), 10)]
    assert all(c == metas[k]["captions"][0] for b in first for k, c in zip(b["key"], b["caption"]))
    for how in ("random", "complete", "placed"):
        loader = make_loader([str(tmp_path)], captions=how, **kw)
        full = list(islice(loader, 15))  # three epochs of 5 batches
        picked = {}
        for b in full:
            for k, c in zip(b["key"], b["caption"]):
                meta = metas[k]
                assert c in meta["captions"] and caption_true_of(c, meta)
                if how in ("complete", "placed"):
                    assert names_every_object(c, meta) or not any(
                        names_every_object(o, meta) for o in meta["captions"])
                if how == "placed":  # says where whenever a complete caption of the image does
                    complete = [o for o in meta["captions"] if names_every_object(o, meta)]
                    assert parse_caption(c).kind != "listing" or all(
                        parse_caption(o).kind == "listing" for o in complete)
                picked.setdefault(k, set()).add(c)
        assert any(len(v) > 1 for v in picked.values())  # a new draw per epoch
        resumed = list(islice(make_loader([str(tmp_path)], captions=how, start_batch=7, **kw), 8))
        assert [b["caption"] for b in resumed] == [b["caption"] for b in full[7:]]
        # eval passes always read the first caption
        ev = make_loader([str(tmp_path)], captions=how, train=False, **kw)
        assert all(c == metas[k]["captions"][0] for b in ev for k, c in zip(b["key"], b["caption"]))
    # complete really filters: a relation caption of a three-object image is never chosen
    meta = {"objects": [{"shape": "circle", "color": "red", "size": "small", "bbox": [0, 0, 5, 5], "cell": "top left"},
                        {"shape": "square", "color": "blue", "size": "small", "bbox": [40, 40, 45, 45],
                         "cell": "bottom right"},
                        {"shape": "square", "color": "green", "size": "small", "bbox": [40, 0, 45, 5],
                         "cell": "top right"}],
            "captions": ["a red circle above a blue square", "a red circle, a blue square and a green square"]}
    item = {"__key__": "k", "caption": meta["captions"][0], "meta": meta}
    assert {choose_caption(item, "complete", s, 0) for s in range(20)} == {meta["captions"][1]}
    assert len({choose_caption(item, "random", s, 0) for s in range(20)}) == 2
    # placed prefers, among the complete ones, a caption that says where
    placed = "a red circle in the top left, a blue square in the bottom right and a green square in the top right"
    meta = {**meta, "captions": [*meta["captions"], placed]}
    item = {**item, "meta": meta}
    assert {choose_caption(item, "placed", s, 0) for s in range(20)} == {meta["captions"][2]}
    assert len({choose_caption(item, "complete", s, 0) for s in range(20)}) == 2
    assert choose_caption({"__key__": "x", "caption": "plain", "meta": {}}, "complete", 0, 0) == "plain"
    with pytest.raises(MMError, match="data.captions"):
        make_loader([str(tmp_path)], captions="all", **kw)
