"""Classification metrics: top-k accuracy, per-class accuracy, the confusion matrix and its picture.

Accuracies are percentages. Top-k with k at or above the number of classes counts every row as a
hit (the label is always among "the k best" when there are only k classes); the key keeps its
name (``top5``) so reports line up across data sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mm.errors import MMError


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %}: rows whose label is among the k highest logits."""
    logits, labels = torch.as_tensor(logits).float(), torch.as_tensor(labels).long().reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.numel() or labels.numel() == 0:
        raise MMError(f"top-k accuracy needs (N, C) logits and N labels, N > 0; got {tuple(logits.shape)} "
                      f"and {labels.numel()} labels")
    kmax = min(max(ks), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices == labels[:, None]  # (N, kmax)
    return {f"top{k}": 100.0 * hits[:, : min(k, kmax)].any(1).float().mean().item() for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    preds, labels = torch.as_tensor(preds).long().reshape(-1), torch.as_tensor(labels).long().reshape(-1)
    index = labels * num_classes + preds
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float]:
    """Percent correct per true class (NaN for a class with no samples)."""
    totals = matrix.sum(1).double()
    correct = matrix.diagonal().double()
    return [100.0 * float(c / t) if t > 0 else float("nan") for c, t in zip(correct, totals)]


def classification_report(logits: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Everything validation reports: top-1/top-5, mean per-class accuracy, per-class accuracy."""
    matrix = confusion_matrix(logits.argmax(1), labels, len(names))
    per_class = per_class_accuracy(matrix)
    seen = [a for a in per_class if a == a]  # classes present in the data (NaN != NaN)
    out = {**topk_accuracy(logits, labels, (1, 5)), "mean_class_accuracy": sum(seen) / max(len(seen), 1),
           "samples": float(labels.numel())}
    out.update({f"acc_{name}": acc for name, acc in zip(names, per_class) if acc == acc})
    return {"metrics": out, "confusion": matrix.tolist(), "labels": list(names)}


def save_confusion_png(matrix, names: list[str], path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG: counts in the cells, rows true, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.as_tensor(matrix).double()
    rates = m / m.sum(1, keepdim=True).clamp_min(1)  # colour by the row's share: rare classes show too
    n = len(names)
    side = min(2.0 + 0.45 * n, 16.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:  # beyond that the labels and counts are unreadable anyway
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
