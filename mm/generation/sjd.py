"""Speculative Jacobi decoding of image codes (SJD; Teng et al., ICLR 2025), training-free.

Plain decoding runs one forward per code. SJD keeps a window of W *draft* codes after the
accepted ones and checks them all in one forward, so an image takes fewer sequential forwards
while its codes keep exactly the distribution of plain sampling:

    accepted: c_0 … c_{a-1}      drafts: d_a … d_{a+W-1}, each drawn from a recorded q_i
    forward over [c_{a-1}, d_a, …, d_{a+W-2}] (KV cache: append, then roll back) → p_a … p_{a+W-1}
    for i = a, a+1, …:   accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
        first rejection: draw c_i from norm(max(0, p_i - q_i)) and stop
    the codes after the committed ones get new drafts drawn from this forward's p (the Jacobi step)

p_i at the first untested code is conditioned on accepted codes only, so the accept/resample
step gives an exact sample of it (the speculative sampling lemma); every code commits one more
code per forward at least. New drafts start as uniform random codes (q = 1/K); later ones are the
previous forward's p, conditioned on drafts that may since have been replaced: that is why they
are drafts and not samples. Guidance, temperature and top-k/top-p act on the logits before p is
formed, exactly as in the plain sampler, so "the distribution of plain sampling" is that of CFG
sampling with the same settings. Greedy (top-k 1) SJD returns the greedy codes exactly.

Batches: images accept at different rates. Each image keeps its own accepted count a_r and its
own window [a_r, a_r + W); one forward feeds the cells [min a, max a + W) for the whole batch
(capped at 2W tokens), and the cache rolls back to min a. Images ahead of the slowest re-feed some
accepted codes; their outputs are ignored. Randomness is counter-based per (seed, stream,
iteration, code): unless the 2W cap cuts a window, an image does not depend on the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm.errors import MMError
from mm.generation.sampler import (
    SamplingParams,
    branch_context,
    choose,
    counter_noise,
    guidance_scales,
    guide,
    pick,
    token_probs,
)

INIT, ACCEPT, RESIDUAL, DRAFT = 1, 2, 3, 4  # noise streams (plain sampling uses the 2-counter hash)
MAX_WINDOW = 256


def verify(p: Tensor, q: Tensor, drafts: Tensor, active: Tensor, u_accept: Tensor,
           u_residual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The acceptance rule over a window, for every row at once.

    p, q (B, T, K) target and draft distributions; drafts (B, T); active (B, T) the codes each row
    tests (a contiguous run). Returns (committed (B, T) bool, codes (B, T), n_committed (B,)):
    the accepted drafts up to the first rejection, plus the rejected code redrawn from the residual.
    """
    p_x = p.gather(-1, drafts[..., None]).squeeze(-1)  # (B, T)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    accept = u_accept * q_x <= p_x  # u <= p/q without dividing; q_x > 0 (the draft was drawn from q)
    reject = active & ~accept
    before = reject.cumsum(dim=1)  # (B, T) rejections so far, this code included
    kept = active & (before == 0)  # accepted drafts before the first rejection
    first = reject & (before == 1)  # the first rejection
    residual = (p - q).clamp(min=0)  # (B, T, K)
    # Rejection only happens where p_x < q_x, so the residual has mass; the fallback guards round-off.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    redrawn = pick(residual, u_residual)  # (B, T)
    codes = torch.where(first, redrawn, drafts)
    committed = kept | first
    return committed, codes, committed.sum(dim=1)


def window_q(q_row: Tensor, shift: Tensor) -> Tensor:
    """Slide each row's draft distributions (B, W, K) forward by shift (B,) codes; new slots uniform."""
    b, w, k = q_row.shape
    slot = torch.arange(w, device=q_row.device)[None, :] + shift[:, None]  # (B, W) old slot index
    moved = q_row.gather(1, slot.clamp(max=w - 1)[..., None].expand(b, w, k))
    return torch.where((slot < w)[..., None], moved, torch.full_like(moved, 1.0 / k))


@torch.no_grad()
def sample_codes_sjd(model, text: tuple[Tensor, Tensor] | None, seeds: Tensor, params: SamplingParams,
                     uncond: tuple[Tensor, Tensor] | None = None, window: int = 16, cache: str = "static",
                     progress=None, stats: dict | None = None) -> Tensor:
    """Sample (B, h, w) VQ codes by speculative Jacobi decoding (same arguments as sample_codes).

    window: draft codes checked per forward; stats: if a dict, filled with ``forwards`` (model
    forwards, the prefill included), ``codes`` per image and ``iterations``.
    """
    params.check()
    if not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise MMError(f"the SJD window must be an integer in [1, {MAX_WINDOW}], got {window}")
    if model.code_embed.plan:
        raise MMError("speculative Jacobi decoding does not draw a T2I plan (model.t2i_plan); sample without --sjd")
    h, w = model.config.code_grid
    n_codes, batch, k = h * w, seeds.shape[0], model.config.codebook_size
    dev = seeds.device
    states, mask, cfg = branch_context(model, text, uncond, params, batch)  # (B or 2B, Lt, D)
    scales = guidance_scales(params, n_codes, dev)  # (N,)

    logits, state = model.t2i_prefill(states, mask, cache=cache)  # cache holds the start token
    if cfg:
        logits = guide(logits, scales[0])
    cells = torch.arange(n_codes, device=dev)
    # Code 0 as the plain sampler draws it; every later code starts as a uniform random draft.
    tokens = (counter_noise(seeds, INIT, 0, cells) * k).long().clamp(max=k - 1)  # (B, N)
    tokens[:, 0] = choose(logits, seeds, 0, params)
    accepted = torch.ones(batch, dtype=torch.long, device=dev)  # (B,) a_r
    q_row = torch.full((batch, window, k), 1.0 / k, device=dev)  # q of cells a_r … a_r+W-1
    low, forwards, it = 1, 1, 0
    if progress is not None:
        progress()
    while low < n_codes:
        it += 1
        high = min(int(accepted.max()) + window, n_codes, low + 2 * window)
        t = high - low  # cells low … high-1 get outputs; inputs are cells low-1 … high-2
        p = window_probs(model, state, tokens[:, low - 1:high - 1], scales[low:high], params, cfg)  # (B, T, K)
        forwards += 1
        cell = cells[low:high]  # (T,)
        rel = cell[None, :] - accepted[:, None]  # (B, T) slot in each row's window
        end = torch.clamp(accepted + window, max=high)  # (B,) each row tests cells a_r … end-1
        active = (rel >= 0) & (cell[None, :] < end[:, None])
        q = q_row.gather(1, rel.clamp(0, window - 1)[..., None].expand(-1, -1, k))  # (B, T, K)
        committed, codes, n_new = verify(p, q, tokens[:, low:high], active,
                                         counter_noise(seeds, ACCEPT, it, cell),
                                         counter_noise(seeds, RESIDUAL, it, cell))
        new_accepted = accepted + n_new
        # Jacobi step: the cells after the committed ones, up to the row's window end, are redrawn
        # from this forward's p; cells beyond keep their drafts (and their q).
        redraft = (cell[None, :] >= new_accepted[:, None]) & (cell[None, :] < end[:, None])
        drafts = pick(p, counter_noise(seeds, DRAFT, it, cell))  # (B, T)
        tokens[:, low:high] = torch.where(committed, codes, torch.where(redraft, drafts, tokens[:, low:high]))
        q_row = next_q(q_row, p, accepted, new_accepted, end, low)
        accepted = new_accepted
        new_low = int(accepted.min())
        model.t2i_truncate(state, new_low)  # keep start + codes 0 … new_low-2: all accepted
        if progress is not None:
            for _ in range(new_low - low):
                progress()
        low = new_low
    if stats is not None:
        stats.update(forwards=forwards, iterations=it, codes=n_codes, window=window)
    return tokens.view(batch, h, w)


def window_probs(model, state, inputs: Tensor, scales: Tensor, params: SamplingParams, cfg: bool) -> Tensor:
    """One forward over inputs (B, T) appended to the cache → the sampling distributions (B, T, K)
    of the T codes after them: guidance, then temperature/top-k/top-p, as the plain sampler does."""
    logits = model.t2i_extend(torch.cat([inputs, inputs]) if cfg else inputs, state)  # (B', T, K)
    if cfg:
        logits = guide(logits, scales[:, None])  # both branches saw the same codes
    return token_probs(logits, params)


def next_q(q_row: Tensor, p: Tensor, accepted: Tensor, new_accepted: Tensor, end: Tensor, low: int) -> Tensor:
    """Draft distributions of each row's next window [a'_r, a'_r + W) (B, W, K).

    Cells the Jacobi step redrew ([a'_r, end_r)) take this forward's p; later cells that were in
    the old window keep their q; cells never drafted by a forward are uniform random (q = 1/K).
    """
    b, w, k = q_row.shape
    moved = window_q(q_row, new_accepted - accepted)  # (B, W, K) old q, or uniform past the old window
    cell = new_accepted[:, None] + torch.arange(w, device=p.device)[None, :]  # (B, W)
    from_p = cell < end[:, None]
    idx = (cell - low).clamp(0, p.shape[1] - 1)[..., None].expand(b, w, k)
    return torch.where(from_p[..., None], p.gather(1, idx), moved)
