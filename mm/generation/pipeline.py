"""A diffusers-like text-to-image pipeline around an exported mm model.

    pipe = TextToImagePipeline.from_pretrained("runs/pretrain/final")     # or a run folder
    images = pipe(["a red circle", "two blue squares"], num_images_per_prompt=4,
                  guidance_scale=1.5, top_k=0, top_p=1.0, temperature=1.0, seed=0)   # PIL images

Images come back prompt by prompt (prompt 0's images first). Image j of every prompt uses seed
``seed + j`` (or pass one seed per image), so an image does not change when other prompts are
added to the call. Prompts are cleaned before tokenising: control characters and undecodable
bytes are removed (with a warning); an empty prompt gives an unconditional sample and a
prompt longer than the model's text length is truncated, each with a warning.

Decoding options (``pipe.configure(...)`` sets them for every call; ``generate_codes`` takes them
per call too):

- ``decode="plain"`` (one forward per code) or ``"sjd"``: speculative Jacobi decoding
  (mm.generation.sjd), the same distribution in fewer forwards; ``sjd_window`` draft codes per forward.
- ``weights="fp32" | "bf16" | "int8"``: decode weights (mm.generation.weights); the fp32 model is
  kept for saving.
- ``max_batch``: images sampled together; more images run in consecutive batches. An image depends
  only on its prompt and seed, so this changes speed, not images. The default comes from
  scripts/bench/sample.py on a 2-core CPU: tokens/s grows up to batch ~16 and flattens after
  (BENCHMARKS.md, "Decoding").
"""

from __future__ import annotations

import shutil
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mm.errors import MMError
from mm.generation import DEFAULT_GUIDANCE
from mm.generation.sampler import MAX_IMAGES, SamplingParams, sample_codes, seeds_tensor
from mm.generation.sjd import sample_codes_sjd
from mm.generation.weights import WEIGHTS, decode_weights

DECODERS = ("plain", "sjd")
DEFAULT_MAX_BATCH = 16  # images per sampling batch (see the module docstring)


def clean_prompt(text) -> str:
    """Printable text of a prompt: invalid UTF-8 and control/format characters dropped, spaces collapsed."""
    original = text
    if isinstance(text, bytes):  # undecodable bytes become U+FFFD, which is dropped below
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise MMError(f"a prompt must be a string, got {type(text).__name__}")
    # Whitespace controls become spaces; other C* categories (controls, format characters, lone
    # surrogates from undecodable command-line bytes, unassigned) are dropped.
    chars = [" " if c in "\t\n\r\v\f" else c for c in text]
    cleaned = "".join(c for c in chars if c != "\ufffd" and not unicodedata.category(c).startswith("C"))
    cleaned = " ".join(cleaned.split())
    if cleaned != " ".join(text.split()):
        warnings.warn(f"prompt {original!r} had control characters or invalid bytes; using {cleaned!r}",
                      stacklevel=3)
    return cleaned


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a, "RGB") for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images → (B, 3, size, size) in [-1, 1] (resized when needed)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TextToImagePipeline:
    """Text encoder + autoregressive code sampler + VQ decoder, as one callable."""

    def __init__(self, model, vq, tokenizer, device=None, source: str | Path | None = None):
        self.base_model = self.model = model.eval()  # base_model: the fp32 weights; model: decode weights
        self.vq, self.tokenizer = vq.eval(), tokenizer
        self.source = Path(source) if source is not None else None  # the folder it was loaded from
        self.weights, self.decode_mode, self.sjd_window, self.max_batch = "fp32", "plain", 16, DEFAULT_MAX_BATCH
        self.history: list[dict] = []  # one dict per sampled batch (images, seconds, SJD forwards); clear at will
        self.to(device or next(model.parameters()).device)

    def configure(self, weights: str | None = None, decode: str | None = None, sjd_window: int | None = None,
                  max_batch: int | None = None) -> TextToImagePipeline:
        """Set the decode weights, decoder, SJD window and batch cap used by every later call."""
        if decode is not None:
            if decode not in DECODERS:
                raise MMError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
            self.decode_mode = decode
        if sjd_window is not None:
            self.sjd_window = sjd_window
        if max_batch is not None:
            if not isinstance(max_batch, int) or max_batch < 1:
                raise MMError(f"max batch must be an integer >= 1, got {max_batch}")
            self.max_batch = max_batch
        if weights is not None and weights != self.weights:
            if weights not in WEIGHTS:
                raise MMError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
            self.model = decode_weights(self.base_model, weights).to(self.device)
            self.weights = weights
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None) -> TextToImagePipeline:
        """Load an exported folder (config.json, model.safetensors, tokenizer/, vq/) or a run folder."""
        from mm.data.tokenizer import load_tokenizer
        from mm.models.bundle import bundle_folder, load_bundle

        folder = bundle_folder(path)  # one-line MMError for anything else
        model, tok_dir, vq = load_bundle(folder, "cpu")
        return cls(model, vq, load_tokenizer(tok_dir), device or default_device(), source=folder)

    def to(self, device) -> TextToImagePipeline:
        self.device = torch.device(device)
        self.base_model.to(self.device)
        self.model.to(self.device)
        self.vq.to(self.device)
        return self

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the same layout back: config.json, model.safetensors, tokenizer/, vq/."""
        out = Path(out_dir)
        self.base_model.save_pretrained(out)  # fp32, whatever the decode weights
        self.vq.save_pretrained(out / "vq")
        if hasattr(self.tokenizer, "save"):
            self.tokenizer.save(out / "tokenizer")
        elif self.source is not None:
            shutil.copytree(self.source / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        return out

    # ---- text ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean, tokenise (padded to the model's text length) and encode → (B, Lt, D), (B, Lt).

        Empty prompts get the null context, i.e. an unconditional sample.
        """
        max_len = self.model.config.text_max_len
        cleaned = [clean_prompt(p) for p in prompts]
        for p in cleaned:
            if p and int(self.tokenizer.encode([p], max_len=8 * max_len)[1].sum()) > max_len:
                warnings.warn(f"prompt {p[:40]!r}… is longer than the model's {max_len} text tokens; "
                              "it is truncated", stacklevel=3)
        ids, mask = self.tokenizer.encode([p or " " for p in cleaned], max_len=max_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states, mask = self.model.encode_prompt(ids, mask)  # (B, Lt, D), (B, Lt)
        empty = torch.tensor([not p for p in cleaned], device=self.device)
        if empty.any():
            warnings.warn("empty prompt: sampling that image unconditionally (null text context)", stacklevel=3)
            null_states, null_mask = self.model.null_context(len(prompts), states.shape[1])
            states = torch.where(empty[:, None, None], null_states.to(states.dtype), states)
            mask = torch.where(empty[:, None], null_mask, mask)
        return states, mask

    # ---- images -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_codes(self, prompts, num_images_per_prompt: int = 1, guidance_scale: float = DEFAULT_GUIDANCE,
                       top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, seed=0,
                       negative_prompt: str | list[str] | None = None, guidance_schedule: str = "constant",
                       guidance_interval: tuple[int, int] | None = None, cache: str = "static",
                       compile: bool | str = False, progress=None, decode: str | None = None,
                       sjd_window: int | None = None, stats: list | None = None,
                       plan_temperature: float | None = None) -> torch.Tensor:
        """Sampled VQ codes (P * n, h, w), prompt-major, in batches of at most ``self.max_batch``.

        plan_temperature: the temperature of a plan model's plan tokens (None = ``temperature``).
        decode / sjd_window override the configured decoder for this call; stats: a list that
        gets one dict per batch (``images``, ``seconds``, and for SJD ``forwards``), as does
        ``self.history``."""
        prompts = [prompts] if isinstance(prompts, (str, bytes)) else list(prompts)
        n = num_images_per_prompt
        if not prompts:
            raise MMError("no prompt given; pass at least one prompt (an empty string samples unconditionally)")
        if not isinstance(n, int) or n < 1 or n * len(prompts) > MAX_IMAGES:
            raise MMError(f"number of images per prompt must be >= 1 and at most {MAX_IMAGES} images in all; "
                          f"got {n} x {len(prompts)} prompts")
        params = SamplingParams(guidance_scale, guidance_schedule, guidance_interval, top_k, top_p, temperature,
                                plan_temperature).check()
        decode = decode or self.decode_mode
        if decode not in DECODERS:
            raise MMError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
        if decode == "sjd" and compile:
            raise MMError("compile is for plain decoding (SJD's window changes shape); use decode='plain'")
        if isinstance(seed, int):
            seed = [seed + j for _ in prompts for j in range(n)]
        seeds = seeds_tensor(seed, len(prompts) * n, self.device)

        with torch.autocast(self.device.type, enabled=False):
            states, mask = self.encode_prompts(prompts)  # once per prompt
            text = (states.repeat_interleave(n, 0), mask.repeat_interleave(n, 0))  # (P*n, Lt, D)
            uncond = None
            if negative_prompt:
                neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(neg) != len(prompts):
                    raise MMError(f"got {len(neg)} negative prompts for {len(prompts)} prompts; give one, or one each")
                u_states, u_mask = self.encode_prompts(neg)
                uncond = (u_states.repeat_interleave(n, 0), u_mask.repeat_interleave(n, 0))
            out = []
            for i in range(0, len(seeds), self.max_batch):
                part = slice(i, i + self.max_batch)
                t0, info = time.perf_counter(), {}
                chunk = (text[0][part], text[1][part])
                un = None if uncond is None else (uncond[0][part], uncond[1][part])
                if decode == "sjd":
                    codes = sample_codes_sjd(self.model, chunk, seeds[part], params, uncond=un, cache=cache,
                                             window=self.sjd_window if sjd_window is None else sjd_window,
                                             progress=progress, stats=info)
                else:
                    codes = sample_codes(self.model, chunk, seeds[part], params, uncond=un, cache=cache,
                                         compile=compile, progress=progress)
                out.append(codes)
                info.update(decode=decode, weights=self.weights, images=len(codes), seconds=time.perf_counter() - t0)
                self.history.append(info)
                if stats is not None:
                    stats.append(info)
            return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) → images (B, 3, H, W) in [-1, 1]."""
        return self.vq.decode(codes.to(self.device)).float().clamp(-1, 1)

    def __call__(self, prompts, num_images_per_prompt: int = 1, output_type: str = "pil", **kwargs):
        """Images for the prompts: a list of PIL images (``output_type="pt"``: a (B, 3, H, W) tensor)."""
        codes = self.generate_codes(prompts, num_images_per_prompt, **kwargs)
        images = self.decode(codes)
        return images if output_type == "pt" else to_pil(images)
