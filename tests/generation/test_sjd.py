"""Speculative Jacobi decoding: exact distribution, greedy equality, fewer forwards, batch independence."""

import itertools

import pytest
import torch
from scipy.stats import chi2

from mm.errors import MMError
from mm.generation.sampler import SamplingParams, guide, sample_codes, seeds_tensor, token_probs
from mm.generation.sjd import sample_codes_sjd, verify
from mm.models.presets import create_model

L = 8


def text_for(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, L), generator=g)
    with torch.no_grad():
        return model.encode_text(ids, torch.ones(n, L, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny3():
    """3 codes over a codebook of 4: the joint distribution has 64 outcomes, enumerable exactly."""
    torch.manual_seed(0)
    m = create_model("debug", codebook_size=4, code_grid=[1, 3]).eval()
    with torch.no_grad():
        m.t2i_head.weight.mul_(60)  # far from uniform, and codes depend on earlier codes
        for blk in m.backbone.blocks:
            blk.cross.out.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def peaked():
    torch.manual_seed(0)
    m = create_model("debug").eval()  # 4x4 codes, K 32
    with torch.no_grad():
        m.t2i_head.weight.mul_(40)
    return m


def exact_joint(model, text, params) -> torch.Tensor:
    """P(c0, c1, c2) of plain (CFG) sampling by enumeration with the uncached model: (K**3,)."""
    k = model.config.codebook_size
    seqs = torch.tensor(list(itertools.product(range(k), repeat=3)))  # (64, 3)
    states, mask = (t.expand(len(seqs), *t.shape[1:]) for t in text)
    with torch.no_grad():
        logits = model.t2i_logits(seqs.view(-1, 1, 3), states, mask)  # (64, 3, K)
        if params.uses_guidance:
            un = model.t2i_logits(seqs.view(-1, 1, 3), None, None)
            logits = guide(torch.cat([logits, un]), params.guidance_scale)
    p = token_probs(logits, params)  # (64, 3, K)
    return p.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=1)  # (64,)


@pytest.mark.parametrize("params,window", [
    (SamplingParams(guidance_scale=1.0), 2),
    (SamplingParams(guidance_scale=3.0, top_k=3, temperature=0.8), 3),
])
def test_sjd_joint_distribution_is_plain_sampling(tiny3, params, window):
    """χ² of 6000 SJD samples against the exact joint distribution of plain sampling (64 outcomes)."""
    n = 6000
    text = text_for(tiny3, 1)
    expected = exact_joint(tiny3, text, params) * n  # (64,)
    batch = tuple(t.expand(n, *t.shape[1:]) for t in text)
    codes = sample_codes_sjd(tiny3, batch, seeds_tensor(0, n), params, window=window).view(n, 3)
    index = (codes * torch.tensor([16, 4, 1])).sum(1)
    observed = torch.bincount(index, minlength=64).double()
    assert observed[expected == 0].sum() == 0  # filtered-out codes never appear
    big = expected >= 5  # pool the rare outcomes into one cell, as χ² needs
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    assert chi2.sf(stat, len(obs) - 1) > 1e-3, (stat, len(obs))
    # The same check on plain sampling's own histogram, as a reference for the statistic's size.
    plain = sample_codes(tiny3, batch, seeds_tensor(10**6, n), params).view(n, 3)
    plain_obs = torch.bincount((plain * torch.tensor([16, 4, 1])).sum(1), minlength=64).double()
    tv = 0.5 * float((observed - plain_obs).abs().sum()) / n
    assert tv < 0.05, tv


def test_verify_rejects_by_the_ratio_and_redraws_from_the_residual():
    p = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # (1, 2, 3)
    q = torch.tensor([[[0.0, 0.2, 0.8], [1 / 3, 1 / 3, 1 / 3]]])
    active = torch.ones(1, 2, dtype=torch.bool)
    # Draft 2 at the first cell has p = 0: always rejected, redrawn from max(0, p - q) = [.5, .3, 0].
    committed, codes, n = verify(p, q, torch.tensor([[2, 0]]), active, torch.full((1, 2), 0.01),
                                 torch.tensor([[0.9, 0.5]]))
    assert committed.tolist() == [[True, False]] and n.tolist() == [1] and codes[0, 0] == 1
    # Draft 1 (p/q = 2.5) and draft 0 (p/q = 3) are accepted whatever u is.
    committed, codes, n = verify(p, q, torch.tensor([[1, 0]]), active, torch.full((1, 2), 0.999),
                                 torch.full((1, 2), 0.5))
    assert n.tolist() == [2] and codes.tolist() == [[1, 0]]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_plain(peaked, guidance):
    params = SamplingParams(guidance_scale=guidance, top_k=1)
    text, seeds = text_for(peaked, 5), seeds_tensor(3, 5)
    plain = sample_codes(peaked, text, seeds, params)
    for window in (1, 4, 16):
        assert torch.equal(sample_codes_sjd(peaked, text, seeds, params, window=window), plain)


def test_fewer_forwards_than_codes_on_a_peaked_model(peaked):
    stats = {}
    params = SamplingParams(guidance_scale=3.0, temperature=0.5)
    sample_codes_sjd(peaked, text_for(peaked, 1), seeds_tensor(0, 1), params, window=8, stats=stats)
    assert stats["codes"] == 16 and stats["forwards"] < 16, stats
    greedy = {}
    sample_codes_sjd(peaked, text_for(peaked, 1), seeds_tensor(0, 1), SamplingParams(top_k=1), window=8,
                     stats=greedy)
    assert greedy["forwards"] < 16, greedy


def test_image_does_not_depend_on_the_batch(peaked):
    params = SamplingParams(guidance_scale=2.0, top_k=8)
    text, seeds = text_for(peaked, 4), seeds_tensor(7, 4)
    together = sample_codes_sjd(peaked, text, seeds, params, window=4)
    for i in range(4):
        alone = sample_codes_sjd(peaked, (text[0][i:i + 1], text[1][i:i + 1]), seeds[i:i + 1], params, window=4)
        assert torch.equal(alone[0], together[i])


def test_growing_cache_gives_the_same_codes(peaked):
    params = SamplingParams(guidance_scale=3.0, top_p=0.9)
    text, seeds = text_for(peaked, 2), seeds_tensor(1, 2)
    static = sample_codes_sjd(peaked, text, seeds, params, window=5)
    assert torch.equal(sample_codes_sjd(peaked, text, seeds, params, window=5, cache="dynamic"), static)


@pytest.mark.parametrize("window", [0, 1000, 2.5])
def test_bad_window(peaked, window):
    with pytest.raises(MMError, match="SJD window"):
        sample_codes_sjd(peaked, text_for(peaked, 1), seeds_tensor(0, 1), SamplingParams(), window=window)
