"""Multi-task pretraining of MMModel: ITC, ITM with hard negatives, captioning LM, text-to-image.

The trainer (mm.train) builds ``PretrainTask(cfg)`` with resolved shard folders, a tokenizer
folder (``data.tokenizer``) and a trained VQ folder (``vq.path``), then calls ``loss`` each
micro-step. The objectives themselves are in mm.tasks.objectives. Weights come from
``cfg.objectives`` (0 switches an objective off: it is then not computed at all). Mixing:

    all     every active objective each step, loss = Σ weight · loss
    sample  one objective per step drawn with ``objectives.ratios`` (order itc, itm, caption, t2i)
            from a generator seeded by (run.seed, step): the same on every rank and after resume

The frozen VQ tokenizer is NOT part of ``task.model`` (it is neither trained nor checkpointed);
it is loaded on first use and moved to the batch's device. Batches with pre-extracted
``codes`` never touch it.

Exported folder (the contract for generation and VQA; read it with mm.models.bundle.load_bundle):

    config.json  model.safetensors  tokenizer/  vq/
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
from PIL import Image

from mm.config import Config
from mm.errors import MMError
from mm.models.presets import model_from_config
from mm.nn.layers import Block
from mm.tasks import objectives as obj

OBJECTIVES = ("itc", "itm", "caption", "t2i")


def _vq_facts(vq_path: str, image_size: int) -> tuple[int, list[int]]:
    """(codebook size, code grid) of a VQ folder for images of ``image_size``."""
    path = Path(vq_path) / "config.json"
    if not path.is_file():
        raise MMError(f"vq.path {vq_path} is not a VQ tokenizer folder (no config.json); train one with "
                      "`mm train configs/vq/shapes.yaml` or leave vq.path empty and set vq.config")
    vq = json.loads(path.read_text())
    if image_size % vq["downsample"]:
        raise MMError(f"data.image_size {image_size} is not divisible by the VQ downsample {vq['downsample']}")
    side = image_size // vq["downsample"]
    return int(vq["codebook_size"]), [side, side]


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every Transformer block in place (state-dict keys unchanged); returns the count."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.compile()
    return len(blocks)


class PretrainTask:
    data_mode = "caption"

    def __init__(self, cfg: Config):
        from mm.data.tokenizer import load_tokenizer

        if not cfg.data.tokenizer:
            raise MMError("pretraining needs a tokenizer folder in data.tokenizer (run it through `mm train`, "
                          "which trains one, or pass data.tokenizer=DIR)")
        if not cfg.vq.path:
            raise MMError("pretraining needs a trained VQ tokenizer in vq.path (run it through `mm train` with "
                          "vq.config set, or pass vq.path=DIR)")
        self.cfg = cfg
        self.weights = {n: float(getattr(cfg.objectives, n)) for n in OBJECTIVES}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise MMError(f"objective weights {self.weights} must be >= 0 with at least one > 0")
        self.active = [n for n in OBJECTIVES if self.weights[n] > 0]
        self.ratios = self._ratios(cfg)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.vq_path = Path(cfg.vq.path)
        codebook, grid = _vq_facts(cfg.vq.path, cfg.data.image_size)
        self.model = model_from_config(cfg.model, self.tokenizer.vocab_size, codebook, grid,
                                       cfg.data.image_size, cfg.data.text_max_len)
        self._vq = None  # frozen, loaded lazily, never part of self.model
        weight, plan_weight = cfg.objectives.t2i_object_weight, cfg.objectives.t2i_plan_object_weight
        if plan_weight != 1.0 and not self.model.code_embed.plan:
            raise MMError("objectives.t2i_plan_object_weight needs a model with a T2I plan (model.t2i_plan); "
                          "set it to 1 or give the model a plan")
        if (weight != 1.0 or plan_weight != 1.0) and "t2i" in self.active:
            codes, plan = self.object_weights(weight, plan_weight)
            if weight != 1.0:
                self.model.set_t2i_code_weights(codes)
            if plan_weight != 1.0:
                self.model.set_t2i_plan_weights(plan)
        self.future = cfg.objectives.t2i_future if "t2i" in self.active else 0.0
        if self.future:
            self.model.set_t2i_future(cfg.objectives.t2i_future_regions)
        if cfg.train.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            compile_blocks(self.model)

    def _ratios(self, cfg: Config) -> list[float]:
        if cfg.objectives.mixing != "sample":
            return []
        ratios = list(cfg.objectives.ratios) or [1.0] * len(OBJECTIVES)
        if len(ratios) != len(OBJECTIVES) or any(r < 0 for r in ratios):
            raise MMError(f"objectives.ratios is {ratios}; give 4 non-negative numbers (itc, itm, caption, t2i)")
        ratios = [r if self.weights[n] > 0 else 0.0 for n, r in zip(OBJECTIVES, ratios)]
        if sum(ratios) <= 0:
            raise MMError("objectives.ratios gives no chance to any objective with a weight > 0; raise one")
        return ratios

    # -- helpers --------------------------------------------------------------------------------

    def objectives_at(self, step: int) -> list[str]:
        """The objectives trained at ``step``: all active ones, or one drawn for (run.seed, step)."""
        if self.cfg.objectives.mixing == "all":
            return list(self.active)
        g = torch.Generator().manual_seed((self.cfg.run.seed * 1_000_003 + step) % (2**62))
        i = int(torch.multinomial(torch.tensor(self.ratios), 1, generator=g))
        return [OBJECTIVES[i]]

    def vq(self, device: torch.device):
        if self._vq is None:
            from mm.models.vq import VQTokenizer

            # fork_rng: building the module draws init weights (then overwritten by the loaded
            # ones) from the global RNG; a resumed run loads the VQ again, so that draw would
            # shift its training RNG stream (hard negatives, CFG dropout) from an uninterrupted run.
            with torch.random.fork_rng(devices=[]):
                self._vq = VQTokenizer.from_pretrained(self.vq_path).eval().requires_grad_(False)
        return self._vq.to(device)

    @torch.no_grad()
    def object_weights(self, weight: float, plan_weight: float, max_samples: int = 2048
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-code T2I loss weights (K,): 1 + (weight - 1)·f_c, where f_c is the share of code c's
        occurrences that fall inside an object box, over the first ``max_samples`` train images; and
        the same with ``plan_weight`` for the plan's tokens (PLAN_VOCAB,) over the blocks of every plan
        level (None for a model without a plan).

        The codes that draw objects carry what a prompt asks for, but most codes of a shapes image
        are background texture; weighting by code (not by position) keeps the correction of the
        logits exact (mm.models.model.MMConfig.t2i_code_weights). Needs object boxes in the json
        (``objects[].bbox``, as the shapes data has).
        """
        from mm.data.pipeline import make_loader
        from mm.models.backbone import PLAN_VOCAB, plan_tokens

        m, size = self.model, self.cfg.data.image_size
        grids = [tuple(m.config.code_grid)] + [(t, t) for t in m.code_embed.plan]
        tokens, inside, seen = [[] for _ in grids], [[] for _ in grids], 0
        for batch in make_loader(list(self.cfg.data.train), batch_size=64, seed=0, train=False, image_size=size,
                                 mode="image"):
            for i, grid in enumerate(grids):
                boxes = obj.object_weights(batch["meta"], grid, size, 2.0)  # (B, h*w): 2 inside a box, else 1
                if boxes is None:
                    raise MMError("objectives.t2i_object_weight and t2i_plan_object_weight need object boxes in the "
                                  "train shards' json (objects[].bbox, as the shapes data has); set them to 1 for "
                                  "other data")
                inside[i].append(boxes > 1)
                grid_tokens = self.codes(batch) if i == 0 else plan_tokens(batch["image"], grid[0])  # (B, h, w)
                tokens[i].append(grid_tokens.flatten(1).cpu())
            seen += tokens[0][-1].shape[0]
            if seen >= max_samples:
                break
        code_w = obj.object_code_weights(torch.cat(tokens[0]), torch.cat(inside[0]), m.config.codebook_size, weight)
        if len(grids) == 1:
            return code_w, None
        plan, plan_inside = (torch.cat([torch.cat(x[i]) for i in range(1, len(grids))], 1) for x in (tokens, inside))
        return code_w, obj.object_code_weights(plan, plan_inside, PLAN_VOCAB, plan_weight)

    @torch.no_grad()
    def codes(self, batch: dict) -> torch.Tensor:
        """(B, h, w) codes: pre-extracted from the shards, else encoded by the frozen VQ (fp32)."""
        if "codes" in batch:
            return batch["codes"].long()
        images = batch["image"]
        with torch.autocast(images.device.type, enabled=False):
            return self.vq(images.device).encode(images.float())

    # -- trainer hooks --------------------------------------------------------------------------

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        todo = self.objectives_at(step)
        m = self.model
        images, ids = batch["image"], batch["input_ids"]
        mask = batch["attention_mask"].bool()
        losses, metrics = {}, {}
        text_states = text_mask = None
        own_prompt = m.t2i_text_encoder is not None  # model.t2i_text: T2I has an encoder of its own
        if {"itc", "itm"} & set(todo) or ("t2i" in todo and not own_prompt):
            text_states, text_mask = m.encode_text(ids, mask)  # (B, L, D), (B, L)
        prompt_states, prompt_mask = text_states, text_mask  # T2I's context: the same states, one pass
        if own_prompt and "t2i" in todo:
            prompt_states, prompt_mask = m.encode_prompt(ids, mask)

        image_states = None  # backbone with the null context: ITC's image side and the caption memory
        if "itc" in todo or "caption" in todo:
            image_states = m.image_states(images)  # (B, Li, D)
        if "itc" in todo or ("itm" in todo and self.cfg.objectives.hard_negatives):
            with torch.set_grad_enabled(torch.is_grad_enabled() and "itc" in todo):
                states = image_states if image_states is not None else m.image_states(images)
                img, txt = m.pool_image(states), m.pool_text(text_states, text_mask)  # (B, E) each
                l_itc, mt, logits_i2t, logits_t2i = obj.itc_loss(img, txt, m.itc_logit_scale())
            if "itc" in todo:
                losses["itc"] = l_itc
                metrics.update(mt)
        if "itm" in todo:
            if not self.cfg.objectives.hard_negatives:  # uniform negatives: no similarities needed
                _, size = obj.world()
                logits_i2t = logits_t2i = images.new_zeros(images.shape[0], images.shape[0] * size)
            losses["itm"], mt = obj.itm_loss(m, images, text_states, text_mask, ids, mask, logits_i2t.detach(),
                                             logits_t2i.detach(), self.cfg.objectives.hard_negatives)
            metrics.update(mt)
        if "caption" in todo:
            losses["caption"], _ = obj.caption_loss(m, image_states, ids, mask)
        if "t2i" in todo:
            states, cmask, _ = obj.cfg_drop(m, prompt_states, prompt_mask, self.cfg.objectives.cfg_dropout)
            losses["t2i"], mt, _ = obj.t2i_loss(m, self.codes(batch), states, cmask, self.future > 0,
                                                self.cfg.objectives.t2i_future_positions, m.t2i_plan_tokens(images))
            for extra in ("t2i_future", "t2i_plan"):
                if extra in mt:
                    losses[extra] = mt.pop(extra)
            metrics.update(mt)
        # The plan's cross-entropy counts as much as the codes' (one mean each).
        weights = {**self.weights, "t2i_future": self.future, "t2i_plan": self.weights["t2i"]}
        total = sum(weights[n] * losses[n] for n in losses)
        metrics.update({f"loss_{n}": float(v.detach()) for n, v in losses.items()})
        return total, metrics

    @torch.no_grad()
    def validate(self, batches) -> dict[str, float]:
        """Retrieval R@1/5/10 (ITC; multi-positive on shapes data, single ones as ``*_single``) on the
        val set, caption loss, T2I loss and code accuracy."""
        m = self.model
        img_emb, txt_emb, captions, metas = [], [], [], []
        cap_sum = cap_n = t2i_sum = t2i_correct = t2i_n = t2i_images = 0.0
        plan_sums: dict[str, float] = {}  # t2i_plan (and each level's t2i_plan{t}) x images
        for batch in batches:
            images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"].bool()
            image_states = m.image_states(images) if {"itc", "caption"} & set(self.active) else None
            if "itc" in self.active:
                img_emb.append(m.pool_image(image_states).float().cpu())
                txt_emb.append(m.text_embedding(ids, mask).float().cpu())
                captions += list(batch["caption"])
                metas += list(batch.get("meta") or [None] * len(batch["caption"]))
            if "caption" in self.active:
                loss, _ = obj.caption_loss(m, image_states, ids, mask)
                n = float(mask[:, 1:].sum())
                cap_sum, cap_n = cap_sum + float(loss) * n, cap_n + n
            if "t2i" in self.active:
                states, tmask = m.encode_prompt(ids, mask)
                loss, mt, correct = obj.t2i_loss(m, self.codes(batch), states, tmask, plan=m.t2i_plan_tokens(images))
                for key in (k for k in mt if k.startswith("t2i_plan")):
                    plan_sums[key] = plan_sums.get(key, 0.0) + float(mt[key]) * correct.shape[0]
                t2i_images += correct.shape[0]
                t2i_sum += float(loss) * correct.numel()
                t2i_correct += float(correct.sum())
                t2i_n += correct.numel()
        out = {}
        if img_emb:
            # Multi-positive (truth function) on shapes data, else single; `*_single` always.
            out.update(retrieval_metrics(torch.cat(img_emb) @ torch.cat(txt_emb).t(), captions, metas=metas))
        if cap_n:
            out["caption_loss"] = cap_sum / cap_n
        if t2i_n:
            out.update(t2i_loss=t2i_sum / t2i_n, t2i_acc=t2i_correct / t2i_n)
            # per plan token, kept apart so t2i_loss compares across models
            out.update({f"{k}_loss": v / t2i_images for k, v in plan_sums.items()})
        return out

    @torch.no_grad()
    def images(self, batch: dict, max_images: int = 8) -> dict[str, Image.Image]:
        """Text-to-image samples for the first captions of a batch (top: real, bottom: generated)."""
        if "t2i" not in self.active:
            return {}
        m = self.model
        images = batch["image"][:max_images]
        states, mask = m.encode_prompt(batch["input_ids"][:max_images], batch["attention_mask"][:max_images].bool())
        from mm.generation.sampler import SamplingParams, sample_codes, seeds_tensor

        seeds = seeds_tensor(0, images.shape[0], images.device)  # fixed seeds: comparable across evaluations
        codes = sample_codes(m, (states, mask), seeds, SamplingParams(guidance_scale=3.0))
        vq = self.vq(images.device)
        with torch.autocast(images.device.type, enabled=False):
            fake = vq.decode(codes).float().clamp(-1, 1)
        return {"t2i_samples": image_grid([images, fake])}

    def export(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.tokenizer.save(out / "tokenizer")
        if (out / "vq").resolve() != self.vq_path.resolve():
            shutil.copytree(self.vq_path, out / "vq", dirs_exist_ok=True)

    @classmethod
    def for_export(cls, cfg: Config, run_dir: str | Path) -> PretrainTask:
        """The task of a saved run config: tokenizer and VQ resolved the way the trainer did it."""
        cfg, run_dir = copy.deepcopy(cfg), Path(run_dir)
        if not cfg.vq.path:
            cfg.vq.path = str(run_dir / "vq" / "final")
        if not cfg.data.tokenizer:
            cfg.data.tokenizer = cfg.model.text_encoder if cfg.model.text_encoder != "builtin" \
                else str(run_dir / "tokenizer")
        cfg.train.compile = False
        return cls(cfg)


# ---------------------------------------------------------------------------------------------
# Helpers shared with the evaluation commands


def unique_captions(captions: list[str]) -> tuple[list[str], list[int], list[int]]:
    """Distinct captions in first-seen order, per sample the index of its caption, and per
    distinct caption the first sample that has it."""
    index: dict[str, int] = {}
    first: list[int] = []
    of_sample = []
    for i, c in enumerate(captions):
        t = index.setdefault(c.strip(), len(index))
        if t == len(first):
            first.append(i)
        of_sample.append(t)
    return list(index), of_sample, first


def retrieval_metrics(sim: torch.Tensor, captions: list[str], sim_t2i: torch.Tensor | None = None,
                      metas: list | None = None) -> dict:
    """R@1/5/10 both ways and RSUM for an (images, samples) similarity matrix, and ``*_single``.

    Samples with identical captions are one text (shapes captions repeat): text columns are
    merged by caption (their similarities are identical anyway). With shapes metadata (``metas``)
    a text is a hit for every image it is true of; otherwise, and in the ``*_single`` figures,
    each image's positive is its caption and a text's positives are the images with that caption.
    """
    from mm.eval.retrieval import recall_report, shapes_positives

    texts, of_sample, first = unique_captions(captions)  # a sample column per distinct text
    sim = sim[:, first]
    sim_t2i = sim_t2i[:, first] if sim_t2i is not None else None
    truth, _ = shapes_positives(texts, metas or [], of_sample)
    return recall_report(sim, [[t] for t in of_sample], truth, sim_t2i=sim_t2i)


def image_grid(rows: list[torch.Tensor], scale: int | None = None) -> Image.Image:
    """Rows of (B, 3, H, W) images in [-1, 1] pasted into one PIL grid (small images upscaled)."""
    h, w = rows[0].shape[-2:]
    scale = scale or max(1, 64 // max(h, w))
    cols, pad = max(r.shape[0] for r in rows), 2
    grid = Image.new("RGB", (cols * (w * scale + pad) + pad, len(rows) * (h * scale + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        arr = ((row.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for c, a in enumerate(arr):
            img = Image.fromarray(a, "RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST)
            grid.paste(img, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return grid


# ---------------------------------------------------------------------------------------------
# `mm eval retrieval` and `mm eval caption`


def _eval_setup(args: argparse.Namespace):
    """(model, tokenizer, vq, device, loader over --data in one ordered pass) for an eval command."""
    from mm.data.pipeline import make_loader
    from mm.data.shards import eval_split
    from mm.data.tokenizer import load_tokenizer
    from mm.models.bundle import load_bundle

    args.data = eval_split(args.data)  # a data set root -> its test (else val) split, said on stderr
    for name in ("max_samples", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise MMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok_dir, vq = load_bundle(args.model, device)
    tokenizer = load_tokenizer(tok_dir)
    loader = make_loader([args.data], batch_size=getattr(args, "batch_size", 64), seed=0, train=False,
                         image_size=model.config.image_size, tokenizer=tokenizer,
                         text_max_len=model.config.text_max_len, mode="caption")
    return model, tokenizer, vq, device, loader


def _take(loader, max_samples: int, device):
    """Batches moved to ``device``, cut so that at most ``max_samples`` samples are yielded."""
    seen = 0
    for batch in loader:
        if seen >= max_samples:
            return
        n = min(len(batch["caption"]), max_samples - seen)
        seen += n
        yield {k: (v[:n].to(device) if torch.is_tensor(v) else v[:n]) for k, v in batch.items() if k != "skipped"}


def _write(metrics: dict, out: str) -> None:
    text = json.dumps(metrics, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


@torch.no_grad()
def cli_eval_retrieval(args: argparse.Namespace) -> int:
    """Image→text and text→image R@1/5/10 and RSUM: ITC ranking, then the top-k re-ranked by the
    ITC logit plus the ITM match log-odds (``itc_*`` keys: ITC alone).

    Samples with identical captions share one text (see ``retrieval_metrics``). On shapes data a
    caption is a hit for every image it is true of (``"positives": "truth"``), else only for its
    own images (``"single"``); the single-positive figures are always there as ``*_single``
    (``i2t_r1_single``, ``itc_i2t_r1_single``, …).
    """
    from mm.eval.retrieval import recall_report, rerank_topk, shapes_positives

    model, _, _, device, loader = _eval_setup(args)
    images, img_emb, txt_emb, ids, masks, captions, metas = [], [], [], [], [], [], []
    for batch in _take(loader, args.max_samples, device):
        images.append(((batch["image"] + 1) * 127.5).round().byte().cpu())  # uint8: exact for 8-bit images
        img_emb.append(model.image_embedding(batch["image"]).float().cpu())
        txt_emb.append(model.text_embedding(batch["input_ids"], batch["attention_mask"]).float().cpu())
        ids.append(batch["input_ids"].cpu())
        masks.append(batch["attention_mask"].cpu())
        captions += list(batch["caption"])
        metas += list(batch["meta"])
    if not captions:
        raise MMError(f"no samples with a caption in {args.data}; check it with `mm data inspect`")
    images, ids, masks = torch.cat(images), torch.cat(ids), torch.cat(masks)
    texts, of_sample, first = unique_captions(captions)
    first = torch.tensor(first)  # one sample per distinct text
    sim = torch.cat(img_emb) @ torch.cat(txt_emb)[first].t()  # (Ni, Nt)

    scale = float(model.itc_logit_scale())

    def itm_score(pairs: torch.Tensor) -> torch.Tensor:  # (P, 2) (image, text) -> (P,)
        # The ITM match log-odds added to the ITC logit of the pair: ITM refines ITC's ranking
        # rather than replacing it (an ITM head weaker than ITC alone would undo it).
        x = images[pairs[:, 0]].to(device).float().div(127.5).sub(1.0)
        t = first[pairs[:, 1]]
        states, mask = model.encode_text(ids[t].to(device), masks[t].to(device))
        logits = model.itm_logits(model.fuse(x, states, mask)).float().cpu()
        return logits[:, 1] - logits[:, 0] + scale * sim[pairs[:, 0], pairs[:, 1]]

    # Positives: every caption true of an image (shapes metadata), else each image's own caption.
    single = [[t] for t in of_sample]
    truth, note = shapes_positives(texts, metas, of_sample)
    metrics = {f"itc_{k}": v for k, v in recall_report(sim, single, truth).items()}
    if args.k > 0:
        sim_i2t, sim_t2i = rerank_topk(sim, args.k, itm_score, args.batch_size)
        metrics.update(recall_report(sim_i2t, single, truth, sim_t2i=sim_t2i))
    else:
        metrics.update({k[4:]: v for k, v in metrics.items()})
    metrics.update(positives="truth" if truth is not None else "single", positives_note=note)
    metrics.update(images=len(captions), texts=len(texts), k=args.k)
    _write(metrics, args.out)
    return 0


@torch.no_grad()
def cli_eval_caption(args: argparse.Namespace) -> int:
    """BLEU-4 and CIDEr-D of greedy captions against each sample's reference captions.

    References are ``meta["captions"]`` when the shards have several per image, else the caption.
    """
    from mm.eval.captioning import caption_metrics
    from mm.generation.text import generate_captions

    args.batch_size = getattr(args, "batch_size", 64)
    model, tokenizer, _, device, loader = _eval_setup(args)
    candidates, references, examples = [], [], []
    for batch in _take(loader, args.max_samples, device):
        generated = generate_captions(model, tokenizer, batch["image"], method="greedy")
        for gen, cap, meta in zip(generated, batch["caption"], batch["meta"]):
            refs = meta.get("captions") if isinstance(meta, dict) else None
            refs = [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []
            candidates.append(gen)
            references.append(refs or [cap])
            if len(examples) < 5:
                examples.append({"generated": gen, "reference": cap})
    if not candidates:
        raise MMError(f"no samples with a caption in {args.data}; check it with `mm data inspect`")
    scores = caption_metrics(candidates, references)
    _write({"bleu4": scores["bleu4"], "cider_d": scores["cider"], **scores, "samples": len(candidates),
            "examples": examples}, args.out)
    return 0
