"""Training the VQ image tokenizer: batch -> (loss, metrics), validation, grids, export, codes.

The trainer (mm.train) drives :class:`VQTask`; the loss is

    reconstruction (L1 or L2) + codebook + β·commitment
      [+ perceptual, when vq.perceptual_path names local weights]
      [+ adaptive weight · GAN generator term, once step >= vq.disc_start and vq.disc_weight > 0]

``cli_codes`` implements ``mm data codes``: it rewrites shards with a ``codes.npy`` field added
(the VQ codes of each image), so text-to-image training reads codes instead of pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mm.config import Config
from mm.errors import MMError
from mm.eval.image_metrics import codebook_stats, psnr, ssim
from mm.models.vq import PatchDiscriminator, VQTokenizer, VQTokenizerConfig

# ---------------------------------------------------------------------------------------------
# Optional perceptual loss from local weights (none ship: nothing is downloaded)


class VGGFeatures(nn.Module):
    """A VGG-style feature stack rebuilt from a safetensors file with torchvision's key layout.

    Keys ``features.{i}.weight`` / ``features.{i}.bias`` are 3×3 convolutions, each followed by
    a ReLU; a gap of 3 between conv indices means a max-pool followed that ReLU (torchvision's
    VGG numbering). Features are tapped before every pool and at the end (LPIPS taps).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        convs = [k for k in state if k.startswith("features.") and k.endswith(".weight")]
        idx = sorted({int(k.split(".")[1]) for k in convs})
        if not idx:
            raise MMError("perceptual safetensors file has no 'features.N.weight' convolutions (VGG layout)")
        self.convs = nn.ModuleList()
        self.pool_after: list[bool] = []
        for j, i in enumerate(idx):
            w = state[f"features.{i}.weight"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(state[f"features.{i}.bias"])
            self.convs.append(conv)
            self.pool_after.append(j + 1 < len(idx) and idx[j + 1] - i == 3)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        taps = []
        for conv, pool in zip(self.convs, self.pool_after):
            h = F.relu(conv(h))
            if pool:
                taps.append(h)
                h = F.max_pool2d(h, 2)
        return taps + [h]


def load_perceptual(path: str) -> nn.Module:
    """A frozen feature network from a local TorchScript file or VGG-layout safetensors file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MMError(f"vq.perceptual_path {path} does not exist; give a local TorchScript or VGG "
                      "safetensors file, or leave it empty to train without a perceptual loss")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        net = VGGFeatures(load_file(str(p)))
    else:
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise MMError(f"vq.perceptual_path {path} is not a TorchScript file ({str(e).splitlines()[0]}); "
                          "save one with torch.jit.save or use a VGG safetensors file") from None
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    return net


def perceptual_distance(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS-like: per layer, unit-normalise features over channels, squared difference summed
    over channels and averaged over space and batch; summed over layers."""
    fx, fy = net(x), net(y)
    fx, fy = ([fx], [fy]) if torch.is_tensor(fx) else (fx, fy)
    total = x.new_zeros(())
    for a, b in zip(fx, fy):
        a, b = F.normalize(a.float(), dim=1, eps=1e-10), F.normalize(b.float(), dim=1, eps=1e-10)
        total = total + (a - b).pow(2).sum(1).mean()
    return total


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No parameter gradients inside (the generator's GAN term must not train the critic)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming-transformers' balance: ||∇ nll|| / ||∇ g_loss|| at the decoder's last layer."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


# ---------------------------------------------------------------------------------------------
# The task


class VQTask:
    data_mode = "image"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.vq = cfg.vq
        self.model = VQTokenizer(VQTokenizerConfig.from_mm_config(cfg))
        self.discriminator = None
        if cfg.vq.disc_weight > 0:
            # Three stride-2 layers as in pix2pix, fewer for tiny images (>= 3x3 before the head).
            layers = max(1, min(3, int(math.log2(cfg.data.image_size / 3))))
            self.discriminator = PatchDiscriminator(cfg.vq.channels, layers)
        self.perceptual = load_perceptual(cfg.vq.perceptual_path) if cfg.vq.perceptual_path else None
        self.codes_restarted = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, recon) for the critic

    # -- trainer hooks --------------------------------------------------------------------------

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        recon, aux = self.model(x)
        recon = recon.float()
        rec = F.l1_loss(recon, x) if self.vq.recon_loss == "l1" else F.mse_loss(recon, x)
        nll = rec
        metrics = {}
        if self.perceptual is not None and self.vq.perceptual_weight > 0:
            self.perceptual.to(x.device)
            p_loss = perceptual_distance(self.perceptual, recon, x)
            nll = nll + self.vq.perceptual_weight * p_loss
            metrics["perceptual_loss"] = float(p_loss.detach())
        total = nll + aux["vq_loss"]
        if self.discriminator is not None and step >= self.vq.disc_start:
            with frozen(self.discriminator) as disc:
                g_loss = -disc(recon).mean()  # hinge generator loss
            if self.model.training and torch.is_grad_enabled():
                weight = adaptive_weight(nll, g_loss, self.model.last_layer) * self.vq.disc_weight
            else:
                weight = torch.tensor(self.vq.disc_weight)
            total = total + weight * g_loss
            metrics.update(g_loss=float(g_loss.detach()), disc_adaptive_weight=float(weight))
        self._last = (x, recon.detach())
        with torch.no_grad():
            batch_psnr = psnr((x.float() + 1) / 2, (recon.clamp(-1, 1) + 1) / 2).mean()
        metrics.update(rec_loss=float(rec.detach()), codebook_loss=float(aux["codebook_loss"].detach()),
                       commit_loss=float(aux["commit_loss"].detach()), psnr=float(batch_psnr),
                       batch_code_usage=float(aux["usage"]), batch_perplexity=float(aux["perplexity"]),
                       codes_restarted=float(self.codes_restarted))
        return total, metrics

    def discriminator_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.discriminator is None or step < self.vq.disc_start:
            return torch.zeros(()), {}
        x = batch["image"]
        if self._last is not None and self._last[0] is x:
            fake = self._last[1]  # the reconstruction of this very batch from loss()
        else:
            with torch.no_grad():  # no grad: the quantizer's statistics are left alone
                fake = self.model(x)[0].float()
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(fake.detach())
        loss = 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
        return loss, {"logits_real": float(real_logits.detach().mean()),
                      "logits_fake": float(fake_logits.detach().mean())}

    def after_step(self, step: int) -> None:
        self._last = None
        self.codes_restarted += self.model.after_step(step)

    def state_dict(self) -> dict:
        return {"codes_restarted": self.codes_restarted}

    def load_state_dict(self, state: dict) -> None:
        self.codes_restarted = int(state.get("codes_restarted", 0))

    @torch.no_grad()
    def validate(self, batches) -> dict[str, float]:
        """PSNR and SSIM (means over images), code usage % and perplexity over all codes."""
        was_training = self.model.training
        self.model.eval()
        psnrs, ssims, rec_sum, n = [], [], 0.0, 0
        counts = torch.zeros(self.model.cfg.codebook_size, dtype=torch.long)
        try:
            for batch in batches:
                x = batch["image"]
                recon, aux = self.model(x)
                recon = recon.float().clamp(-1, 1)
                a, b = (x.float() + 1) / 2, (recon + 1) / 2
                psnrs.append(psnr(a, b).cpu())
                ssims.append(ssim(a, b).cpu())
                rec_sum += float(F.l1_loss(recon, x, reduction="sum")) / x[0].numel()
                n += x.shape[0]
                counts += torch.bincount(aux["indices"].flatten().cpu(), minlength=counts.numel())
        finally:
            self.model.train(was_training)
        if n == 0:
            return {}
        usage, perplexity = codebook_stats(counts)
        # A perfect image has infinite PSNR; cap at 100 dB so one does not swamp the mean.
        return {"psnr": float(torch.cat(psnrs).clamp(max=100).mean()), "ssim": float(torch.cat(ssims).mean()),
                "l1": rec_sum / n, "code_usage": usage, "perplexity": perplexity}

    @torch.no_grad()
    def images(self, batch: dict, max_images: int = 16) -> dict[str, Image.Image]:
        """A grid of (original | reconstruction) pairs, four pairs per row."""
        x = batch["image"][:max_images]
        was_training = self.model.training
        self.model.eval()
        try:
            recon = self.model(x)[0]
        finally:
            self.model.train(was_training)
        originals, recons = to_pil(x), to_pil(recon)
        H, W = x.shape[-2:]
        scale = max(1, 64 // max(H, W))  # tiny shapes images are upscaled so one can see them
        h, w, pad = H * scale, W * scale, 2
        cols = min(4, len(originals))
        rows = -(-len(originals) // cols)
        grid = Image.new("RGB", (cols * (2 * w + 3 * pad), rows * (h + pad) + pad), (255, 255, 255))
        for i, (o, r) in enumerate(zip(originals, recons)):
            x0 = (i % cols) * (2 * w + 3 * pad) + pad
            y0 = (i // cols) * (h + pad) + pad
            grid.paste(o.resize((w, h), Image.Resampling.NEAREST), (x0, y0))
            grid.paste(r.resize((w, h), Image.Resampling.NEAREST), (x0 + w + pad, y0))
        return {"reconstructions": grid}

    def export(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# `mm data codes`: add codes.npy to every sample of a shard set


def read_tar_samples(path: str) -> list[dict]:
    """Samples of a webdataset tar in file order: {"__key__": key, ext: bytes, ...}.

    Fields are grouped by key the way webdataset does it: the key is the member path up to the
    first dot of its file name.
    """
    samples: list[dict] = []
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            if "." not in name:
                continue
            stem, ext = name.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_WORKER_VQ: dict[str, VQTokenizer] = {}


def _load_vq(vq_dir: str) -> VQTokenizer:
    if vq_dir not in _WORKER_VQ:
        _WORKER_VQ[vq_dir] = VQTokenizer.from_pretrained(vq_dir).eval()
    return _WORKER_VQ[vq_dir]


def codes_for_shard(vq_dir: str, src: str, dst: str, batch_size: int) -> tuple[str, int, int]:
    """Rewrite one shard with codes added; returns (shard name, samples, samples without image)."""
    import webdataset as wds

    from mm.data.transforms import IMAGE_KEYS, load_image, to_tensor

    vq = _load_vq(vq_dir)
    size = vq.cfg.image_size
    dtype = np.int16 if vq.cfg.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    samples = read_tar_samples(src)
    with_image = [s for s in samples if any(k in s for k in IMAGE_KEYS)]
    for start in range(0, len(with_image), batch_size):
        chunk = with_image[start:start + batch_size]
        arrays = []
        for s in chunk:
            data = s[next(k for k in IMAGE_KEYS if k in s)]
            try:
                arrays.append(load_image(data, size))  # resized only when not size×size already
            except Exception as e:  # noqa: BLE001 - a corrupt image is named, not fatal to the set
                raise MMError(f"{src}: sample {s['__key__']} has an unreadable image ({e}); "
                              "repair or drop it (e.g. `mm data ingest`) and rerun") from None
        codes = vq.encode(to_tensor(arrays)).numpy().astype(dtype)  # (b, h, w)
        for s, c in zip(chunk, codes):
            s["codes.npy"] = npy_bytes(c)
    tmp = Path(dst + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, user="mm", group="mm", mtime=0.0)
        for s in samples:
            writer.write(s)
        writer.close()
    os.replace(tmp, dst)
    return Path(dst).name, len(samples), len(samples) - len(with_image)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: no oversubscription


def cli_codes(args: argparse.Namespace) -> int:
    """`mm data codes --vq DIR --data SHARDS --out DIR [--workers N] [--batch-size B]`."""
    from mm.data.shards import expand_shards, write_sizes

    VQTokenizer.from_pretrained(args.vq)  # a clear error before any worker starts
    if args.workers < 1 or args.batch_size < 1:
        raise MMError(f"--workers and --batch-size must be >= 1; got {args.workers}, {args.batch_size}")
    urls = expand_shards(args.data)
    remote = [u for u in urls if u.startswith("pipe:") or "://" in u]
    if remote:
        raise MMError(f"mm data codes reads local shard files; {remote[0]} is not one "
                      "(copy the shards first)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise MMError("two input shards share a file name; give shards from one folder at a time")
    if any(Path(u).resolve().parent == out.resolve() for u in urls):
        raise MMError(f"--out {out} is the input folder; choose another folder so the input shards are kept")
    jobs = [(str(Path(args.vq)), u, str(out / n), args.batch_size) for n, u in zip(names, urls)]
    started = time.time()
    if args.workers == 1 or len(jobs) == 1:
        results = [codes_for_shard(*job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
        workers = min(args.workers, len(jobs))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            results = list(pool.map(codes_for_shard, *zip(*jobs)))
    write_sizes(out, {name: n for name, n, _ in results})
    total, missing = sum(r[1] for r in results), sum(r[2] for r in results)
    note = f"; {missing} samples without an image kept without codes" if missing else ""
    print(f"mm: wrote codes for {total - missing} samples in {len(results)} shards to {out} "
          f"({time.time() - started:.1f}s){note}")
    return 0
