"""Recall@K on similarity matrices whose ranks are known by construction; ITM re-ranking."""

import pytest
import torch

from mm.errors import MMError
from mm.eval.retrieval import recall_at_k, rerank_topk


def test_hand_computed_small_case():
    # img0 has captions t0,t1; img1 -> t2; img2 -> t3.
    sim = torch.tensor([
        [0.9, 0.1, 0.5, 0.2],   # i0: best positive t0 first                 -> rank 0
        [0.8, 0.7, 0.6, 0.1],   # i1: t0, t1 above its t2                     -> rank 2
        [0.3, 0.2, 0.4, 0.35],  # i2: t2 above its t3                         -> rank 1
    ])
    # columns: t0: i0 0.9 top -> 0; t1: i0 0.1 below 0.7, 0.2 -> 2; t2: i1 0.6 top -> 0; t3: 0.35 top -> 0
    r = recall_at_k(sim, [[0, 1], [2], [3]], k=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == pytest.approx(100)
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((75, 75, 100))
    assert r["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 75 + 75 + 100)


def make_sim_with_ranks(ranks):
    """One caption per image (text i <-> image i); image i's caption has exactly ranks[i] texts above it."""
    n = len(ranks)
    sim = -torch.ones(n, n)
    for i, r in enumerate(ranks):
        sim[i, i] = 0.0
        negatives = [j for j in range(n) if j != i][:r]
        sim[i, negatives] = 1.0
    return sim


def test_known_ranks_image_to_text():
    ranks = [0, 0, 0, 1, 4, 5, 9, 10, 15, 19]  # 20 images
    ranks += [0] * 10
    sim = make_sim_with_ranks(ranks)
    r = recall_at_k(sim, [[i] for i in range(20)])
    assert r["i2t_r1"] == pytest.approx(100 * 13 / 20)   # ranks 0
    assert r["i2t_r5"] == pytest.approx(100 * 15 / 20)   # + ranks 1, 4
    assert r["i2t_r10"] == pytest.approx(100 * 17 / 20)  # + ranks 5, 9 (10 is a miss)
    # The same matrix transposed swaps the two directions.
    r_t = recall_at_k(sim.t(), [[i] for i in range(20)])
    assert r_t["t2i_r1"] == r["i2t_r1"] and r_t["t2i_r10"] == r["i2t_r10"]


def test_ties_count_against_the_model():
    r = recall_at_k(torch.zeros(5, 5), [[i] for i in range(5)])
    assert r["i2t_r1"] == 0 and r["t2i_r1"] == 0 and r["i2t_r5"] == 100
    assert r["rsum"] == pytest.approx(400)  # R@5 and R@10 hit both ways (5 candidates)


def test_bad_inputs():
    with pytest.raises(MMError, match="no caption"):
        recall_at_k(torch.eye(3), [[0], [1], []])
    with pytest.raises(MMError, match="no image"):
        recall_at_k(torch.eye(3, 4), [[0], [1], [2]])
    with pytest.raises(MMError, match="outside"):
        recall_at_k(torch.eye(3), [[0], [1], [7]])
    with pytest.raises(MMError, match="rows"):
        recall_at_k(torch.eye(3), [[0], [1]])


def test_rerank_fixes_order_within_topk_only():
    n = 12
    ranks = [2] * n  # every positive is third by ITC
    sim = make_sim_with_ranks(ranks)
    truth = torch.eye(n)  # a perfect ITM: 1 for true pairs, 0 otherwise
    seen = []

    def itm(pairs):
        seen.append(len(pairs))
        return truth[pairs[:, 0], pairs[:, 1]]

    before = recall_at_k(sim, [[i] for i in range(n)])
    assert before["i2t_r1"] == 0 and before["i2t_r5"] == 100

    s_i2t, s_t2i = rerank_topk(sim, k=3, score_fn=itm, batch_size=7)
    after = recall_at_k(s_i2t, [[i] for i in range(n)], sim_t2i=s_t2i)
    assert after["i2t_r1"] == 100
    assert max(seen) <= 7
    assert sum(seen) <= 2 * n * 3  # pairs in both directions' top-k scored once

    # k = 1: the true pair is not among the candidates -> still a miss at 1, ITC order kept below.
    s_i2t, s_t2i = rerank_topk(sim, k=1, score_fn=itm, batch_size=4)
    after = recall_at_k(s_i2t, [[i] for i in range(n)], sim_t2i=s_t2i)
    assert after["i2t_r1"] == 0 and after["i2t_r5"] == before["i2t_r5"]

    s_i2t, s_t2i = rerank_topk(sim, k=0, score_fn=itm)
    assert torch.equal(s_i2t, sim) and torch.equal(s_t2i, sim)


def test_rerank_directions_use_their_own_candidates():
    # 2 images, 3 texts; ITC puts t2 first for both images; ITM knows i1 <-> t2, i0 <-> t0,t1.
    sim = torch.tensor([[0.1, 0.0, 0.9], [0.0, 0.1, 0.8]])
    truth = torch.tensor([[2.0, 1.0, -1.0], [-1.0, -1.0, 3.0]])
    s_i2t, s_t2i = rerank_topk(sim, k=2, score_fn=lambda p: truth[p[:, 0], p[:, 1]])
    # i2t candidates: i0 -> {t2, t0}, i1 -> {t2, t1}; t2i candidates: both images for every text.
    assert s_i2t[0, 0] == 2.0 and s_i2t[0, 2] == -1.0 and s_i2t[1, 2] == 3.0
    assert s_i2t[0, 1] < -1.0  # outside i0's top-2: below every ITM score
    assert torch.equal(s_t2i, truth)
    r = recall_at_k(s_i2t, [[0, 1], [2]], k=(1,), sim_t2i=s_t2i)
    assert r["i2t_r1"] == 100 and r["t2i_r1"] == 100


# ---------------------------------------------------------------------------------------------
# Multi-positive retrieval on shapes: a caption is a hit for every image it is true of


def shapes_eval_set(n=200):
    """(distinct captions, metadata per image, index of each image's own caption) of n test samples."""
    from mm.data.shapes import make_sample

    metas = [make_sample(0, "test", i, 32)["json"] for i in range(n)]
    texts = list(dict.fromkeys(m["caption"] for m in metas))
    return texts, metas, [texts.index(m["caption"]) for m in metas]


def test_perfect_scorer_reaches_100_both_ways_and_random_does_not():
    from mm.eval.retrieval import recall_report, shapes_positives

    texts, metas, own = shapes_eval_set()
    truth, note = shapes_positives(texts, metas, own)
    assert truth is not None and "true of" in note
    assert truth.sum() > len(own)  # captions true of other images too: single positives miss them
    single = [[t] for t in own]

    perfect = recall_report(truth.float(), single, truth)  # the ceiling: 100 % by construction
    assert perfect["i2t_r1"] == 100 and perfect["t2i_r1"] == 100 and perfect["rsum"] == 600
    assert perfect["t2i_r1_single"] < 100  # single positives cannot credit a true other image

    random = recall_report(torch.rand(truth.shape, generator=torch.Generator().manual_seed(0)), single, truth)
    assert random["i2t_r1"] < 10 and random["t2i_r1"] < 10 and random["i2t_r10"] < 30
    assert set(random) == set(perfect) and "i2t_r1_single" in random and "rsum_single" in random


def test_bool_matrix_positives_match_lists():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.8, 0.7, 0.6, 0.1], [0.3, 0.2, 0.4, 0.35]])
    lists = [[0, 1], [2], [3]]
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert recall_at_k(sim, mask, k=(1, 2, 3)) == recall_at_k(sim, lists, k=(1, 2, 3))
    with pytest.raises(MMError, match="no image"):
        recall_at_k(sim, torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.bool))  # text 3
    with pytest.raises(MMError, match="shape"):
        recall_at_k(sim, mask[:2])


def test_without_shapes_metadata_positives_fall_back_to_single():
    from mm.eval.retrieval import recall_report, shapes_positives

    truth, note = shapes_positives(["a dog", "a cat"], [{}, {"caption": "a cat"}], [0, 1])
    assert truth is None and "no shapes metadata" in note
    texts, metas, own = shapes_eval_set(10)
    truth, note = shapes_positives(texts[:-1] + ["a photo of a dog"], metas, own)  # a caption outside the grammar
    assert truth is None and "not a shapes caption" in note
    r = recall_report(torch.eye(3), [[0], [1], [2]])
    assert r["i2t_r1"] == r["i2t_r1_single"] == 100


def test_a_caption_false_of_its_own_image_is_an_error():
    from mm.eval.retrieval import shapes_positives

    texts, metas, own = shapes_eval_set(10)
    metas[0] = {**metas[0], "objects": [{**o, "color": "red" if o["color"] != "red" else "blue"}
                                        for o in metas[0]["objects"]]}
    with pytest.raises(MMError, match="false of its own image 0"):
        shapes_positives(texts, metas, own)
