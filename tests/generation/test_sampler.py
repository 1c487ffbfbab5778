"""Image-code sampler: cache parity, seeds per sample, guidance, filtering, compile."""

import math

import pytest
import torch

from mm.errors import MMError
from mm.generation.sampler import (
    SamplingParams,
    choose,
    filter_logits,
    guidance_scales,
    sample_codes,
    sample_codes_uncached,
    seeds_tensor,
    uniform_noise,
)
from mm.models.presets import create_model

L = 8  # text length of every prompt (fixed, as the pipeline pads to the model's text length)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("debug").eval()
    # Sharper logits than at init, so guidance and filtering visibly change the samples.
    with torch.no_grad():
        m.t2i_head.weight.mul_(40)
    return m


def prompts(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[::2, L // 2:] = False  # some padded prompts
    with torch.no_grad():
        return model.encode_text(ids, mask)


def rows(text, idx):
    return text[0][idx], text[1][idx]


@pytest.mark.parametrize("params", [
    SamplingParams(guidance_scale=1.0),
    SamplingParams(guidance_scale=3.0, top_k=8),
    SamplingParams(guidance_scale=2.0, guidance_schedule="linear", top_p=0.8, temperature=0.7),
])
def test_cached_equals_uncached(model, params):
    text = prompts(model, 3)
    seeds = seeds_tensor(11, 3)
    cached = sample_codes(model, text, seeds, params)
    assert cached.shape == (3, 4, 4)
    assert torch.equal(cached, sample_codes_uncached(model, text, seeds, params))


def test_static_and_growing_caches_agree(model):
    text = prompts(model, 2)
    seeds = seeds_tensor([3, 4], 2)
    p = SamplingParams(guidance_scale=3.0, top_k=10)
    assert torch.equal(sample_codes(model, text, seeds, p, cache="static"),
                       sample_codes(model, text, seeds, p, cache="dynamic"))


def test_seed_reproduces_image_across_batch_sizes_and_positions(model):
    text = prompts(model, 4)
    p = SamplingParams(guidance_scale=3.0, top_k=16)
    full = sample_codes(model, text, seeds_tensor([10, 20, 30, 40], 4), p)
    alone = sample_codes(model, rows(text, [2]), seeds_tensor([30], 1), p)
    moved = sample_codes(model, rows(text, [2, 0]), seeds_tensor([30, 10], 2), p)
    assert torch.equal(full[2], alone[0])
    assert torch.equal(full[2], moved[0]) and torch.equal(full[0], moved[1])
    # different seeds give different images
    other = sample_codes(model, rows(text, [2]), seeds_tensor([31], 1), p)
    assert not torch.equal(other[0], alone[0])


def test_guidance_scale_one_equals_conditional_sampling(model):
    text = prompts(model, 2)
    seeds = seeds_tensor(0, 2)
    cond = sample_codes(model, text, seeds, SamplingParams(guidance_scale=1.0))
    # Force the 2B guided path with s = 1 everywhere: guidance only after the last code.
    n = 16
    guided_path = sample_codes(model, text, seeds, SamplingParams(guidance_scale=3.0, guidance_interval=(n, n + 1)))
    assert torch.equal(cond, guided_path)
    assert not torch.equal(cond, sample_codes(model, text, seeds, SamplingParams(guidance_scale=5.0)))


def test_negative_prompt_replaces_null_context(model):
    text = prompts(model, 2)
    neg = prompts(model, 2, seed=7)
    seeds = seeds_tensor(0, 2)
    p = SamplingParams(guidance_scale=4.0)
    with_neg = sample_codes(model, text, seeds, p, uncond=neg)
    assert torch.equal(with_neg, sample_codes_uncached(model, text, seeds, p, uncond=neg))
    assert not torch.equal(with_neg, sample_codes(model, text, seeds, p))


def test_top_k_one_equals_greedy(model):
    text = prompts(model, 2)
    sampled = sample_codes(model, text, seeds_tensor(5, 2), SamplingParams(guidance_scale=1.0, top_k=1))
    # naive greedy: full forward each step, argmax of the last row
    codes = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        for n in range(16):
            codes[:, n] = model.t2i_logits(codes.view(2, 4, 4), *text)[:, n].argmax(-1)
    assert torch.equal(sampled.view(2, 16), codes)


def test_unconditional_samples(model):
    seeds = seeds_tensor(0, 2)
    p = SamplingParams(guidance_scale=3.0)
    assert torch.equal(sample_codes(model, None, seeds, p), sample_codes_uncached(model, None, seeds, p))


def test_guidance_schedules():
    p = SamplingParams(guidance_scale=3.0, guidance_schedule="linear")
    assert torch.allclose(guidance_scales(p, 5), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    p = SamplingParams(guidance_scale=3.0, guidance_interval=(1, 3))
    assert guidance_scales(p, 5).tolist() == [1.0, 3.0, 3.0, 1.0, 1.0]


def test_filter_logits_matches_naive_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    for k in (1, 5, 50, 100):
        out = filter_logits(logits, top_k=k)
        kept = (out > float("-inf")).sum(-1)
        assert (kept == min(k, 50)).all()
    for p in (0.05, 0.5, 0.9, 1.0):
        out = filter_logits(logits, top_p=p)
        for row, orow in zip(logits, out):
            probs = row.softmax(-1)
            order = probs.argsort(descending=True)
            need, total = 0, 0.0
            while total < p and need < 50:  # smallest prefix reaching p
                total += probs[order[need]].item()
                need += 1
            expect = torch.full_like(row, float("-inf"))
            expect[order[:need]] = row[order[:need]]
            assert torch.equal(orow, expect)


def test_sampling_follows_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    n = 4000
    seeds = torch.arange(n)
    for t in (1.0, 0.5):
        picks = choose(logits.expand(n, 5), seeds, 3, SamplingParams(temperature=t))
        freq = torch.bincount(picks, minlength=5).float() / n
        assert torch.allclose(freq, (logits / t).softmax(-1)[0], atol=0.03)
        assert freq[4] == 0  # probability 0 is never drawn
    top2 = choose(logits.expand(n, 5), seeds, 3, SamplingParams(top_k=2))
    assert set(top2.tolist()) == {0, 1}


def test_noise_is_counter_based():
    u = uniform_noise(torch.arange(5000) + 2**40, 7)
    assert u.shape == (5000,) and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch.equal(u[1:2], uniform_noise(torch.tensor([2**40 + 1]), 7))  # batch-independent
    assert u[1] != uniform_noise(torch.tensor([1]), 7)[0]  # the high 32 bits of the seed matter
    assert u[1] != uniform_noise(torch.tensor([2**40 + 1]), 8)[0]  # position matters
    # neighbouring seeds and positions are uncorrelated
    v = uniform_noise(torch.arange(5000) + 2**40, 8)
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 0.05
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.05


def test_step_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = create_model("debug", depth=1).eval()  # one block: the same code path, half the tracing
    text = prompts(model, 2)
    seeds = seeds_tensor(0, 2)
    p = SamplingParams(guidance_scale=3.0, top_k=8, top_p=0.9)
    eager = sample_codes(model, text, seeds, p)
    assert torch.equal(eager, sample_codes(model, text, seeds, p, compile="eager"))  # fullgraph=True


@pytest.mark.parametrize("kwargs,msg", [
    ({"guidance_scale": -1.0}, "guidance scale"),
    ({"guidance_scale": math.nan}, "guidance scale"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"top_k": -1}, "top-k"),
    ({"temperature": 0.0}, "temperature"),
    ({"guidance_schedule": "cosine"}, "schedule"),
])
def test_bad_params(kwargs, msg):
    with pytest.raises(MMError, match=msg):
        SamplingParams(**kwargs).check()


def test_bad_seeds():
    with pytest.raises(MMError, match="seeds"):
        seeds_tensor([1, 2], 3)
    with pytest.raises(MMError, match="seeds"):
        seeds_tensor(-1, 1)
