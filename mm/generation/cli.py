"""``mm generate`` (prompts → PNG grid, optional single images) and ``mm caption`` (images → text)."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from mm.errors import MMError
from mm.generation.sampler import MAX_IMAGES, SamplingParams

CELL = 128  # grid cell size in pixels: small images are upscaled (nearest) so they can be seen


def prompt_grid(images: list[Image.Image], prompts: list[str], per_prompt: int) -> Image.Image:
    """One row per prompt with its images, the prompt written underneath (PIL's default font)."""
    font = ImageFont.load_default()
    pad = 6
    chars = max(16, (per_prompt * (CELL + pad)) // 7)  # ~7 px per character of the default font
    captions = [textwrap.wrap(p or "(unconditional)", chars)[:3] for p in prompts]
    line_h = 12
    text_h = line_h * max(1, max(len(c) for c in captions)) + pad
    width = pad + per_prompt * (CELL + pad)
    grid = Image.new("RGB", (width, len(prompts) * (CELL + pad + text_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, lines in enumerate(captions):
        top = pad + r * (CELL + pad + text_h)
        for c in range(per_prompt):
            img = images[r * per_prompt + c]
            resample = Image.Resampling.NEAREST if img.width < CELL else Image.Resampling.BICUBIC
            grid.paste(img.resize((CELL, CELL), resample), (pad + c * (CELL + pad), top))
        for i, line in enumerate(lines):
            draw.text((pad, top + CELL + 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:40] or "unconditional"


def _check_out(path: str, what: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise MMError(f"{what} {path} must end in .png")
    return out


def cli_generate(args: argparse.Namespace) -> int:
    import warnings

    from tqdm import tqdm

    from mm.generation.pipeline import TextToImagePipeline, clean_prompt

    if args.num_images < 1 or args.num_images * len(args.prompt) > MAX_IMAGES:
        raise MMError(f"--num-images must be >= 1 and at most {MAX_IMAGES} images in all; got {args.num_images} "
                      f"per prompt for {len(args.prompt)} prompt(s)")
    if args.guidance < 0:
        raise MMError(f"--guidance must be >= 0 (1 = no guidance), got {args.guidance}")
    SamplingParams(args.guidance, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                   plan_temperature=args.plan_temperature).check()
    out = _check_out(args.out, "--out")
    with warnings.catch_warnings(record=True) as caught:  # show prompt warnings as one clean line each
        warnings.simplefilter("always")
        prompts = [clean_prompt(p) for p in args.prompt]
    if args.max_batch < 0:
        raise MMError(f"--max-batch must be >= 1 (0 = default), got {args.max_batch}")
    if not 1 <= args.sjd_window <= 256:
        raise MMError(f"--sjd-window must be in [1, 256], got {args.sjd_window}")
    pipe = TextToImagePipeline.from_pretrained(args.model)
    pipe.configure(weights=args.weights, decode=args.decode, sjd_window=args.sjd_window,
                   max_batch=args.max_batch or None)
    h, w = pipe.model.config.code_grid
    total = len(prompts) * args.num_images
    batches = -(-total // pipe.max_batch)
    bar = tqdm(total=h * w * batches, desc=f"sampling {total} image(s)", unit="code", leave=False)
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        images = pipe(prompts, num_images_per_prompt=args.num_images, guidance_scale=args.guidance,
                      top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
                      plan_temperature=args.plan_temperature,
                      negative_prompt=args.negative_prompt or None, progress=lambda: bar.update(1))
    bar.close()
    for wmsg in [*caught, *more]:
        print(f"mm: warning: {wmsg.message}")
    out.parent.mkdir(parents=True, exist_ok=True)
    prompt_grid(images, prompts, args.num_images).save(out)
    print(f"mm: wrote {out} ({len(prompts)} prompt(s) x {args.num_images} image(s))")
    if args.out_dir:
        d = Path(args.out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            p, j = divmod(i, args.num_images)
            img.save(d / f"{p:03d}_{_slug(prompts[p])}_{j:02d}.png")
        print(f"mm: wrote {len(images)} image(s) to {d}")
    return 0


def cli_caption(args: argparse.Namespace) -> int:
    from mm.data.images import ImageSkip, load_rgb, resize_center_crop
    from mm.data.tokenizer import load_tokenizer
    from mm.generation.pipeline import default_device, to_tensor
    from mm.generation.text import generate_captions
    from mm.models.bundle import load_bundle

    if args.method == "beam" and args.beams < 1:
        raise MMError(f"--beams must be >= 1, got {args.beams}")
    if args.method == "top-p" and not 0 < args.top_p <= 1:
        raise MMError(f"--top-p must be in (0, 1], got {args.top_p}")
    pil = []
    for path in args.image:
        try:
            pil.append(load_rgb(path, max_pixels=89_478_485)[0])
        except FileNotFoundError:
            raise MMError(f"image not found: {path}") from None
        except (ImageSkip, OSError) as e:
            raise MMError(f"cannot read image {path} ({e}); pass a PNG, JPEG or WebP file") from None
    device = default_device()
    model, tok_dir, _ = load_bundle(args.model, device)
    tokenizer = load_tokenizer(tok_dir)
    size = model.config.image_size
    images = to_tensor([resize_center_crop(im, size) for im in pil], size).to(device)  # as in training
    with torch.no_grad():
        captions = generate_captions(model, tokenizer, images, args.method, num_beams=args.beams,
                                     top_p=args.top_p, seed=args.seed)
    for path, caption in zip(args.image, captions):
        print(f"{path}\t{' '.join(caption.split())}")  # one line per image, whatever the text holds
    return 0
