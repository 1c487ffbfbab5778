"""VQ image tokenizer: images (B, 3, H, W) in [-1, 1] <-> discrete codes (B, h, w).

    encoder (diffusers Encoder) -> z_e (B, d, h, w) -> quantizer -> z_q -> decoder (diffusers Decoder)

The encoder and decoder are diffusers building blocks; the quantizer is ours because diffusers'
VQModel puts β on the codebook term of its loss (DESIGN.md §7). Our loss is the VQ-VAE one:

    codebook = ||z_q - sg(z_e)||²        (moves the codes; zero for the EMA codebook)
    commit   = ||sg(z_q) - z_e||²        (moves the ENCODER towards its code)
    vq_loss  = codebook + β · commit

Two quantizers, chosen by ``quantizer``:
- ``l2`` (LlamaGen style): the encoder emits a low-dimensional vector (``code_dim``, e.g. 8); the
  vector and every code are l2-normalised and the nearest code (largest cosine) is taken. Low
  dimension + normalisation keeps most codes in use without tricks.
- ``ema``: plain Euclidean nearest code in ``code_dim``; codes are exponential moving averages of
  the encoder outputs assigned to them (no gradient into the codebook).

Codes unused for ``dead_code_steps`` optimizer steps are restarted from a ring buffer of recent
encoder outputs (``restart_dead_codes``); call :meth:`VQTokenizer.after_step` once per step.
Under torch.distributed, usage is summed over ranks and rank 0's codebook is broadcast after a
restart, so replicas stay equal.

    vq = VQTokenizer(VQTokenizerConfig(downsample=4))
    codes = vq.encode(images)            # (B, H/4, W/4) long
    recon = vq.decode(codes)             # (B, 3, H, W)
    vq.save_pretrained("out/vq"); VQTokenizer.from_pretrained("out/vq")
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm.errors import MMError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VQTokenizerConfig:
    codebook_size: int = 512
    code_dim: int = 8
    downsample: int = 4  # 4, 8 or 16 = patch_size * 2 ** (len(channel_mult) - 1)
    patch_size: int = 1  # space-to-depth stem (1 = none): p x p pixels -> 3·p² channels
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per resolution
    layers_per_block: int = 1
    quantizer: str = "l2"  # l2 | ema
    beta: float = 0.25
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    dead_code_steps: int = 50
    restart_buffer: int = 4096  # recent encoder outputs kept for restarts
    mid_attention: bool = True  # self-attention in the encoder/decoder middle blocks
    norm: str = "group"  # group | none: GroupNorm in the encoder/decoder blocks, or no norm at all
    image_size: int = 32  # the size it was trained at (`mm data codes` resizes to it)

    def check(self) -> VQTokenizerConfig:
        if self.downsample not in (4, 8, 16):
            raise MMError(f"vq.downsample is {self.downsample}; use 4, 8 or 16")
        if self.patch_size not in (1, 2, 4, 8, 16) or self.patch_size > self.downsample:
            raise MMError(f"vq.patch_size is {self.patch_size}; use 1, 2, 4, 8 or 16, at most "
                          f"vq.downsample ({self.downsample})")
        need = int(math.log2(self.downsample // self.patch_size)) + 1
        if len(self.channel_mult) != need:
            example = ([1, 2, 2, 4, 4])[:need]
            raise MMError(f"vq.channel_mult has {len(self.channel_mult)} values but downsample "
                          f"{self.downsample} with patch_size {self.patch_size} needs {need} "
                          f"(one per resolution after the stem), e.g. {example}")
        if self.norm not in ("group", "none"):
            raise MMError(f"vq.norm is '{self.norm}'; use group or none")
        if self.quantizer not in ("l2", "ema"):
            raise MMError(f"vq.quantizer is '{self.quantizer}'; use l2 or ema")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise MMError(f"vq.codebook_size must be >= 2 and vq.code_dim >= 1; got "
                          f"{self.codebook_size}, {self.code_dim}")
        if self.image_size % self.downsample:
            raise MMError(f"image size {self.image_size} is not divisible by vq.downsample {self.downsample}")
        return self

    @classmethod
    def from_mm_config(cls, cfg) -> VQTokenizerConfig:
        """From an ``mm.config.Config`` (its ``vq`` section and ``data.image_size``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dataclasses.asdict(cfg.vq).items() if k in names}
        return cls(**kwargs, image_size=cfg.data.image_size).check()


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Quantizer(nn.Module):
    """Nearest-code lookup, straight-through gradients, EMA updates and dead-code restarts."""

    def __init__(self, cfg: VQTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        K, d = cfg.codebook_size, cfg.code_dim
        if cfg.quantizer == "l2":
            self.embedding = nn.Parameter(torch.randn(K, d))
        else:
            # EMA codebook: buffers, not parameters; embedding = embed_sum / cluster_size.
            self.register_buffer("embedding", torch.randn(K, d))
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_sum", self.embedding.clone())
        # Bookkeeping for restarts; persistent so a resumed run restarts the same codes.
        self.register_buffer("step_usage", torch.zeros(K, dtype=torch.long))
        self.register_buffer("steps_unused", torch.zeros(K, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(cfg.restart_buffer, d))
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """The codes as looked up: (K, d), l2-normalised for the l2 quantizer."""
        if self.cfg.quantizer == "l2":
            return F.normalize(self.embedding, dim=-1)
        return self.embedding

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output as compared with the codes (l2-normalised for the l2 quantizer)."""
        return F.normalize(z, dim=-1) if self.cfg.quantizer == "l2" else z

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, d) prepared vectors -> (N,) code indices."""
        codes = self.codebook()
        if self.cfg.quantizer == "l2":
            return (z @ codes.t()).argmax(dim=-1)  # unit vectors: nearest = largest cosine
        dist_sq = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(-1)
        return dist_sq.argmin(dim=-1)

    def forward(self, z_e: torch.Tensor):
        """z_e (B, d, h, w) -> z_q (B, d, h, w) straight-through, indices (B, h, w), aux dict."""
        B, d, h, w = z_e.shape
        z = self.prepare(z_e.permute(0, 2, 3, 1).reshape(-1, d).float())  # (N, d)
        idx = self.nearest(z.detach())  # (N,)
        updating = self.training and torch.is_grad_enabled()
        if updating and self.cfg.quantizer == "ema":
            self._ema_update(z.detach(), idx)
        z_q = self.codebook()[idx]  # (N, d)

        if self.cfg.quantizer == "l2":
            codebook_loss = F.mse_loss(z_q, z.detach())
        else:
            codebook_loss = z.new_zeros(())  # codes move by EMA, not by gradient
        commit_loss = F.mse_loss(z, z_q.detach())
        # Straight-through: forward value z_q, gradient to the encoder as if identity.
        z_st = z + (z_q - z).detach()

        if updating:
            self._track(z.detach(), idx)
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        probs = counts / counts.sum()
        aux = {
            "codebook_loss": codebook_loss,
            "commit_loss": commit_loss,
            "vq_loss": codebook_loss + self.cfg.beta * commit_loss,
            "indices": idx.view(B, h, w),
            "usage": (counts > 0).float().mean() * 100,  # % of codes used in this batch
            "perplexity": torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum()),
        }
        z_st = z_st.view(B, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)  # (B, d, h, w)
        return z_st, idx.view(B, h, w), aux

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.cfg.codebook_size).type(z.dtype)  # (N, K)
        counts, sums = onehot.sum(0), onehot.t() @ z  # (K,), (K, d)
        if _dist_ready():  # every replica applies the same global statistics
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.cfg.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps empty clusters from dividing by zero.
        n = self.cluster_size.sum()
        K = self.cfg.codebook_size
        size = (self.cluster_size + 1e-5) / (n + K * 1e-5) * n
        self.embedding.copy_(self.embed_sum / size.unsqueeze(1))

    @torch.no_grad()
    def _track(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """Count code usage for this step and keep some recent encoder outputs for restarts."""
        self.step_usage += torch.bincount(idx, minlength=self.cfg.codebook_size)
        cap = self.recent.shape[0]
        take = z[:: max(1, z.shape[0] // max(1, cap // 4))][: cap // 4 or 1]  # strided subset
        pos = (self.recent_count + torch.arange(take.shape[0], device=z.device)) % cap
        self.recent[pos] = take.to(self.recent.dtype)
        self.recent_count += take.shape[0]

    @torch.no_grad()
    def after_step(self, step: int) -> int:
        """Per-step restart bookkeeping; returns how many codes were restarted."""
        usage = self.step_usage.clone()
        if _dist_ready():
            dist.all_reduce(usage)
        self.step_usage.zero_()
        if not self.cfg.restart_dead_codes:
            return 0
        self.steps_unused.add_(1).masked_fill_(usage > 0, 0)
        dead = (self.steps_unused >= self.cfg.dead_code_steps).nonzero().flatten()
        if dead.numel() == 0:  # the same on every rank (usage was summed)
            return 0
        filled = int(min(self.recent_count.item(), self.recent.shape[0]))
        if filled and (not _dist_ready() or dist.get_rank() == 0):
            # A generator seeded by the step: restarts are reproducible across resumes.
            gen = torch.Generator().manual_seed(1_000_003 * (step + 1))
            pick = torch.randint(filled, (dead.numel(),), generator=gen).to(dead.device)
            self.restart(dead, self.recent[pick])
        if _dist_ready():
            for t in self._codebook_tensors():
                dist.broadcast(t.data, src=0)
        self.steps_unused[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def restart(self, which: torch.Tensor, vectors: torch.Tensor) -> None:
        """Replace codes ``which`` (n,) by ``vectors`` (n, d)."""
        self.embedding.data[which] = vectors.to(self.embedding.dtype)
        if self.cfg.quantizer == "ema":
            self.cluster_size[which] = 1.0
            self.embed_sum[which] = vectors.to(self.embed_sum.dtype)

    def _codebook_tensors(self) -> list[torch.Tensor]:
        if self.cfg.quantizer == "ema":
            return [self.embedding, self.cluster_size, self.embed_sum]
        return [self.embedding]


def _remove_group_norms(module: nn.Module) -> None:
    """Replace every GroupNorm (resnet blocks, block outputs, attention) by the identity.

    Why: GroupNorm normalises each image by its own statistics over all positions, so the
    absolute levels a small image is made of (a flat grey background, a paint colour) must be
    re-derived after every block. On the 32 px shapes VQ, removing it gains 3 dB at 500 steps
    and 1 dB at 1,500 (configs/vq/shapes.yaml), and lets it train at twice the learning rate.
    Measured with the space-to-depth stem and L2 only: a full-resolution stack with L1 (the
    default layout) stalls without it on a tiny overfit (tests/tasks/test_vq_task.py), so
    ``group`` stays the default.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, nn.Identity())


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQTokenizerConfig):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, Encoder  # heavy: import on use

        self.cfg = cfg.check()
        n = len(cfg.channel_mult)
        widths = tuple(cfg.channels * m for m in cfg.channel_mult)
        # GroupNorm with >= 4 channels per group (as diffusers' 32 groups of 128 channels); with
        # one channel per group it would act as InstanceNorm and erase each channel's mean colour.
        groups = math.gcd(max(1, min(32, cfg.channels // 4)), *widths)
        # The stem turns p x p pixel patches into 3·p² channels (pixel_unshuffle), so the
        # diffusers stack runs at 1/p resolution: p² times cheaper per layer, and the decoder's
        # last conv predicts every pixel of a patch directly (sharp, pixel-exact edges).
        # Each diffusers block but the last halves the resolution: factor p · 2 ** (n - 1).
        pixels = 3 * cfg.patch_size**2
        self.encoder = Encoder(in_channels=pixels, out_channels=cfg.code_dim, double_z=False,
                               down_block_types=("DownEncoderBlock2D",) * n, block_out_channels=widths,
                               layers_per_block=cfg.layers_per_block, norm_num_groups=groups,
                               mid_block_add_attention=cfg.mid_attention)
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(in_channels=cfg.code_dim, out_channels=pixels,
                               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths,
                               layers_per_block=cfg.layers_per_block, norm_num_groups=groups,
                               mid_block_add_attention=cfg.mid_attention)
        if cfg.norm == "none":
            _remove_group_norms(self)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise MMError(f"VQ tokenizer expects images (B, 3, H, W); got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.cfg.downsample or W % self.cfg.downsample:
            raise MMError(f"image size {H}x{W} is not divisible by the VQ downsampling factor "
                          f"{self.cfg.downsample}; resize or crop the images")

    def forward(self, images: torch.Tensor):
        """images (B, 3, H, W) in [-1, 1] -> (recon (B, 3, H, W), aux with losses and indices)."""
        z_e = self._encode(images)  # (B, d, h, w)
        z_q, _idx, aux = self.quantizer(z_e)
        return self._decode(z_q), aux  # (B, 3, H, W)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> encoder output z_e (B, d, H/f, W/f)."""
        self._check_images(images)
        return self.encoder(F.pixel_unshuffle(images, self.cfg.patch_size))  # stem: (B, 3p², H/p, W/p)

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, d, h, w) -> images (B, 3, h·f, w·f)."""
        return F.pixel_shuffle(self.decoder(z_q), self.cfg.patch_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long."""
        z_e = self._encode(images)  # (B, d, h, w)
        B, d, h, w = z_e.shape
        z = self.quantizer.prepare(z_e.permute(0, 2, 3, 1).reshape(-1, d).float())
        return self.quantizer.nearest(z).view(B, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) long -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        if codes.dim() != 3:
            raise MMError(f"VQ decode expects codes (B, h, w); got shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise MMError(f"VQ codes must be in [0, {self.cfg.codebook_size}); got "
                          f"[{int(codes.min())}, {int(codes.max())}]")
        z_q = self.quantizer.codebook()[codes]  # (B, h, w, d)
        weight = self.decoder.conv_in.weight
        return self._decode(z_q.permute(0, 3, 1, 2).to(weight.dtype))

    def after_step(self, step: int) -> int:
        return self.quantizer.after_step(step)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # -- Hugging Face-style folder: config.json + model.safetensors (never pickle) --------------

    def save_pretrained(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=1))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "model": "mm-vq"})

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> VQTokenizer:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise MMError(f"{path} is not a VQ tokenizer folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                          "train one with `mm train configs/vq/shapes.yaml`")
        data = json.loads((path / CONFIG_NAME).read_text())
        names = {f.name for f in dataclasses.fields(VQTokenizerConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MMError(f"{path / CONFIG_NAME} has unknown VQ fields {unknown}; "
                          "was it written by a newer mm?")
        model = cls(VQTokenizerConfig(**data))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=map_location))
        return model.eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a real/fake logit per overlapping patch, (B, 1, h', w').

    GroupNorm instead of BatchNorm so statistics do not depend on the per-rank batch.
    """

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            new = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, new, 4, stride=stride, padding=1, bias=False),
                     nn.GroupNorm(math.gcd(32, new), new), nn.LeakyReLU(0.2)]
            width = new
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
