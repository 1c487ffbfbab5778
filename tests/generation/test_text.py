"""Text decoding: greedy, beam search and top-p over the TextDecoder's KV cache."""

import pytest
import torch

from mm.errors import MMError
from mm.generation.text import beam_search, sample_text
from mm.models.presets import create_model

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = create_model("debug", vocab_size=12, text_max_len=8).eval()
    with torch.no_grad():  # larger random weights: varied tokens, and EOS ends some texts early
        for p in m.decoder.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def states(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.image_states(torch.rand(3, 3, 16, 16) * 2 - 1)


def naive_greedy(model, states):
    ids = torch.full((states.shape[0], 1), BOS)
    for _ in range(model.config.text_max_len - 1):
        nxt = model.caption_logits(states, ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return [s[1:s.index(EOS)] if EOS in s else s[1:] for s in ids.tolist()]


def naive_beam(model, states, k, length_penalty=1.0):
    """The same beam algorithm with no cache: full decoder forward of every hypothesis each step."""
    out = []
    for i in range(states.shape[0]):
        beams = [([BOS], 0.0, False)]
        for _ in range(model.config.text_max_len - 1):
            cands = []
            for seq, score, done in beams:
                if done:
                    cands.append((seq + [EOS], score, True))
                    continue
                logp = model.caption_logits(states[i:i + 1], torch.tensor([seq]))[0, -1].log_softmax(-1)
                cands += [(seq + [t], score + logp[t].item(), t == EOS) for t in range(logp.shape[0])]
            beams = sorted(cands, key=lambda c: -c[1])[:k]
            if all(d for _, _, d in beams):
                break

        def norm(c):
            body = c[0][1:]
            length = body.index(EOS) + 1 if EOS in body else len(body)
            return c[1] / length ** length_penalty

        best = max(beams, key=norm)[0][1:]
        out.append(best[: best.index(EOS)] if EOS in best else best)
    return out


def test_greedy_matches_naive_and_both_caches(model, states):
    with torch.no_grad():
        ref = naive_greedy(model, states)
    assert sample_text(model, states, BOS, EOS, "greedy") == ref
    assert sample_text(model, states, BOS, EOS, "greedy", cache="dynamic") == ref
    assert any(len(s) < model.config.text_max_len - 1 for s in ref)  # some stop at EOS


def test_beam_one_equals_greedy(model, states):
    assert beam_search(model, states, BOS, EOS, num_beams=1) == sample_text(model, states, BOS, EOS, "greedy")


@pytest.mark.parametrize("k", [2, 3])
def test_beam_search_matches_uncached_reference(model, states, k):
    with torch.no_grad():
        ref = naive_beam(model, states, k)
    assert beam_search(model, states, BOS, EOS, num_beams=k) == ref
    assert beam_search(model, states, BOS, EOS, num_beams=k, cache="dynamic") == ref
    assert ref != sample_text(model, states, BOS, EOS, "greedy")  # the beams found something else


def test_top_p_sampling(model, states):
    a = sample_text(model, states, BOS, EOS, "top-p", top_p=0.95, seeds=[5, 6, 7])
    alone = sample_text(model, states[1:2], BOS, EOS, "top-p", top_p=0.95, seeds=[6])
    assert a[1] == alone[0]  # per-sample seeds
    tiny_p = sample_text(model, states, BOS, EOS, "top-p", top_p=1e-6, seeds=[5, 6, 7])
    assert tiny_p == sample_text(model, states, BOS, EOS, "greedy")  # nucleus of one token = greedy
    many = {tuple(sample_text(model, states[:1], BOS, EOS, "top-p", top_p=1.0, temperature=2.0, seeds=[s])[0])
            for s in range(8)}
    assert len(many) > 1


def test_bad_text_args(model, states):
    with pytest.raises(MMError, match="beams"):
        beam_search(model, states, BOS, EOS, num_beams=0)
    with pytest.raises(MMError, match="method"):
        sample_text(model, states, BOS, EOS, "nucleus")
    with pytest.raises(MMError, match="top-p"):
        sample_text(model, states, BOS, EOS, "top-p", top_p=0.0)
