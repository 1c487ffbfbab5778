"""Sampling VQ codes from MMModel: cached decoding, classifier-free guidance, seeds per sample.

One image is N = h·w codes in raster order. With a KV cache every step feeds only the code just
chosen; cross-attention keys/values of the text are computed once, at the prefill.

    logits, state = model.t2i_prefill(context (B', Lt, D), mask)   # start token → logits of code 0
    for n in 0 … N-1:
        next = pick(logits, scale[n], seeds, n)                    # guidance → filter → noise → argmax
        logits = model.t2i_step(next, state)                       # (skipped after the last code)

Classifier-free guidance runs the conditional and unconditional branches as ONE batch of 2B
rows (rows B…2B-1 see the null context or the negative prompt), then

    guided = cond + (s - 1) · (cond - uncond)

which is the usual ``uncond + s·(cond - uncond)`` written so that s = 1 returns ``cond`` bit for
bit. The scale s may change with the code index: constant, a linear ramp from 1 to s, and/or
guidance only inside a code interval [start, end).

Randomness is counter-based: the random number for sample i at code n is a hash of (seed_i, n),
not a draw from a shared generator. An image therefore depends only on its prompt and its seed —
never on the batch size or its position in the batch — and the noise is the same on CPU and CUDA.
A token is drawn by inverse-CDF sampling with that one uniform number per row: the first token
whose cumulative probability reaches u (what torch.multinomial does, minus its global
generator). Top-k/top-p set filtered logits to -inf, i.e. probability 0: never chosen.

The step has no data-dependent Python control flow and no host-device sync, so it runs under
``torch.compile(fullgraph=True)``; with the static cache its shapes never change.

Speed (scripts/bench/sample.py). At small batch a decode step is bound by reading the weights
(and the static cache) once per token, plus the cost of ~2,400 small operators in eager mode:

- On a CPU every fp32/bf16 linear layer is packed once per ``sample_codes`` call into oneDNN's
  layout for the step's B' rows (``mm.nn.linear.packed_for_rows``; ~1.5x (fp32) to 2.4x (bf16)
  faster weight reads than the plain layout at 4 rows).
- ``compile=True`` fuses the small operators of the step (RoPE, norms, sampling) into a few
  kernels, the linear layers staying oneDNN calls; compiling takes ~5-30 s on a CPU, once per
  process and model shape, so it pays for jobs of thousands of tokens, not for one small batch:
  eager stays the default.
- Weights in bf16 (``model.to(torch.bfloat16)``) halve the bytes read per token; the sampler
  keeps logits in fp32 for the choice. Samples are not bit-identical to fp32 ones.
- On a GPU the step is launch-bound: ``compile=True`` (or CUDA graphs) matters most there.
- int8 weight-only decode weights (mm.generation.weights) quarter the weight bytes; speculative
  Jacobi decoding (mm.generation.sjd) cuts the number of sequential forwards instead. Measured
  trade-offs: BENCHMARKS.md, "Decoding".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mm.errors import MMError
from mm.generation import DEFAULT_GUIDANCE
from mm.nn.linear import packed_for_rows

MASK32 = 0xFFFFFFFF
MAX_IMAGES = 1024  # a larger request is almost surely a typo (and would not fit in memory)


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass
class SamplingParams:
    """How to pick each token. Defaults: guidance 1.5 (mm.generation.DEFAULT_GUIDANCE), no top-k/top-p
    filtering, temperature 1."""

    guidance_scale: float = DEFAULT_GUIDANCE
    guidance_schedule: str = "constant"  # constant | linear (ramps from 1 at the first code to s at the last)
    guidance_interval: tuple[int, int] | None = None  # guide only codes start <= n < end
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    temperature: float = 1.0
    plan_temperature: float | None = None  # for the plan tokens of a model with t2i_plan; None = temperature

    def check(self) -> SamplingParams:
        s = self.guidance_scale
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise MMError(f"guidance scale must be a finite number >= 0 (1 = no guidance), got {s}")
        if self.guidance_schedule not in ("constant", "linear"):
            raise MMError(f"guidance schedule must be 'constant' or 'linear', got {self.guidance_schedule!r}")
        if self.guidance_interval is not None:
            start, end = self.guidance_interval
            if start < 0 or end <= start:
                raise MMError(f"guidance interval must be [start, end) with 0 <= start < end, got {self.guidance_interval}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise MMError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise MMError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        for name in ("temperature", "plan_temperature"):
            t = getattr(self, name)
            bad = not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
            if bad and (name == "temperature" or t is not None):
                raise MMError(f"{name.replace('_', ' ')} must be > 0 (use top-k 1 for greedy), got {t}")
        return self

    def for_plan(self) -> SamplingParams:
        """The settings for the plan tokens: the same, at ``plan_temperature`` when it is set."""
        if self.plan_temperature is None:
            return self
        return dataclasses.replace(self, temperature=self.plan_temperature, plan_temperature=None)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0


def guidance_scales(params: SamplingParams, num_tokens: int, device=None) -> Tensor:
    """Scale for each code index, (N,) float32."""
    s = float(params.guidance_scale)
    if params.guidance_schedule == "linear" and num_tokens > 1:
        scales = 1.0 + (s - 1.0) * torch.arange(num_tokens, dtype=torch.float64) / (num_tokens - 1)
    else:
        scales = torch.full((num_tokens,), s, dtype=torch.float64)
    if params.guidance_interval is not None:
        start, end = params.guidance_interval
        n = torch.arange(num_tokens)
        scales = torch.where((n >= start) & (n < end), scales, torch.ones_like(scales))
    return scales.float().to(device)


def seeds_tensor(seeds, batch: int, device=None) -> Tensor:
    """An int seed (sample i gets seed + i) or one seed per sample → (B,) int64 on ``device``."""
    if isinstance(seeds, Tensor):
        seeds = seeds.tolist()
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(batch)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise MMError(f"got {len(seeds)} seeds for {batch} samples; give one seed, or one per sample")
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise MMError(f"seeds must be integers in [0, 2^63), got {seeds}")
    return torch.tensor(seeds, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# Counter-based noise and token choice


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32.

    Multipliers are < 2^31, so products stay below 2^63: no signed overflow on any backend.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)


def _combine(h: Tensor, v: Tensor) -> Tensor:
    return _mix32((h ^ ((_mix32(v & MASK32) + 0x9E3779B9) & MASK32)) & MASK32)


def uniform_noise(seeds: Tensor, position: Tensor | int) -> Tensor:
    """One uniform number in (0, 1) per sample, (B,) float32: a pure function of (seed, position)."""
    position = torch.as_tensor(position, dtype=torch.long, device=seeds.device)
    h = _combine(_mix32(seeds & MASK32), (seeds >> 32) & MASK32)  # (B,) key of the sample
    h = _combine(h, position.expand_as(h))  # (B,) key of this step
    return ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)  # 24 random bits → (0, 1)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. (.., V) -> (.., V).

    top-k keeps ties with the k-th value. top-p keeps the smallest set of most likely tokens whose
    probability reaches p (the most likely token is always kept).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (.., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def counter_noise(seeds: Tensor, *counters) -> Tensor:
    """Uniform numbers in (0, 1): a hash of (seed_i, counters…), (B, …) broadcast over the counters.

    Speculative decoding needs several independent numbers per code (draft, acceptance test,
    residual draw, each per iteration); the first counter names the stream.
    """
    h = _combine(_mix32(seeds & MASK32), (seeds >> 32) & MASK32)  # (B,) key of the sample
    for c in counters:
        c = torch.as_tensor(c, dtype=torch.long, device=seeds.device)
        h = _combine(h.view(h.shape + (1,) * c.dim()), c)  # (B, *c.shape)
    return ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)


def token_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a token is drawn from: temperature, top-k/top-p, softmax. (.., V) → (.., V) fp32."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    return filter_logits(logits, params.top_k, params.top_p).softmax(dim=-1)  # 0 where filtered


def pick(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: probs (.., V) (need not sum to 1), u (..) in (0, 1) → (..) long."""
    cdf = probs.cumsum(dim=-1)  # (.., V)
    target = u.unsqueeze(-1) * cdf[..., -1:]  # (.., 1) in (0, total]
    # The first index with cdf >= target has probability > 0 (target > 0); the clamp guards round-off.
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def choose(logits: Tensor, seeds: Tensor, position: Tensor | int, params: SamplingParams) -> Tensor:
    """Sample one token per row of logits (B, V) with its own seed → (B,) long."""
    return pick(token_probs(logits, params), uniform_noise(seeds, position))


def guide(logits: Tensor, scale: Tensor) -> Tensor:
    """(2B, K) logits [cond; uncond] → (B, K) guided: cond + (s - 1)(cond - uncond)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return cond + (scale - 1.0) * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# Image codes


def cfg_context(cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor] | None, model) -> tuple[Tensor, Tensor]:
    """Stack [cond; uncond] text states and masks into one 2B batch (uncond None = null context)."""
    states, mask = cond
    if uncond is None:
        uncond = model.null_context(states.shape[0], max(states.shape[1], model.config.null_context_len))
    u_states, u_mask = uncond
    length = max(states.shape[1], u_states.shape[1])

    def pad(s: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:  # right-pad to a common length, mask False
        extra = length - s.shape[1]
        if extra:
            s = torch.cat([s, s.new_zeros(s.shape[0], extra, s.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], extra)], dim=1)
        return s, m

    states, mask = pad(states, mask)
    u_states, u_mask = pad(u_states.to(states.dtype), u_mask)
    return torch.cat([states, u_states]), torch.cat([mask, u_mask])


def decode_step(model, prev: Tensor, state, seeds: Tensor, position: Tensor, scale: Tensor,
                params: SamplingParams, cfg: bool, plan: bool = False) -> Tensor:
    """Feed the ids just chosen (B,), return the next ones (B,): codes, or plan tokens with ``plan``
    (as the model's plan head numbers them). Compile-friendly: no syncs."""
    if cfg:
        prev = torch.cat([prev, prev])  # both branches continue from the same code
    logits = model.t2i_step(prev, state, plan=plan)  # (B', K), or (B', PLAN_VOCAB) with plan
    if cfg:
        logits = guide(logits, scale)
    return choose(logits, seeds, position, params)


_COMPILED: dict = {}


def decode_step_fn(compile: bool | str):
    """The decode step, compiled once per backend (``compile=True`` = inductor, or a backend name)."""
    if not compile:
        return decode_step
    backend = "inductor" if compile is True else str(compile)
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


def branch_context(model, text, uncond, params: SamplingParams, batch: int):
    """The text context the sampler runs on: the null context (no text), the prompts (no
    guidance), or prompts and unconditional branch stacked into one batch of 2B rows (CFG).
    Returns (states, mask, guided)."""
    guided = text is not None and params.uses_guidance
    if text is None:
        return (*model.null_context(batch), False)
    if guided:
        return (*cfg_context(text, uncond, model), True)  # (2B, Lt, D), (2B, Lt)
    return (*text, False)


@torch.no_grad()
def sample_codes(model, text: tuple[Tensor, Tensor] | None, seeds: Tensor, params: SamplingParams,
                 uncond: tuple[Tensor, Tensor] | None = None, cache: str = "static",
                 compile: bool | str = False, progress=None) -> Tensor:
    """Sample (B, h, w) VQ codes.

    A model with a plan (``t2i_plan`` = t, or sides coarse to fine) first draws its plan tokens, with
    the same guidance (and ``params.plan_temperature`` when set), then the codes; only the codes are
    returned. Noise and guidance steps count the whole sequence.

    text: (states (B, Lt, D), mask (B, Lt)) from ``model.encode_prompt``, or None for unconditional
    samples; uncond: the negative prompt's (states, mask) for the unconditional branch (default:
    the null context); seeds (B,) int64, one per sample; progress: a callable called once per code;
    compile: True (inductor) or a torch.compile backend name for the per-code step.
    """
    params.check()
    if compile and cache != "static":
        raise MMError("compiled sampling needs cache='static' (a growing cache changes shape every step)")
    h, w = model.config.code_grid
    n_plan = model.code_embed.plan_len  # 0 without a plan
    n_seq, batch = n_plan + h * w, seeds.shape[0]
    states, mask, cfg = branch_context(model, text, uncond, params, batch)  # (B or 2B, Lt, D)
    scales = guidance_scales(params, n_seq, seeds.device)  # (P+N,)
    positions = torch.arange(n_seq, device=seeds.device)  # (P+N,) tensors: no recompiles per step
    step = decode_step_fn(compile)
    plan_params = params.for_plan()

    # Every step calls each layer on the same B' rows: pack the weights once for that (mm.nn.linear).
    with packed_for_rows(model, states.shape[0]):
        logits, state = model.t2i_prefill(states, mask, cache=cache)  # (B', K) for code 0 (or plan token 0)
        if cfg:
            logits = guide(logits, scales[0])
        chosen = [choose(logits, seeds, positions[0], plan_params if n_plan else params)]
        if progress is not None and not n_plan:
            progress()
        for n in range(1, n_seq):
            prev = model.code_embed.plan_id(chosen[-1], n - 1) if n <= n_plan else chosen[-1]  # plan ids are offset
            is_plan = n < n_plan
            chosen.append(step(model, prev, state, seeds, positions[n], scales[n], plan_params if is_plan else params,
                               cfg, is_plan))
            if progress is not None and n >= n_plan:
                progress()
    return torch.stack(chosen[n_plan:], dim=1).view(batch, h, w)


@torch.no_grad()
def sample_codes_uncached(model, text: tuple[Tensor, Tensor] | None, seeds: Tensor,
                          params: SamplingParams, uncond: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The reference sampler: every step recomputes the whole prefix with no cache (O(N²) work).

    Codes not yet chosen are zeros; causal attention means row n never sees them.
    """
    params.check()
    if model.code_embed.plan:
        raise MMError("the uncached reference sampler does not draw a T2I plan; use sample_codes")
    h, w = model.config.code_grid
    n_codes, batch = h * w, seeds.shape[0]
    states, mask, cfg = branch_context(model, text, uncond, params, batch)
    scales = guidance_scales(params, n_codes, seeds.device)
    codes = torch.zeros(states.shape[0], n_codes, dtype=torch.long, device=seeds.device)
    for n in range(n_codes):
        logits = model.t2i_logits(codes.view(-1, h, w), states, mask)[:, n]  # (B', K)
        if cfg:
            logits = guide(logits, scales[n])
        chosen = choose(logits, seeds, n, params)  # (B,)
        codes[:, n] = torch.cat([chosen, chosen]) if cfg else chosen
    return codes[:batch].view(batch, h, w)
