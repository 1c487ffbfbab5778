"""Text from the TextDecoder (captions, generative answers): greedy, beam search, top-p sampling.

Same machinery as image sampling: ``model.caption_prefill`` runs BOS (or a prompt) with the
image states, computing the cross-attention keys/values once; ``model.caption_step`` feeds one
token at a time through the self-attention KV cache (static by default). Top-p sampling uses the
counter-based per-sample noise of :mod:`mm.generation.sampler`, so a caption depends only on its
image and seed.

Beam search keeps ``num_beams`` hypotheses per image as rows of one batch. After each step the
best ``num_beams`` (beam, token) pairs are kept; the self-attention caches are re-ordered to
follow their parent beams (beams never change image, so the cross-attention caches stay).
A finished beam (it produced EOS) stays in the beam set with its score frozen. The winner has
the best score / length^length_penalty. With one beam this is exactly greedy decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm.errors import MMError
from mm.generation.sampler import SamplingParams, choose, seeds_tensor

METHODS = ("greedy", "beam", "top-p")


def _max_new(model, max_new_tokens: int | None) -> int:
    limit = model.config.text_max_len - 1  # BOS takes one slot of the decoder's positions
    return limit if max_new_tokens is None else max(1, min(max_new_tokens, limit))


def _trim(seqs: list[list[int]], eos_id: int) -> list[list[int]]:
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs]


@torch.no_grad()
def sample_text(model, image_states: Tensor, bos_id: int, eos_id: int, method: str = "greedy",
                max_new_tokens: int | None = None, top_p: float = 0.9, temperature: float = 1.0,
                seeds=0, cache: str = "static") -> list[list[int]]:
    """Greedy or top-p token ids (EOS and after removed), one list per image state row (B, Li, D)."""
    if method not in ("greedy", "top-p"):
        raise MMError(f"text method must be one of {', '.join(METHODS)}, got {method!r}")
    b, dev = image_states.shape[0], image_states.device
    params = SamplingParams(guidance_scale=1.0, top_p=top_p, temperature=temperature).check()
    seeds = seeds_tensor(seeds, b, dev)
    ids = torch.full((b, 1), bos_id, dtype=torch.long, device=dev)
    logits, state = model.caption_prefill(image_states, ids, cache=cache)  # (B, V)
    tokens, done = [], torch.zeros(b, dtype=torch.bool, device=dev)
    n_new = _max_new(model, max_new_tokens)
    for n in range(n_new):
        if method == "greedy":
            nxt = logits.float().argmax(-1)
        else:
            nxt = choose(logits, seeds, n, params)
        nxt = nxt.masked_fill(done, eos_id)  # (B,) finished rows keep emitting EOS
        tokens.append(nxt)
        done |= nxt == eos_id
        if n + 1 == n_new or bool(done.all()):  # one sync per token: fine for short texts
            break
        logits = model.caption_step(nxt, state)
    return _trim(torch.stack(tokens, 1).tolist(), eos_id)


def reorder_caches(caches, rows: Tensor) -> None:
    """Make row i of every self-attention cache a copy of row ``rows[i]`` (beam re-ordering)."""
    for c in caches:
        sc = c.self_attn
        if sc.k is None:
            continue
        if hasattr(sc, "pos"):  # static buffers keep their storage (compile/CUDA-graph friendly)
            sc.k.copy_(sc.k.index_select(0, rows))
            sc.v.copy_(sc.v.index_select(0, rows))
        else:
            sc.k, sc.v = sc.k.index_select(0, rows), sc.v.index_select(0, rows)


@torch.no_grad()
def beam_search(model, image_states: Tensor, bos_id: int, eos_id: int, num_beams: int = 4,
                max_new_tokens: int | None = None, length_penalty: float = 1.0,
                cache: str = "static") -> list[list[int]]:
    """Best beam per image: token ids without BOS/EOS."""
    vocab = model.config.vocab_size
    if not 1 <= num_beams <= vocab:
        raise MMError(f"--beams must be in [1, {vocab}], got {num_beams}")
    b, k, dev = image_states.shape[0], num_beams, image_states.device
    states = image_states.repeat_interleave(k, dim=0)  # (B*k, Li, D): the beams of image i are rows i*k…
    ids = torch.full((b * k, 1), bos_id, dtype=torch.long, device=dev)
    logits, state = model.caption_prefill(states, ids, cache=cache)  # (B*k, V)

    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start equal: keep one, or the top-k would be k copies
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    seqs = torch.zeros(b * k, 0, dtype=torch.long, device=dev)
    eos_only = torch.full((vocab,), float("-inf"), device=dev)
    eos_only[eos_id] = 0.0  # a finished beam may only "continue" with EOS, at no cost
    base = (torch.arange(b, device=dev) * k)[:, None]  # (B, 1) first row of each image
    n_new = _max_new(model, max_new_tokens)
    for n in range(n_new):
        logp = logits.float().log_softmax(-1)  # (B*k, V)
        logp = torch.where(finished[:, None], eos_only, logp)
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, flat = cand.topk(k, dim=-1)  # (B, k)
        parent = (base + flat // vocab).view(-1)  # (B*k,) row each new beam continues
        token = (flat % vocab).view(-1)
        was_done = finished[parent]
        seqs = torch.cat([seqs[parent], token[:, None]], dim=1)
        lengths = lengths[parent] + (~was_done).float()
        finished = was_done | (token == eos_id)
        if n + 1 == n_new or bool(finished.all()):
            break
        reorder_caches(state.caches, parent)
        logits = model.caption_step(token, state)
    norm = scores.view(-1) / lengths.clamp(min=1).pow(length_penalty)  # (B*k,)
    best = norm.view(b, k).argmax(-1) + base[:, 0]  # (B,)
    return _trim(seqs[best].tolist(), eos_id)


@torch.no_grad()
def generate_captions(model, tokenizer, images: Tensor, method: str = "greedy", num_beams: int = 4,
                      top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                      max_new_tokens: int | None = None) -> list[str]:
    """Captions of (B, 3, H, W) images in [-1, 1] (the backbone sees the null text context)."""
    image_states = model.image_states(images)  # (B, Li, D)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is None or eos is None:
        raise MMError(f"tokenizer {tokenizer!r} has no BOS/EOS (or CLS/SEP) token; captions need both")
    if method == "beam":
        seqs = beam_search(model, image_states, bos, eos, num_beams, max_new_tokens)
    else:
        seqs = sample_text(model, image_states, bos, eos, method, max_new_tokens, top_p, temperature, seed)
    return [tokenizer.decode(s).strip() for s in seqs]
