"""Image-text retrieval metrics: Recall@K both ways, RSUM, and ITM re-ranking of the ITC top-k.

Conventions (as ALBEF/BLIP report COCO/Flickr retrieval):
- ``sim`` is (Ni, Nt): row i = image i, column t = text t; higher = more similar.
- An image can have several captions (``img_to_txt[i]`` lists its positive texts). Image→text
  counts a hit at K when ANY positive text ranks in the top K; text→image uses the text's image.
- Ties are counted against the model: a positive shares its rank with every negative scoring the
  same or higher, so a constant similarity matrix scores 0, not 100.
- Recalls are percentages; RSUM is the sum of the six recalls (R@1/5/10 both ways).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mm.errors import MMError


def _as_matrix(sim) -> torch.Tensor:
    sim = torch.as_tensor(sim).detach().float().cpu()
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise MMError("retrieval needs a non-empty (images, texts) similarity matrix, "
                      f"got shape {tuple(sim.shape)}")
    return sim


def _positive_mask(img_to_txt: Sequence[Sequence[int]], num_images: int, num_texts: int) -> torch.Tensor:
    if len(img_to_txt) != num_images:
        raise MMError(f"img_to_txt lists {len(img_to_txt)} images "
                      f"but the similarity matrix has {num_images} rows")
    pos = torch.zeros(num_images, num_texts, dtype=torch.bool)
    for i, texts in enumerate(img_to_txt):
        for t in texts:
            if not 0 <= int(t) < num_texts:
                raise MMError(f"image {i} lists text {t}, "
                              f"outside the {num_texts} texts of the similarity matrix")
            pos[i, int(t)] = True
    if not pos.any(1).all():
        first = int((~pos.any(1)).nonzero()[0])
        raise MMError(f"image {first} has no caption; every image needs at least one")
    if not pos.any(0).all():
        first = int((~pos.any(0)).nonzero()[0])
        raise MMError(f"text {first} belongs to no image; every text needs its image")
    return pos


def _ranks(sim: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row: 0-based rank of the best positive = number of negatives scoring >= it."""
    best_pos = sim.masked_fill(~pos, float("-inf")).max(1, keepdim=True).values  # (N, 1)
    return ((sim >= best_pos) & ~pos).sum(1)  # (N,)


def recall_at_k(sim, img_to_txt: Sequence[Sequence[int]], k: Sequence[int] = (1, 5, 10),
                sim_t2i=None) -> dict[str, float]:
    """Recall@K image→text and text→image (percent) and RSUM.

    ``sim_t2i`` (same shape) is used for the text→image direction when given — after ITM
    re-ranking the two directions have different scores (see ``rerank_topk``).
    Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "rsum"}``.
    """
    sim = _as_matrix(sim)
    pos = _positive_mask(img_to_txt, *sim.shape)
    sim_t2i = sim if sim_t2i is None else _as_matrix(sim_t2i)
    if sim_t2i.shape != sim.shape:
        raise MMError(f"sim_t2i has shape {tuple(sim_t2i.shape)} but sim has {tuple(sim.shape)}")
    rank_i2t = _ranks(sim, pos)  # (Ni,)
    rank_t2i = _ranks(sim_t2i.t(), pos.t())  # (Nt,)
    out = {}
    for kk in k:
        out[f"i2t_r{kk}"] = 100.0 * (rank_i2t < kk).float().mean().item()
    for kk in k:
        out[f"t2i_r{kk}"] = 100.0 * (rank_t2i < kk).float().mean().item()
    out["rsum"] = sum(out.values())
    return out


def _score_pairs(pairs: torch.Tensor, score_fn: Callable, batch_size: int) -> torch.Tensor:
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]  # (B, 2): (image index, text index)
        s = torch.as_tensor(score_fn(chunk)).detach().float().cpu().reshape(-1)
        if s.numel() != len(chunk):
            raise ValueError(f"score_fn returned {s.numel()} scores for {len(chunk)} pairs")
        scores.append(s)
    return torch.cat(scores) if scores else torch.zeros(0)


def rerank_topk(sim, k: int, score_fn: Callable[[torch.Tensor], torch.Tensor],
                batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score the ITC top-k of each image (over texts) and of each text (over images) with ITM.

    ``score_fn(pairs)`` gets a LongTensor (B, 2) of (image index, text index) and returns B
    scores (e.g. the ITM "match" logit); it is called on at most ``batch_size`` pairs at a time so
    5k images x 25k captions never needs the fused model on everything at once. A pair that is in
    both directions' top-k is scored once.

    Returns ``(sim_i2t, sim_t2i)``, both (Ni, Nt): re-ranked pairs carry their ITM score and rank
    above every other pair, which keep their ITC order below. With k = 0 both are ``sim``.
    """
    sim = _as_matrix(sim)
    if k <= 0:
        return sim, sim
    ni, nt = sim.shape
    k_txt, k_img = min(k, nt), min(k, ni)
    top_txt = sim.topk(k_txt, dim=1).indices  # (Ni, k): candidate texts per image
    top_img = sim.topk(k_img, dim=0).indices  # (k, Nt): candidate images per text
    pairs_i2t = torch.stack([torch.arange(ni).repeat_interleave(k_txt), top_txt.reshape(-1)], 1)
    pairs_t2i = torch.stack([top_img.t().reshape(-1), torch.arange(nt).repeat_interleave(k_img)], 1)

    unique, inverse = torch.unique(torch.cat([pairs_i2t, pairs_t2i]), dim=0, return_inverse=True)
    scores = _score_pairs(unique, score_fn, max(1, batch_size))[inverse]
    s_i2t, s_t2i = scores[: len(pairs_i2t)], scores[len(pairs_i2t):]

    # Shift ITC scores below the lowest ITM score so every re-ranked pair comes first.
    floor = sim - (sim.max() - scores.min() + 1.0)
    sim_i2t, sim_t2i = floor.clone(), floor.clone()
    sim_i2t[pairs_i2t[:, 0], pairs_i2t[:, 1]] = s_i2t
    sim_t2i[pairs_t2i[:, 0], pairs_t2i[:, 1]] = s_t2i
    return sim_i2t, sim_t2i
