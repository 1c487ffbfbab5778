"""Image-text retrieval metrics: Recall@K both ways, RSUM, and ITM re-ranking of the ITC top-k.

Conventions (as ALBEF/BLIP report COCO/Flickr retrieval):
- ``sim`` is (Ni, Nt): row i = image i, column t = text t; higher = more similar.
- An image can have several captions (``img_to_txt[i]`` lists its positive texts). Image→text
  counts a hit at K when ANY positive text ranks in the top K; text→image uses the text's image.
- Ties are counted against the model: a positive shares its rank with every negative scoring the
  same or higher, so a constant similarity matrix scores 0, not 100.
- Recalls are percentages; RSUM is the sum of the six recalls (R@1/5/10 both ways).
- Positives come as lists (``img_to_txt``) or as an (Ni, Nt) bool matrix. On the shapes data the
  matrix is the truth function over the metadata (``shapes_positives``): a caption is a hit for
  every image it is true of, so a perfect model scores 100 (DESIGN.md §6). ``recall_report``
  gives those multi-positive figures and the single-positive ones (each caption a hit only for
  its own images) as ``*_single``.
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


def _positive_mask(img_to_txt, num_images: int, num_texts: int) -> torch.Tensor:
    if torch.is_tensor(img_to_txt) or hasattr(img_to_txt, "dtype"):  # a bool matrix
        pos = torch.as_tensor(img_to_txt).bool().cpu()
        if pos.shape != (num_images, num_texts):
            raise MMError(f"the positives matrix has shape {tuple(pos.shape)} "
                          f"but the similarity matrix has {(num_images, num_texts)}")
        return _check_coverage(pos)
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
    return _check_coverage(pos)


def _check_coverage(pos: torch.Tensor) -> torch.Tensor:
    """Every image needs a positive text and every text a positive image (else its recall is
    undefined, and with a truth matrix it means the truth function disagrees with the data)."""
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


def recall_at_k(sim, img_to_txt, k: Sequence[int] = (1, 5, 10),
                sim_t2i=None) -> dict[str, float]:
    """Recall@K image→text and text→image (percent) and RSUM.

    ``img_to_txt`` lists each image's positive texts, or is an (Ni, Nt) bool matrix of positives.
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


def shapes_positives(texts: list[str], metas: list, own_text: list[int]) -> tuple[torch.Tensor | None, str]:
    """The (images, texts) truth matrix of shapes captions, or None and why it cannot be built.

    ``metas`` is each image's json metadata and ``own_text[i]`` the text of image i's own caption.
    None (single positives) when a sample has no shapes metadata or a text is not a shapes
    caption. A caption that is false of its own image is an error: the truth function and the
    data disagree, and the figures would be wrong.
    """
    from mm.data.shapes_truth import is_shapes_meta, truth_matrix

    if len(metas) != len(own_text) or not metas or not all(is_shapes_meta(m) for m in metas):
        return None, "the samples carry no shapes metadata: each caption is a hit only for its own image"
    try:
        truth = torch.from_numpy(truth_matrix(texts, metas))  # (Ni, Nt) bool
    except ValueError as e:
        return None, f"{e}: each caption is a hit only for its own image"
    own = truth[torch.arange(len(own_text)), torch.tensor(own_text)]
    if not own.all():
        i = int((~own).nonzero()[0])
        raise MMError(f"caption {texts[own_text[i]]!r} is false of its own image {i} by mm.data.shapes_truth; "
                      "the shards and the truth function disagree (regenerate them with `mm data shapes`)")
    return truth, "a caption is a hit for every image it is true of"


def recall_report(sim, single: Sequence[Sequence[int]], truth: torch.Tensor | None = None,
                  sim_t2i=None, k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and RSUM with ``truth`` positives (single ones when it is None), plus the
    single-positive figures as ``*_single`` (``i2t_r1_single``, …, ``rsum_single``)."""
    single_r = recall_at_k(sim, single, k, sim_t2i=sim_t2i)
    out = dict(single_r) if truth is None else recall_at_k(sim, truth, k, sim_t2i=sim_t2i)
    out.update({f"{name}_single": v for name, v in single_r.items()})
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
