"""The four pretraining objectives as functions of an MMModel and a batch.

    itc_loss       image embedding (backbone + null context, pooled) vs text embedding (encoder,
                   pooled); InfoNCE both ways over the GLOBAL batch (features gathered with grad)
    itm_loss       fused states (backbone + text) -> match / no match; one hard negative text per
                   image and one hard negative image per text, sampled ∝ softmax(ITC similarity)
    caption_loss   TextDecoder next-token cross-entropy over the caption, padding ignored
    t2i_loss       next-code cross-entropy over the VQ grid in raster order; each sample's text is
                   replaced by the null context with probability p (classifier-free guidance);
                   optionally (objectives.t2i_future) a binary cross-entropy of which codes are
                   still to come in each region of the grid, from the same states

Distributed: when torch.distributed is initialised, ITC gathers the embeddings of every rank with
an autograd all-gather (``gather_with_grad``: its backward sends each rank the gradient of its
own features), so the loss and gradients on W ranks equal those of one process on the W batches
concatenated. Every process must call these functions in the same order (they hold collectives).
Randomness (hard negatives, CFG dropout) uses torch's global RNG, which the trainer checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mm.errors import MMError

# ---------------------------------------------------------------------------------------------
# Collectives


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and hands each
    rank the rows it owns. Ours rather than ``torch.distributed.nn.functional.all_gather``: that one
    is deprecated in torch 2.13, and with it about one 2-process gloo run in ten aborted at exit
    ("terminate called without an active exception") after finishing its work (0 in 45 with this)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # (B, ...) -> (W*B, ...)
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # (W*B, ...) -> (B, ...)
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad)  # the sum of every rank's loss gradient
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order; gradients flow back to each owner."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, as constants."""
    _, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def pad_to(x: Tensor, length: int, value=0) -> Tensor:
    """Right-pad dim 1 of (B, L, ...) to ``length`` so every rank gathers the same shape."""
    if x.shape[1] >= length:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad, value=value)


# ---------------------------------------------------------------------------------------------
# ITC


def itc_logits(img: Tensor, txt: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Local unit embeddings (B, E) -> (logits_i2t (B, G), logits_t2i (B, G), targets (B,)).

    Row i of the local batch is sample ``rank*B + i`` of the global batch of G = W*B samples.
    """
    rank, _ = world()
    img_all, txt_all = gather_with_grad(img), gather_with_grad(txt)  # (G, E) each
    logits_i2t = scale * img @ txt_all.t()  # (B, G)
    logits_t2i = scale * txt @ img_all.t()  # (B, G)
    targets = rank * img.shape[0] + torch.arange(img.shape[0], device=img.device)
    return logits_i2t, logits_t2i, targets


def itc_loss(img: Tensor, txt: Tensor, scale: Tensor) -> tuple[Tensor, dict[str, float], Tensor, Tensor]:
    """InfoNCE both ways: (CE(image -> its text) + CE(text -> its image)) / 2, mean over local rows.

    Returns (loss, metrics, logits_i2t, logits_t2i); the logits feed hard-negative sampling.
    """
    logits_i2t, logits_t2i, targets = itc_logits(img.float(), txt.float(), scale.float())
    loss = 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))
    with torch.no_grad():
        acc = 0.5 * ((logits_i2t.argmax(1) == targets).float().mean() + (logits_t2i.argmax(1) == targets).float().mean())
    return loss, {"itc_acc": float(acc)}, logits_i2t, logits_t2i


# ---------------------------------------------------------------------------------------------
# ITM


def same_text(ids: Tensor, mask: Tensor, ids_all: Tensor, mask_all: Tensor) -> Tensor:
    """(B, G) bool: local caption i and global caption j are identical token sequences.

    Includes each row's own positive. Token equality is what the model sees, so two captions that
    only differ after truncation count as identical too.
    """
    a = ids.masked_fill(~mask.bool(), -1)  # padding never makes two texts differ
    b = ids_all.masked_fill(~mask_all.bool(), -1)
    length = max(a.shape[1], b.shape[1])
    a, b = pad_to(a, length, -1), pad_to(b, length, -1)
    return (a[:, None, :] == b[None, :, :]).all(-1)  # (B, G)


@torch.no_grad()
def sample_negatives(logits: Tensor, excluded: Tensor, hard: bool = True) -> Tensor:
    """One negative column per row: P(j) ∝ softmax(logits[i])_j over the columns not excluded.

    logits (B, G) ITC logits (already scaled by the temperature); excluded (B, G) bool (the
    positive and identical captions). ``hard=False`` samples uniformly among allowed columns.
    Returns (B,) long column indices, -1 for rows where every column is excluded.
    """
    scores = logits.float() if hard else torch.zeros_like(logits, dtype=torch.float)
    scores = scores.masked_fill(excluded, float("-inf"))
    ok = ~excluded.all(1)  # (B,)
    probs = torch.softmax(scores.masked_fill(~ok[:, None], 0.0), dim=1)  # renormalised over allowed
    idx = torch.multinomial(probs, 1).squeeze(1)  # (B,)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def itm_pairs(images: Tensor, text_states: Tensor, text_mask: Tensor, ids: Tensor, mask: Tensor,
              logits_i2t: Tensor, logits_t2i: Tensor, hard: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ITM pairs: B positives, then (image, hard negative text), then (hard negative image, text).

    images (B, C, H, W); text_states (B, L, D) and text_mask (B, L) from the encoder (local rows);
    ids/mask (B, L) token ids (for identical-caption exclusion); logits_* (B, G) from ITC.
    Returns (images (P, C, H, W), states (P, L, D), mask (P, L), labels (P,)), label 1 = match.
    Rows whose every candidate has the same caption get no negative.
    """
    length = ids.shape[1]
    states_all = gather_with_grad(pad_to(text_states, length))  # (G, L, D)
    tmask_all = gather_no_grad(pad_to(text_mask, length, False))  # (G, L)
    ids_all, mask_all = gather_no_grad(ids), gather_no_grad(mask.bool())  # (G, L)
    images_all = gather_no_grad(images)  # (G, C, H, W) pixels are constants; patches recomputed here

    excluded = same_text(ids, mask, ids_all, mask_all)  # (B, G); identical captions are not negatives
    neg_txt = sample_negatives(logits_i2t, excluded, hard)  # (B,) a text for each image
    neg_img = sample_negatives(logits_t2i, excluded, hard)  # (B,) an image for each text
    has_t, has_i = neg_txt >= 0, neg_img >= 0

    pair_images = torch.cat([images, images[has_t], images_all[neg_img[has_i]]])
    pair_states = torch.cat([text_states, states_all[neg_txt[has_t]], text_states[has_i]])
    pair_mask = torch.cat([text_mask, tmask_all[neg_txt[has_t]], text_mask[has_i]])
    labels = torch.zeros(len(pair_images), dtype=torch.long, device=images.device)
    labels[: images.shape[0]] = 1
    return pair_images, pair_states, pair_mask, labels


def itm_loss(model, images: Tensor, text_states: Tensor, text_mask: Tensor, ids: Tensor, mask: Tensor,
             logits_i2t: Tensor, logits_t2i: Tensor, hard: bool = True) -> tuple[Tensor, dict[str, float]]:
    """Binary cross-entropy (2-way softmax) of the fused model on the pairs of ``itm_pairs``."""
    pair_images, pair_states, pair_mask, labels = itm_pairs(images, text_states, text_mask, ids, mask,
                                                            logits_i2t, logits_t2i, hard)
    logits = model.itm_logits(model.fuse(pair_images, pair_states, pair_mask)).float()  # (P, 2)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, {"itm_acc": float(acc)}


# ---------------------------------------------------------------------------------------------
# Captioning and text-to-image


def caption_loss(model, image_states: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy of the caption given the image states; pad targets are ignored."""
    logits = model.caption_logits(image_states, ids, mask).float()  # (B, L, V)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)  # (B, L-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, {}


def cfg_drop(model, text_states: Tensor, text_mask: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Replace each sample's text by the null context with probability p (torch's global RNG).

    Returns (states, mask, dropped (B,) bool). The draw happens even when p is 0 or 1, so the
    RNG stream does not depend on p.
    """
    b, length = text_mask.shape
    dropped = torch.rand(b, device=text_states.device) < p  # (B,)
    n = model.config.null_context_len
    if length < n:  # the null context must fit beside the text
        text_states, text_mask = pad_to(text_states, n), pad_to(text_mask, n, False)
        length = n
    null_states, null_mask = model.null_context(b, length)  # (B, L, D), (B, L)
    states = torch.where(dropped[:, None, None], null_states.to(text_states.dtype), text_states)
    mask = torch.where(dropped[:, None], null_mask, text_mask.bool())
    return states, mask, dropped


def object_code_weights(codes: Tensor, inside: Tensor, k: int, weight: float) -> Tensor:
    """Per-code T2I loss weights (K,): 1 + (weight - 1)·f_c, where f_c is the share of code c's
    occurrences in ``codes`` (B, N) that fall inside an object box (``inside`` (B, N) bool)."""
    total = torch.bincount(codes.flatten(), minlength=k).float()
    within = torch.bincount(codes.flatten(), weights=inside.flatten().float(), minlength=k).float()
    return 1.0 + (weight - 1.0) * within / total.clamp(min=1)


def object_weights(metas: list, grid: tuple[int, int], image_size: int, weight: float) -> Tensor | None:
    """(B, h*w) weights over an h×w grid laid on the image (e.g. the VQ code grid): ``weight`` for
    cells that overlap an object's bbox (json ``objects[].bbox`` in the stored image's pixels, mapped
    through the centred square crop the model sees), 1 elsewhere. Returns None when ``weight`` is
    1 or a sample has no ``objects`` (other data).
    """
    from mm.data.transforms import box_grid_span
    from mm.tasks.detect import frame_size

    if weight == 1.0 or not metas or any(not isinstance(m, dict) or "objects" not in m for m in metas):
        return None
    out = torch.ones(len(metas), *grid)
    for i, meta in enumerate(metas):
        frame = frame_size(meta) or (image_size, image_size)  # boxes are in the stored image's pixels
        for o in meta["objects"]:
            r0, r1, c0, c1 = box_grid_span(o["bbox"], frame, grid)
            out[i, r0:r1, c0:c1] = weight
    return out.flatten(1)  # (B, N)


def weighted_ce(logits: Tensor, targets: Tensor, log_w: Tensor) -> Tensor:
    """sum_y w_y·CE / sum_y w_y of the raw logits (calibrated ``logits`` (B, N, V) + log w (V,)), the
    loss of a model trained with per-token weights w: its optimum is softmax ∝ w·p, so the calibrated
    logits give p. targets (B, N)."""
    log_w = log_w.float()
    ce = F.cross_entropy((logits + log_w).transpose(1, 2), targets, reduction="none")  # (B, N)
    w = log_w.exp()[targets]  # (B, N)
    return (ce * w).sum() / w.sum()


def t2i_loss(model, codes: Tensor, text_states: Tensor | None, text_mask: Tensor | None,
             future: bool = False, future_positions: int = 0, plan: Tensor | None = None
             ) -> tuple[Tensor, dict[str, float], Tensor]:
    """Cross-entropy of every code given the text and the codes before it in raster order.

    codes (B, h, w) long. A model with T2I code weights w (``set_t2i_code_weights``) is trained
    with the w-weighted cross-entropy of its head's raw logits (sum w_y·CE / sum w_y), whose
    optimum is softmax ∝ w·p; the logits it returns subtract log w, so sampling sees p again.
    ``future`` (a model with a future head, ``set_t2i_future``): also the future-codes loss
    (``t2i_future_loss``), returned as the tensor ``metrics["t2i_future"]``.
    ``plan`` (B, t, t) or (B, P) (a model with ``t2i_plan``: ``model.t2i_plan_tokens(images)``): the
    codes are conditioned on it, and its own cross-entropy (the mean over all plan tokens; w-weighted
    as the codes' for a model with plan weights, ``set_t2i_plan_weights``) is returned as the tensor
    ``metrics["t2i_plan"]``; with several levels each level's mean is also logged as
    ``metrics["t2i_plan{t}"]``. (Each level's mean summed instead, so that a 3x3 level weighs as much
    beside a 6x6 one as alone, scored 51 against 58 % at 3,000 steps: BENCHMARKS.md, session 19.)
    Returns (loss, metrics, per-position correct (B, N) bool).
    """
    states = model.t2i_states(codes, text_states, text_mask, plan)  # (B, P+N, D)
    n_plan = states.shape[1] - codes[0].numel()
    plan_states, states = states[:, :n_plan], states[:, n_plan:]  # (B, P, D), (B, N, D)
    logits = model.code_logits(states).float()  # (B, N, K), calibrated
    targets = codes.flatten(1)  # (B, N)
    if not getattr(model.config, "t2i_code_weights", False):
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    else:
        loss = weighted_ce(logits, targets, model.t2i_log_weight)
    correct = logits.argmax(-1) == targets
    metrics = {"t2i_acc": float(correct.float().mean())}
    if future:
        metrics["t2i_future"] = t2i_future_loss(model, states, codes, future_positions)
    if n_plan:
        plan_logits = model.plan_logits(plan_states).float()  # (B, P, V), calibrated
        targets = plan.flatten(1)  # (B, P)
        ce = F.cross_entropy(plan_logits.transpose(1, 2), targets, reduction="none")  # (B, P)
        sides = model.code_embed.plan
        if not getattr(model.config, "t2i_plan_weights", False):
            metrics["t2i_plan"] = ce.mean()
        else:  # as for the codes
            metrics["t2i_plan"] = weighted_ce(plan_logits, targets, model.t2i_plan_log_weight)
        if len(sides) > 1:  # each level's calibrated CE (comparable with or without weights)
            levels = ce.detach().split([t * t for t in sides], dim=1)
            metrics.update({f"t2i_plan{t}": float(v.mean()) for t, v in zip(sides, levels)})
    return loss, metrics, correct


def future_code_targets(codes: Tensor, positions: Tensor, regions: int, num_codes: int) -> Tensor:
    """Which codes are still to come, per region: (B, P, r*r, K) in {0, 1}.

    codes (B, h, w); positions (P,) raster indices. Entry [b, p, j, k] is 1 when code k occurs in
    image b at a raster position >= positions[p] inside region j (the grid cut into r x r near-equal
    blocks, numbered row by row). With r = 1: the bag of codes from position p to the end.
    """
    _, h, w = codes.shape
    n = torch.arange(h * w, device=codes.device)
    region = F.one_hot((n // w * regions // h) * regions + n % w * regions // w, regions * regions)  # (N, R)
    later = n[None, :] >= positions[:, None]  # (P, N)
    onehot = F.one_hot(codes.flatten(1), num_codes)  # (B, N, K)
    return torch.einsum("pn,nr,bnk->bprk", later.float(), region.float(), onehot.float()).clamp(max=1)


def t2i_future_loss(model, states: Tensor, codes: Tensor, positions: int = 0) -> Tensor:
    """Mean binary cross-entropy of the future head (``model.t2i_future_head``), states (B, N, D):
    at every raster position, or at ``positions`` > 0 of them drawn without replacement (torch's
    global RNG; cheaper when the head is large, regions x regions x K outputs).

    Why: a next-code loss rewards knowing what is left to draw (nothing drawn yet, so the object
    must come; one drawn, so no other) by ~1 nat per image out of ~150, and where it goes by
    log 9; this target asks every state for it directly (BENCHMARKS.md, session 17)."""
    c = model.config
    if model.t2i_future_head is None:
        raise MMError("the future-codes loss needs the model's future head; call model.set_t2i_future(regions)")
    n = states.shape[1]
    pos = torch.randperm(n, device=states.device)[:positions] if positions else torch.arange(n, device=states.device)
    target = future_code_targets(codes, pos, c.t2i_future_regions, c.codebook_size)  # (B, P, R, K)
    logits = model.t2i_future_head(states[:, pos]).float()  # (B, P, R*K)
    return F.binary_cross_entropy_with_logits(logits, target.flatten(2))
