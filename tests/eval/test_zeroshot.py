"""Zero-shot classification on constructed embeddings; linear probe on separable data."""

import math

import pytest
import torch

from mm.errors import MMError
from mm.eval.zeroshot import class_text_embeddings, linear_probe, zero_shot_accuracy

VOCAB = ["photo", "drawing", "circle", "square", "star"]


def bag_of_words(texts):
    """A stand-in text encoder: counts of the VOCAB words (others ignored)."""
    out = torch.zeros(len(texts), len(VOCAB))
    for i, t in enumerate(texts):
        for w in t.replace(".", "").split():
            if w in VOCAB:
                out[i, VOCAB.index(w)] += 1
    return out


def test_class_embedding_is_normalised_mean_of_normalised_prompts():
    calls = []

    def embed(texts):
        calls.append(texts)
        return bag_of_words(texts)

    emb = class_text_embeddings(["circle", "square"], ["a photo of a {label}", "{} drawing"], embed)
    assert calls[0] == ["a photo of a circle", "circle drawing"]
    # (photo + circle)/sqrt2 and (circle + drawing)/sqrt2, averaged and renormalised:
    # (photo + 2 circle + drawing) / sqrt6
    expected = torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0]) / math.sqrt(6)
    assert torch.allclose(emb[0], expected)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2))


def test_zero_shot_topk_on_constructed_case():
    class_emb = torch.eye(3)
    image_emb = torch.tensor([
        [1.0, 0.1, 0.0],   # label 0: nearest 0                      -> top1 hit
        [0.2, 1.0, 0.5],   # label 2: order 1, 2, 0                  -> top2 hit
        [0.0, 0.3, 1.0],   # label 2: nearest 2                      -> top1 hit
        [0.5, 0.4, 0.1],   # label 2: order 0, 1, 2                  -> top3 hit only
    ])
    labels = [0, 2, 2, 2]
    acc = zero_shot_accuracy(image_emb, class_emb, labels, topk=(1, 2, 3))
    assert acc == pytest.approx({"top1": 50.0, "top2": 75.0, "top3": 100.0})
    assert zero_shot_accuracy(image_emb, class_emb, labels)["top5"] == 100.0  # k capped at 3 classes


def test_zero_shot_end_to_end_with_prompts():
    labels = ["circle", "square", "star"]
    class_emb = class_text_embeddings(labels, ["a photo of a {label}.", "a {label} drawing."], bag_of_words)
    # "images" that look like their class word plus a bit of the shared template words
    image_emb = torch.zeros(6, len(VOCAB))
    targets = [0, 1, 2, 2, 1, 0]
    for i, c in enumerate(targets):
        image_emb[i, 2 + c] = 1.0
        image_emb[i, 0] = 0.3
    assert zero_shot_accuracy(image_emb, class_emb, targets, topk=(1,))["top1"] == 100.0


def test_zero_shot_errors():
    with pytest.raises(MMError, match="placeholder"):
        class_text_embeddings(["a"], ["no placeholder"], bag_of_words)
    with pytest.raises(MMError, match="same D"):
        zero_shot_accuracy(torch.ones(2, 3), torch.ones(2, 4), [0, 1])
    with pytest.raises(MMError, match="class indices"):
        zero_shot_accuracy(torch.ones(2, 3), torch.eye(3), [0, 5])


def blobs(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, -4.0, 0, 0]])
    feats = torch.cat([c + 0.5 * torch.randn(n_per_class, 5, generator=g) for c in centers])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return feats, labels


def test_linear_probe_separates_separable_data_deterministically():
    x_tr, y_tr = blobs(20, seed=1)
    x_te, y_te = blobs(10, seed=2)
    a = linear_probe(x_tr, y_tr, x_te, y_te, epochs=30, lr=0.5)
    assert a["top1"] == 100.0 and a["train_top1"] == 100.0
    with torch.no_grad():  # works when called under no_grad, and repeats exactly
        b = linear_probe(x_tr, y_tr, x_te, y_te, epochs=30, lr=0.5)
    assert a == b


def test_linear_probe_is_not_trivially_perfect():
    # Random labels on random features: the probe cannot generalise (chance is ~33%).
    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.randn(60, 5, generator=g), torch.randn(300, 5, generator=g)
    y_tr, y_te = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (300,), generator=g)
    assert linear_probe(x_tr, y_tr, x_te, y_te, epochs=30)["top1"] < 60.0
    with pytest.raises(MMError, match="labels"):
        linear_probe(x_tr, y_tr[:10], x_te, y_te)
