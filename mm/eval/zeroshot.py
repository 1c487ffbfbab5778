"""Zero-shot classification through the ITC embedding space, and a linear probe.

Zero-shot (as CLIP): each class is the normalised mean of its prompt embeddings
("a photo of a {label}", ...); an image is assigned the class whose embedding is most similar.
Linear probe: multinomial logistic regression on frozen image features, trained full-batch and
deterministically (zero init, no shuffling), so the same features give the same accuracy.
Accuracies are percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mm.errors import MMError

DEFAULT_TEMPLATES = ("a photo of a {label}.", "a picture of a {label}.", "an image of a {label}.")


def class_text_embeddings(labels: Sequence[str], templates: Sequence[str],
                          embed_text_fn: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """(C, D) class embeddings: normalised mean of the normalised template embeddings.

    Templates use ``{label}`` or ``{}`` for the class name. ``embed_text_fn(texts)`` returns a
    (len(texts), D) tensor, e.g. the model's pooled, projected ITC text embedding.
    """
    if not labels:
        raise MMError("zero-shot classification needs at least one class label")
    if not templates or any("{label}" not in t and "{}" not in t for t in templates):
        raise MMError('every prompt template needs a "{label}" placeholder, e.g. "a photo of a {label}"')
    classes = []
    for label in labels:
        texts = [t.format(label, label=label) for t in templates]
        emb = torch.as_tensor(embed_text_fn(texts)).float()  # (T, D)
        if emb.dim() != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"embed_text_fn returned shape {tuple(emb.shape)} for {len(texts)} texts")
        classes.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))  # (D,)
    return torch.stack(classes)  # (C, D)


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int]) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits, for each k (capped at C)."""
    num_classes = logits.shape[1]
    order = logits.topk(min(max(topk), num_classes), dim=1).indices  # (N, kmax)
    hits = order == labels[:, None]  # (N, kmax)
    return {f"top{k}": 100.0 * hits[:, : min(k, num_classes)].any(1).float().mean().item() for k in topk}


def _check_labels(labels, n: int, num_classes: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != n:
        raise MMError(f"{what}: {labels.numel()} labels for {n} feature rows")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise MMError(f"{what}: labels must be class indices in 0..{num_classes - 1}")
    return labels


def zero_shot_accuracy(image_emb, class_emb, labels, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) of nearest-class-embedding classification by cosine similarity."""
    image_emb = F.normalize(torch.as_tensor(image_emb).float(), dim=-1)  # (N, D)
    class_emb = F.normalize(torch.as_tensor(class_emb).float(), dim=-1)  # (C, D)
    if image_emb.dim() != 2 or class_emb.dim() != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise MMError(f"image embeddings {tuple(image_emb.shape)} and class embeddings "
                      f"{tuple(class_emb.shape)} must be (N, D) and (C, D) with the same D")
    if image_emb.shape[0] == 0:
        raise MMError("zero-shot classification got no images")
    labels = _check_labels(labels, image_emb.shape[0], class_emb.shape[0], "zero-shot")
    return _topk_accuracy(image_emb @ class_emb.t(), labels, topk)  # logits (N, C)


def linear_probe(train_feats, train_labels, test_feats, test_labels, epochs: int = 200, lr: float = 0.5,
                 weight_decay: float = 0.0, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Logistic-regression probe on frozen features: {"top1", "top5", "train_top1"} in percent.

    Features are standardised with the training mean/std; weights start at zero and are trained
    by full-batch gradient descent for ``epochs`` steps (L2 penalty ``weight_decay``) — no
    randomness anywhere, so results repeat exactly.
    """
    x_tr = torch.as_tensor(train_feats).detach().float()
    x_te = torch.as_tensor(test_feats).detach().float()
    if (x_tr.dim() != 2 or x_te.dim() != 2 or x_tr.shape[1] != x_te.shape[1]
            or len(x_tr) == 0 or len(x_te) == 0):
        raise MMError(f"linear probe needs non-empty (N, D) train and test features with the same D, "
                      f"got {tuple(x_tr.shape)} and {tuple(x_te.shape)}")
    y_tr = torch.as_tensor(train_labels).long().reshape(-1)
    num_classes = int(max(y_tr.max().item(), torch.as_tensor(test_labels).long().max().item())) + 1
    y_tr = _check_labels(y_tr, len(x_tr), num_classes, "linear probe (train)")
    y_te = _check_labels(test_labels, len(x_te), num_classes, "linear probe (test)")

    mean, std = x_tr.mean(0), x_tr.std(0, unbiased=False).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    weight = torch.zeros(x_tr.shape[1], num_classes, requires_grad=True)  # (D, C)
    bias = torch.zeros(num_classes, requires_grad=True)  # (C,)
    # Plain full-batch gradient descent: the loss is convex and the features standardised, so
    # this converges without an optimizer object (whose first step is slow to import).
    with torch.enable_grad():  # callers often evaluate under no_grad
        for _ in range(epochs):
            loss = F.cross_entropy(x_tr @ weight + bias, y_tr) + 0.5 * weight_decay * weight.pow(2).sum()
            g_w, g_b = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                weight -= lr * g_w
                bias -= lr * g_b
    with torch.no_grad():
        out = _topk_accuracy(x_te @ weight + bias, y_te, topk)
        out["train_top1"] = _topk_accuracy(x_tr @ weight + bias, y_tr, (1,))["top1"]
    return out
