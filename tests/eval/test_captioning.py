"""BLEU and CIDEr-D against values computed by hand from the coco-caption definitions."""

import math

import pytest

from mm.errors import MMError
from mm.eval.captioning import bleu, bleu4, caption_metrics, cider_d, tokenize


def test_tokenize():
    assert tokenize("A small, red circle.") == ["a", "small", "red", "circle"]
    assert tokenize("  Two\tBLUE squares!! ") == ["two", "blue", "squares"]


def test_bleu_perfect_match():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_bleu_corpus_level_with_brevity_penalty():
    cands = ["a small red circle", "two big blue squares on top"]
    refs = [
        ["a small red circle on the left", "there is a small red circle"],  # 7, 6 words: closest to 4 is 6
        ["two big blue squares at the top", "two blue squares on top"],     # 7, 5: tie at 1 -> shorter, 5
    ]
    # item 1: 1-4 grams all matched: 4/4, 3/3, 2/2, 1/1
    # item 2: unigrams 6/6; bigrams 5/5; trigrams 4/4;
    #         4-grams "two big blue squares" yes, "big blue squares on" no, "blue squares on top" yes -> 2/3
    # corpus: correct [10, 8, 6, 3] / guess [10, 8, 6, 4]; test length 10, reference length 6 + 5 = 11
    bp = math.exp(1 - 11 / 10)
    b = bleu(cands, refs)
    assert b[0] == pytest.approx(bp, rel=1e-6)
    assert b[2] == pytest.approx(bp, rel=1e-6)
    assert b[3] == pytest.approx(0.75 ** 0.25 * bp, rel=1e-6)


def test_bleu_clipping_and_no_penalty_when_longer():
    # "the the the the" vs "the cat": unigram "the" clipped to 1 of 4; no higher-order matches.
    b = bleu(["the the the the"], [["the cat"]])
    assert b[0] == pytest.approx(0.25, rel=1e-6)  # candidate longer than reference: no brevity penalty
    assert b[3] < 1e-3  # zero 2-gram matches: the toolkit's tiny/small constants make it ~0, not an error


def test_cider_d_perfect_two_word_captions():
    # Every n-gram has df = 1 -> idf = log 2; uni- and bigram cosines are 1, tri/4-grams absent -> 0.
    # mean over n = (1 + 1 + 0 + 0) / 4 = 0.5, x10 = 5.
    mean, per = cider_d(["red circle", "blue square"], [["red circle"], ["blue square"]])
    assert per == pytest.approx([5.0, 5.0])
    assert mean == pytest.approx(5.0)


def test_cider_d_hand_computed_clipping_idf_and_length_penalty():
    # L = log 2 documents. df: circle 2 -> idf 0; red, blue, "red circle", "blue circle" 1 -> idf L.
    # Item A: hyp "red red circle", ref "red circle".
    #   unigrams: hyp {red: 2L, circle: 0} (norm 2L), ref {red: L} (norm L):
    #             clipped min(2L, L) * L / (2L * L) = 0.5
    #   bigrams:  hyp {red red: L, red circle: L} (norm sqrt2 L), ref {red circle: L}: L^2 / (sqrt2 L^2)
    #   trigrams: the reference has none -> 0; 4-grams: none -> 0
    #   length = bigram counts 2 vs 1 -> penalty exp(-1 / 72)
    # Item B: identical two-word caption -> 5.0 (as above; "circle" has idf 0 but "blue" carries it).
    a = 10 * (0.5 + 2 ** -0.5) / 4 * math.exp(-1 / 72)
    mean, per = cider_d(["red red circle", "blue circle"], [["red circle"], ["blue circle"]])
    assert per[0] == pytest.approx(a, rel=1e-9)
    assert per[1] == pytest.approx(5.0, rel=1e-9)
    assert mean == pytest.approx((a + 5.0) / 2, rel=1e-9)


def test_cider_d_averages_over_references():
    # Second reference shares nothing with the hypothesis -> contributes 0; mean over 2 refs halves it.
    one, _ = cider_d(["red circle", "blue square"], [["red circle"], ["blue square"]])
    per = cider_d(["red circle", "blue square"], [["red circle", "green star"], ["blue square"]])[1]
    # df and idf are unchanged for the hypothesis n-grams, so item 0 is exactly half of 5.0.
    assert per[0] == pytest.approx(one / 2)


def test_caption_metrics_and_errors():
    m = caption_metrics(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]])
    assert set(m) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
    assert m["bleu3"] == pytest.approx(1.0)
    with pytest.raises(MMError):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(MMError):
        bleu(["a"], ["a"])  # references must be lists of captions, not a bare string
