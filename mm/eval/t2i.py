"""Text-to-image evaluation: compositional score on held-out shapes prompts, ITC score, FID.

``mm eval t2i --model DIR [--num-prompts N] [--guidance 1.5] [--seed 0] [--fid-data SHARDS]
[--inception PATH] [--out M.json]``

- **Compositional score** (GenEval-style, offline): generate an image for each held-out shapes
  prompt (mm.data.shapes_text.held_out_prompts: single objects, pairs, counts, absolute and
  relative positions), find its objects with the deterministic shapes detector and check the
  prompt's spec (mm.data.detector.match_spec): colour, shape, count, position. Reported overall
  (every attribute right), per attribute and per prompt kind. Image i uses prompt i mod 60 and
  seed ``seed + i``.
- **T2I ceiling** (``t2i_ceiling``; the full scores under ``ceiling``): the same score of the VQ's
  reconstructions of true renders of the same prompts (2 renders each) — what a perfect code
  sampler would get. The compositional score is only meaningful when this is >= 98 %.
- **ITC score**: a CLIP-score-like number from mm's own contrastive embeddings: 100 × the mean
  cosine between each generated image's ITC embedding and its prompt's.
- **FID**: Fréchet distance between Gaussian fits of generated and reference image features
  (Heusel et al. 2017):  ||μ₁-μ₂||² + Tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½). Features come from a pluggable
  extractor: by default mm's own image encoder (pooled backbone states with the null context);
  ``--inception PATH`` loads a local TorchScript (or torch.export ``.pt2``) Inception (e.g.
  ``inception-2015-12-05.pt``, called with ``return_features=True``)
  instead — nothing is downloaded. References are images from ``--fid-data`` shards, or else the
  shapes renderer's drawings of the same prompts. FID from mm features is only comparable between
  runs that use the same feature model; Inception FID on a few hundred images is biased upward.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mm.errors import MMError
from mm.generation import DEFAULT_GUIDANCE

ATTRIBUTES = ("color", "shape", "count", "position")
MAX_PROMPTS = 10_000
CEILING_GOAL = 0.98  # DESIGN.md §6: below this the compositional score is capped by the VQ


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) of features (N, F), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise MMError(f"FID needs at least 2 feature vectors (N, F); got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than features): nudge both covariances off singularity.
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------
# Feature extractors: callables (B, 3, H, W) images in [-1, 1] -> (B, F) numpy


class MMImageFeatures:
    """mm's own image encoder: the backbone's states for the image (null context), mean-pooled."""

    name = "mm"

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        size = self.model.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.model.image_states(images).mean(1).float().cpu().numpy()  # (B, D)


class InceptionFeatures:
    """A local TorchScript Inception: images resized to 299², values 0..255 (the FID convention)."""

    name = "inception"

    def __init__(self, path: str | Path, device="cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise MMError(f"Inception weights not found: {path}; pass a local TorchScript file "
                          "(e.g. inception-2015-12-05.pt) or leave --inception empty for mm features")
        try:
            if path.suffix == ".pt2":  # torch.export archive
                self.net = torch.export.load(str(path)).module().to(device)
            else:  # TorchScript (how the common FID Inception weights are distributed)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MMError(f"{path} is not a TorchScript model ({first}); export Inception with torch.jit.save") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = ((x.clamp(-1, 1) + 1) * 127.5).to(self.device)  # (B, 3, 299, 299) in [0, 255]
        try:
            feats = self.net(x, return_features=True)  # NVIDIA's FID Inception: pool3 features
        except (RuntimeError, TypeError):
            feats = self.net(x)
        return feats.reshape(feats.shape[0], -1).float().cpu().numpy()


def extract(features, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return np.concatenate([features(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def fid_from_images(features, fake: torch.Tensor, real: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(extract(features, fake)), *feature_stats(extract(features, real)))


# ---------------------------------------------------------------------------------------------
# Compositional score


def compositional_scores(images, specs: list[dict]) -> dict:
    """Detector-based accuracy of PIL images against their prompt specs (fractions in [0, 1])."""
    from mm.data.detector import detect, match_spec

    if len(images) != len(specs) or not specs:
        raise ValueError(f"need one spec per image, got {len(images)} images and {len(specs)} specs")
    checks = [match_spec(detect(im), spec) for im, spec in zip(images, specs)]
    out = {"overall": float(np.mean([c["correct"] for c in checks]))}
    for attr in ATTRIBUTES:
        vals = [c[attr] for c in checks if c[attr] is not None]
        out[attr] = float(np.mean(vals)) if vals else None  # position: only prompts that state one
    by_tag = defaultdict(list)
    for c, spec in zip(checks, specs):
        by_tag[spec.get("tag", "all")].append(c["correct"])
    out["per_tag"] = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation


def eval_prompts(num_prompts: int) -> list[dict]:
    """``num_prompts`` held-out specs, cycling through the 60 prompts."""
    from mm.data.shapes_text import held_out_prompts

    specs = held_out_prompts()
    return [specs[i % len(specs)] for i in range(num_prompts)]


def rendered_references(specs: list[dict], size: int, seed: int = 0) -> torch.Tensor:
    """The shapes renderer's drawing of each spec, (N, 3, size, size) in [-1, 1]."""
    from mm.data.shapes import render_spec
    from mm.generation.pipeline import to_tensor

    drawn = [render_spec(spec, max(32, -(-size // 16) * 16), seed + i)[0] for i, spec in enumerate(specs)]
    return to_tensor(drawn, size)


@torch.no_grad()
def t2i_ceiling(vq, num_prompts: int, image_size: int, seed: int = 0, renders_per_prompt: int = 2,
                batch: int = 64) -> dict:
    """The compositional score of VQ reconstructions of the held-out prompts' true renders.

    Generated images are VQ decodes, so this is the most a text-to-image model decoding through
    ``vq`` can score: a T2I score means something only when the ceiling is >= 98 % (DESIGN.md §6).
    Render r of prompt i uses seed ``seed + i + r * num_prompts`` (render 0 is the FID reference
    drawing). ``raw`` scores the renders themselves, a check of the detector: 1.0 unless the
    detector or the image size is broken. ``vq`` needs only ``encode``/``decode`` (images in [-1, 1]).
    """
    from mm.generation.pipeline import to_pil

    if renders_per_prompt < 1:
        raise MMError(f"renders_per_prompt must be >= 1, got {renders_per_prompt}")
    specs = eval_prompts(num_prompts)
    real = torch.cat([rendered_references(specs, image_size, seed + r * num_prompts)
                      for r in range(renders_per_prompt)])  # (R * N, 3, S, S) in [-1, 1], render-major
    all_specs = specs * renders_per_prompt
    # Feed the VQ on its own device and dtype (a stand-in without parameters gets CPU float32).
    params = list(vq.parameters()) if hasattr(vq, "parameters") else []
    device, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)
    recon = []
    for i in range(0, len(real), batch):
        codes = vq.encode(real[i:i + batch].to(device, dtype))  # (B, h, w)
        recon.append(vq.decode(codes).float().clamp(-1, 1).cpu())  # (B, 3, S, S)
    out = compositional_scores(to_pil(torch.cat(recon)), all_specs)
    out["raw"] = compositional_scores(to_pil(real), all_specs)
    out.update(images=len(all_specs), renders_per_prompt=renders_per_prompt, image_size=image_size)
    return out


def shard_images(spec: str, size: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images from webdataset shards, (N, 3, size, size) in [-1, 1]."""
    from mm.data.shards import expand_shards, read_shard
    from mm.data.transforms import check_sample, image_key, load_image, to_tensor

    arrays = []
    for url in expand_shards(spec):
        for sample in read_shard(url, None):
            key = image_key(sample)
            if key is None or check_sample(sample, "image") is not None:
                continue
            arrays.append(load_image(sample[key], size))
            if len(arrays) >= limit:
                return to_tensor(arrays)
    if len(arrays) < 2:
        raise MMError(f"--fid-data {spec} has {len(arrays)} readable images; FID needs at least 2")
    return to_tensor(arrays)


@torch.no_grad()
def evaluate_t2i(pipe, num_prompts: int = 64, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                 reference: torch.Tensor | None = None, features=None, batch: int = 64,
                 top_k: int = 0, temperature: float = 1.0, plan_temperature: float | None = None) -> dict:
    """Generate for held-out prompts and score them. ``reference``: real images for FID
    (default: rendered drawings of the prompts); ``features``: FID extractor (default: mm's);
    top_k / temperature: sampling settings (0 / 1 = the model's own distribution); plan_temperature:
    the temperature of a plan model's plan tokens (None = temperature)."""
    specs = eval_prompts(num_prompts)
    prompts = [s["prompt"] for s in specs]
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        codes = pipe.generate_codes(chunk, guidance_scale=guidance, seed=[seed + i + j for j in range(len(chunk))],
                                    top_k=top_k, temperature=temperature, plan_temperature=plan_temperature)
        images.append(pipe.decode(codes).cpu())
    fake = torch.cat(images)  # (N, 3, H, W) in [-1, 1]
    from mm.generation.pipeline import to_pil

    comp = compositional_scores(to_pil(fake), specs)

    model, tok = pipe.model, pipe.tokenizer
    ids, mask = tok.encode(prompts, max_len=model.config.text_max_len)
    dev = pipe.device
    text_emb = model.text_embedding(ids.to(dev), mask.to(dev))  # (N, E), unit norm
    image_emb = torch.cat([model.image_embedding(fake[i:i + batch].to(dev)) for i in range(0, len(fake), batch)])
    itc = float(100 * (text_emb * image_emb).sum(-1).mean())

    features = features or MMImageFeatures(model)
    if reference is None:
        reference, ref_name = rendered_references(specs, fake.shape[-1], seed), "rendered"
    else:
        ref_name = "shards"
    fid = fid_from_images(features, fake, reference)
    # The same prompts' true renders through the same VQ: what a perfect code sampler would score.
    ceiling = t2i_ceiling(pipe.vq, num_prompts, fake.shape[-1], seed, batch=batch)
    return {"t2i_compositional_accuracy": comp["overall"], "compositional": comp,
            "t2i_ceiling": ceiling["overall"], "ceiling": ceiling, "itc_score": itc,
            "fid": fid, "fid_features": features.name, "fid_reference": ref_name,
            "num_images": len(prompts), "guidance": guidance, "top_k": top_k, "temperature": temperature,
            "plan_temperature": plan_temperature,
            "seed": seed}


def cli_eval_t2i(args: argparse.Namespace) -> int:
    from mm.generation.pipeline import TextToImagePipeline

    if not 2 <= args.num_prompts <= MAX_PROMPTS:
        raise MMError(f"--num-prompts must be in [2, {MAX_PROMPTS}] (FID needs 2 images), got {args.num_prompts}")
    if not args.guidance >= 0:
        raise MMError(f"--guidance must be >= 0 (1 = no guidance), got {args.guidance}")
    if args.seed < 0:
        raise MMError(f"--seed must be >= 0, got {args.seed}")
    if args.top_k < 0 or not args.temperature > 0:
        raise MMError(f"--top-k must be >= 0 and --temperature > 0, got {args.top_k} and {args.temperature}")
    if args.plan_temperature is not None and not args.plan_temperature > 0:
        raise MMError(f"--plan-temperature must be > 0 (leave it out to use --temperature), got {args.plan_temperature}")
    pipe = TextToImagePipeline.from_pretrained(args.model)
    features = InceptionFeatures(args.inception, pipe.device) if args.inception else None
    size = pipe.model.config.image_size
    reference = shard_images(args.fid_data, size, max(args.num_prompts, 2048)) if args.fid_data else None
    metrics = evaluate_t2i(pipe, args.num_prompts, args.guidance, args.seed, reference, features,
                           top_k=args.top_k, temperature=args.temperature, plan_temperature=args.plan_temperature)
    text = json.dumps(metrics, indent=2)
    print(text)
    # stderr, so stdout stays one JSON document; a low ceiling means the score above is capped by the VQ.
    ceiling = metrics["t2i_ceiling"]
    note = "" if ceiling >= CEILING_GOAL else (f" (below {100 * CEILING_GOAL:.0f} %: the VQ's reconstructions cap "
                                               "the compositional score, so it says little about the model)")
    print(f"t2i_ceiling {100 * ceiling:.1f} % (raw renders {100 * metrics['ceiling']['raw']['overall']:.1f} %){note}",
          file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
