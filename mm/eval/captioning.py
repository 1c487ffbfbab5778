"""Captioning metrics as coco-caption (pycocoevalcap) computes them: BLEU-1..4 and CIDEr-D.

Inputs are aligned lists: ``candidates[i]`` is the generated caption of item i and
``references[i]`` its human captions. Both are tokenised the same simple way first (lowercase,
punctuation -> spaces, split on whitespace), close to what coco-caption's PTB tokenizer does
for ordinary captions but without the Java dependency — so numbers on captions with clitics
("man's") or hyphenated words can differ slightly from the official toolkit.

BLEU (corpus level): clipped n-gram counts summed over the corpus; brevity penalty from the sum
of test lengths vs the sum of "closest" reference lengths (ties -> the shorter reference); the
toolkit's smoothing constants tiny = 1e-15 / small = 1e-9 are kept. BLEU-4 is in 0..1.

CIDEr-D: per n in 1..4, tf-idf vectors with document frequency counted over the reference sets
(one document = one item's references) and idf = log(#items) - log(max(1, df)); the candidate
vector is clipped by the reference vector; cosine similarity times a Gaussian length penalty
exp(-delta^2 / (2 sigma^2)), sigma = 6; mean over n, mean over references, x10. As in the
toolkit, "length" for the penalty counts BIGRAMS (its ``if n == 1`` tests the 0-based n-gram
index), which we keep for identical numbers.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Sequence

from mm.errors import MMError

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def tokenize(text: str) -> list[str]:
    """Lowercase, punctuation -> spaces, split: "A dog, running." -> ["a", "dog", "running"]."""
    return str(text).lower().translate(_PUNCT_TO_SPACE).split()


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of every 1..n-gram (as tuples) in ``words``."""
    counts = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise MMError(f"{len(candidates)} captions but {len(references)} reference sets; "
                      "give one set per caption")
    if not candidates:
        raise MMError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise MMError(f"item {i} needs a list of reference captions (got {refs!r})")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (list of n floats in 0..1) as pycocoevalcap's Bleu(4) returns them."""
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9  # the toolkit's constants: guess 0 gives ~0, never a division by 0
    correct, guess = [0] * n, [0] * n
    test_len, ref_len = 0, 0
    for cand, refs in zip(candidates, references):
        words = tokenize(cand)
        ref_words = [tokenize(r) for r in refs]
        max_ref_counts: dict[tuple, int] = {}
        for rw in ref_words:
            for g, c in _ngrams(rw, n).items():
                max_ref_counts[g] = max(max_ref_counts.get(g, 0), c)
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(max_ref_counts.get(g, 0), c)  # clipped counts
        for k in range(1, n + 1):
            guess[k - 1] += max(0, len(words) - k + 1)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]  # closest

    ratio = (test_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)) * brevity)
    return scores


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in 0..1."""
    return bleu(candidates, references, 4)[3]


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, n: int):
    """tf-idf vector per n-gram order, its norms, and the toolkit's 'length' (bigram count)."""
    vec = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for g, tf in counts.items():
        k = len(g) - 1
        vec[k][g] = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[g])))
        norm[k] += vec[k][g] ** 2
        if k == 1:  # the toolkit's length: counts bigrams (see module docstring)
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(hyp, ref, sigma: float, n: int) -> list[float]:
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma ** 2))
    vals = []
    for k in range(n):
        # Clipping: a candidate n-gram counts at most as much as the reference's weight.
        val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
        if norm_h[k] != 0 and norm_r[k] != 0:
            val /= norm_h[k] * norm_r[k]
        vals.append(val * penalty)
    return vals


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0,
            n: int = 4) -> tuple[float, list[float]]:
    """CIDEr-D over the corpus: (mean score, per-item scores). Document frequencies come from
    these references, so scores depend on the whole evaluated set (as in coco-caption)."""
    _check(candidates, references)
    ref_counts = [[_ngrams(tokenize(r), n) for r in refs] for refs in references]
    doc_freq = Counter()
    for refs in ref_counts:
        doc_freq.update({g for c in refs for g in c})
    log_num_docs = math.log(float(len(references)))
    scores = []
    for cand, refs in zip(candidates, ref_counts):
        hyp = _tfidf(_ngrams(tokenize(cand), n), doc_freq, log_num_docs, n)
        total = [0.0] * n
        for r in refs:
            for k, v in enumerate(_cider_sim(hyp, _tfidf(r, doc_freq, log_num_docs, n), sigma, n)):
                total[k] += v
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu1".."bleu4", "cider"} for generated captions against references."""
    out = {f"bleu{k + 1}": v for k, v in enumerate(bleu(candidates, references, 4))}
    out["cider"] = cider_d(candidates, references)[0]
    return out
