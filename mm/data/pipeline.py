"""The deterministic streaming pipeline: webdataset shards → batches of tensors.

How the stream is laid out (so that it is reproducible, equal across ranks and resumable):

- Batches are numbered per rank: 0, 1, 2, … ``batches_per_epoch`` (from ``sizes.json``) is the
  same on every rank, so DDP never waits for a rank whose shards ran dry.
- With ``W`` DataLoader workers, batch ``n`` is made by logical worker ``n % W``; the DataLoader
  asks its workers in turn, so batches arrive in order. A loader resumed at batch ``N`` renames
  its workers ((id + N) % W) so that its first worker makes batch ``N``.
- Train mode: every epoch is built from scratch with seeds that mix (seed, epoch, rank, worker):
  the shard list is permuted, split into disjoint groups over the ``world_size * W`` slots
  (by shard, or by sample when there are fewer shards than slots), each group streams from
  ``wds.ResampledShards(deterministic=True)``, sources are mixed by weight, then shuffled in a
  buffer. A slot makes a fixed number of batches per epoch whatever its shards hold.
- Per-sample randomness (crop jitter) is seeded from (seed, epoch, sample key).
- Resuming at batch ``N`` replays only the epoch containing ``N``, and the replay reads raw tar
  bytes and runs the cheap :func:`check_sample` but never decodes an image.
- Eval mode: one ordered pass; raw sample ``i`` goes to rank ``i % world_size``.

Corrupt input never stops the stream: each reason is counted and the counts since the previous
batch travel inside the batch (``batch["skipped"]``), so they cross worker processes.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from mm.data.shards import (
    expand_shards,
    qa_question_type,
    questions_of,
    read_shard,
    read_sizes,
    shard_metadata,
)
from mm.data.transforms import check_sample, image_key, load_image, sample_seed, to_tensor
from mm.errors import MMError

MODES = ("image", "caption", "vqa")
# Which of a sample's captions (its json ``captions`` list, else the .txt) a training batch uses.
CAPTION_CHOICES = ("first", "random", "complete", "placed")
MAX_BAD_IN_A_ROW = 10_000


@dataclass(frozen=True)
class _Plan:
    """Everything a worker process needs to make its part of the stream (picklable)."""

    sources: tuple[tuple[str, ...], ...]  # shard URLs per source
    sizes: tuple[tuple[int | None, ...], ...]  # samples per shard (None: unknown)
    weights: tuple[float, ...]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    shuffle_buffer: int
    image_size: int
    augment: bool
    tokenizer: object
    text_max_len: int
    mode: str
    train: bool
    batches_per_epoch: int | None
    start_batch: int
    keep: tuple[tuple[str, float], ...] = ()  # vqa train: question type -> keep probability
    captions: str = "first"  # train: one of CAPTION_CHOICES (eval always reads the first)


def _expand_vqa(sample: dict):
    """One item per question, sharing the image bytes."""
    for q, qa in enumerate(questions_of(sample["meta"])):
        answers = [str(a) for a in qa.get("answers", [])]
        yield {**sample, "question": str(qa.get("question", "")), "answers": answers,
               "answer_type": str(qa.get("answer_type", "")), "question_type": qa_question_type(qa),
               "question_id": f"{sample['__key__']}_{q}"}


def _items(samples, plan: _Plan, counts: Counter):
    """Checked items from raw samples: bad ones counted by reason, vqa samples expanded."""
    bad = 0
    for sample in samples:
        reason = check_sample(sample, plan.mode)
        if reason:
            counts[reason] += 1
            bad += 1
            if plan.train and bad >= MAX_BAD_IN_A_ROW:  # an endless stream would spin forever
                raise MMError(f"{bad} samples in a row were unusable (last: {reason}, key "
                              f"{sample['__key__']} in {sample['__url__']}); check the shards and --mode")
            continue
        bad = 0
        if plan.mode == "vqa":
            yield from _expand_vqa(sample)
        else:
            yield sample


# ---------------------------------------------------------------------------------------------
# Train mode: one epoch of one slot


def _group_samples(plan: _Plan, source: int, epoch: int, slot: int, counts: Counter):
    """Endless raw samples of this slot's share of one source in one epoch.

    The epoch's shard permutation is split into G = min(shards, slots) disjoint groups; slot s
    reads group s % G and, when several slots share a group, keeps every M-th sample.
    """
    import webdataset as wds

    urls, sizes = plan.sources[source], dict(zip(plan.sources[source], plan.sizes[source]))
    slots = plan.world_size * plan.num_workers
    perm = list(urls)
    random.Random(sample_seed(plan.seed, "shards", source, epoch)).shuffle(perm)
    groups = min(len(perm), slots)
    group = slot % groups
    members = list(range(group, slots, groups))
    pos = members.index(slot)
    # Ints only: webdataset's make_seed hashes its arguments, and hash(str) differs per process.
    group_seed = sample_seed(plan.seed, "resample", source, epoch, group) & 0x7FFFFFFF
    shards = wds.ResampledShards(perm[group::groups], seed=plan.seed & 0x7FFFFFFF,
                                 worker_seed=lambda: group_seed, deterministic=True)
    empty = 0  # shards in a row that gave this slot nothing: a guard against spinning forever
    for shard in shards:
        url = shard["url"]
        got = 0
        # Split by the index inside the shard, so a shard read again splits the same way.
        for index, sample in enumerate(read_shard(url, counts if pos == 0 else None, sizes.get(url))):
            if index % len(members) == pos:
                got += 1
                yield sample
        empty = 0 if got else empty + 1
        if empty > 20 + 5 * len(perm):
            raise MMError(f"no readable samples for rank {plan.rank} in {urls[0]} and the shards beside "
                          f"it ({len(perm)} shards for {slots} rank x worker slots); check the shards "
                          "with `mm data inspect` or use fewer workers")


def _thin(items, keep: dict[str, float], rng: random.Random):
    """Keep each item with its question type's probability (1 for types not listed)."""
    for item in items:
        p = keep.get(item.get("question_type", ""), 1.0)
        if p >= 1.0 or rng.random() < p:
            yield item


def question_type_keep(sources: list[str], alpha: float) -> dict[str, float]:
    """Keep probabilities that reshape question-type frequencies f_t into f_t^(1 - alpha).

    Keeping a type-t question with probability (f_min / f_t)^alpha leaves the types in proportion
    f_t^(1 - alpha): alpha 0 is the data as it is, alpha 1 every type equally often. Counted
    over the metadata of ``sources`` (every rank counts the same shards, so all agree).
    """
    counts = Counter(qa_question_type(qa) for meta in shard_metadata(sources)
                     for qa in (questions_of(meta) or []) if isinstance(qa, dict))
    if not counts:
        raise MMError(f"no VQA questions in {', '.join(sources)}; data.vqa_balance needs VQA shards")
    least = min(counts.values())
    return {t: (least / n) ** alpha for t, n in sorted(counts.items())}


def _mix(streams: list, weights: tuple[float, ...], rng: random.Random):
    if len(streams) == 1:
        yield from streams[0]
        return
    choices = range(len(streams))
    while True:
        yield next(streams[rng.choices(choices, weights)[0]])


def _shuffle(items, size: int, rng: random.Random):
    """Buffer shuffle (as webdataset's): each new item replaces a random one that is emitted."""
    buf = list(islice(items, size))
    for item in items:
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def _train_batches(plan: _Plan, worker: int):
    """(batch index, epoch, raw items, skip counts) for every batch of this logical worker."""
    W, bpe, B = plan.num_workers, plan.batches_per_epoch, plan.batch_size
    slot = plan.rank * W + worker
    epoch = plan.start_batch // bpe
    counts = Counter()
    while True:
        first = epoch * bpe + (worker - epoch * bpe) % W  # first n >= epoch*bpe with n % W == worker
        mine = range(first, (epoch + 1) * bpe, W)
        if len(mine):
            streams = [_items(_group_samples(plan, s, epoch, slot, counts), plan, counts)
                       for s in range(len(plan.sources))]
            if plan.keep:
                streams = [_thin(st, dict(plan.keep), random.Random(sample_seed(plan.seed, "thin", s, epoch, slot)))
                           for s, st in enumerate(streams)]
            mixed = _mix(streams, plan.weights, random.Random(sample_seed(plan.seed, "mix", epoch, slot)))
            items = _shuffle(mixed, min(plan.shuffle_buffer, len(mine) * B),
                             random.Random(sample_seed(plan.seed, "shuffle", epoch, slot)))
            for n in mine:
                yield n, epoch, list(islice(items, B)), counts.copy()
                counts.clear()
            items.close()
            for stream in streams:
                stream.close()
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Eval mode: one ordered pass


def _eval_batches(plan: _Plan, worker: int):
    """Ordered batches of this rank; this logical worker makes batches n with n % W == worker."""
    W, R, B = plan.num_workers, plan.world_size, plan.batch_size
    counts, batch, n, index, shard_index = Counter(), [], 0, 0, 0
    for urls, sizes in zip(plan.sources, plan.sizes):
        for url, size in zip(urls, sizes):
            mine = shard_index % R == plan.rank and n % W == worker
            shard_index += 1
            for sample in read_shard(url, counts if mine else None, size):
                index += 1
                if (index - 1) % R != plan.rank:
                    continue
                sink = counts if n % W == worker else Counter()
                for item in _items([sample], plan, sink):
                    batch.append(item)
                    if len(batch) == B:
                        if n % W == worker:
                            yield n, 0, batch, counts.copy()
                            counts.clear()
                        batch, n = [], n + 1
    if batch and n % W == worker:
        yield n, 0, batch, counts.copy()
    elif counts:
        yield None, 0, [], counts  # counts after the last batch: the Loader keeps them


# ---------------------------------------------------------------------------------------------
# Decoding a batch


def _decode(plan: _Plan, item: dict, epoch: int):
    image = load_image(item[image_key(item)], plan.image_size, plan.augment,
                       sample_seed(plan.seed, epoch, item["__key__"]))
    codes = np.load(io.BytesIO(item["codes.npy"])) if "codes.npy" in item else None
    return image, codes


def choose_caption(item: dict, how: str, seed: int, epoch: int) -> str:
    """The caption a training item uses this epoch: its first (the .txt), one of its json
    ``captions`` at random, or one at random of those that name every object (``complete``:
    shapes metadata; any caption when none does or the metadata is not shapes'), and of those
    the ones that also say where (``placed``: a place or a relation, when one does). Seeded by
    (seed, epoch, sample key) only, so a resumed stream picks the same ones."""
    meta = item.get("meta") or {}
    options = meta.get("captions")
    if how == "first" or not isinstance(options, list) or not options or \
            not all(isinstance(c, str) and c.strip() for c in options):
        return item["caption"]
    if how in ("complete", "placed"):
        from mm.data.shapes_truth import is_shapes_meta, names_every_object, parse_caption

        if is_shapes_meta(meta):
            try:
                options = [c for c in options if names_every_object(c, meta)] or options
                if how == "placed":
                    options = [c for c in options if parse_caption(c).kind != "listing"] or options
            except ValueError:  # a caption outside the shapes grammar: no way to tell, keep all
                pass
    return options[random.Random(sample_seed(seed, "caption", epoch, item["__key__"])).randrange(len(options))]


def _collate(plan: _Plan, items: list[dict], epoch: int, counts: Counter) -> dict:
    """Decode and stack one batch. An image that passed the cheap check but fails to decode is
    replaced by a good neighbour from the same batch (counted), so batch boundaries never move."""
    decoded = []
    for item in items:
        try:
            decoded.append(_decode(plan, item, epoch))
        except Exception:  # noqa: BLE001 - PIL and numpy raise many kinds for broken data
            counts["decode_error"] += 1
            decoded.append(None)
    good = [i for i, d in enumerate(decoded) if d is not None]
    if not good:
        raise MMError(f"no image of a batch could be decoded (first key {items[0]['__key__']}); "
                      "check the shards with `mm data inspect`")
    keep = [i if decoded[i] is not None else min(good, key=lambda g: abs(g - i)) for i in range(len(items))]
    items = [items[i] for i in keep]
    batch = {
        "image": to_tensor([decoded[i][0] for i in keep]),  # (B, 3, H, W) in [-1, 1]
        "key": [it["__key__"] for it in items],
        "caption": [choose_caption(it, plan.captions if plan.train else "first", plan.seed, epoch)
                    for it in items],
        "meta": [it["meta"] for it in items],
        "skipped": dict(counts),
    }
    if all(decoded[i][1] is not None for i in keep):
        batch["codes"] = torch.from_numpy(np.stack([decoded[i][1] for i in keep])).long()  # (B, h, w)
    if plan.tokenizer is not None:
        batch["input_ids"], batch["attention_mask"] = plan.tokenizer.encode(batch["caption"], plan.text_max_len)
    if plan.mode == "vqa":
        for field in ("question", "answers", "answer_type", "question_type", "question_id"):
            batch[field] = [it[field] for it in items]
        if plan.tokenizer is not None:
            batch["question_ids"], batch["question_mask"] = plan.tokenizer.encode(batch["question"],
                                                                                  plan.text_max_len)
    return batch


class _Stream(torch.utils.data.IterableDataset):
    """One rank's batches; inside a DataLoader worker, that worker's share."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        plan = self.plan
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + plan.start_batch) % plan.num_workers
        make = _train_batches if plan.train else _eval_batches
        for n, epoch, items, counts in make(plan, worker):
            if n is None:
                yield {"skipped": dict(counts), "no_batch": True}
            elif n >= plan.start_batch:  # earlier batches are read and checked, never decoded
                yield _collate(plan, items, epoch, counts)


# ---------------------------------------------------------------------------------------------
# The public loader


def _one_thread(worker_id: int) -> None:
    # Workers stack small tensors; letting each use every core only makes them fight the trainer.
    torch.set_num_threads(1)


class Loader:
    """Iterable of batch dicts for one rank; keeps the batch position and the skip counts.

    Train mode is endless (``batches_per_epoch`` says where epochs end). Iterating again
    continues where the previous iteration stopped; in eval mode each iteration is a new pass.
    Never hand it to ``accelerator.prepare``: it already splits by rank, and accelerate's
    dispatcher would drop batches.
    """

    def __init__(self, plan: _Plan, num_workers: int):
        self._plan = plan
        self._num_workers = num_workers
        self.batch = plan.start_batch
        self.skipped: dict[str, int] = {}
        self.batches_per_epoch = plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.batch // self.batches_per_epoch if self.batches_per_epoch else 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("length unknown: no sizes.json beside the shards")
        return self.batches_per_epoch

    def __iter__(self):
        if not self._plan.train:  # a new pass: position and counts start again
            self.batch, self.skipped = self._plan.start_batch, {}
        plan = replace(self._plan, start_batch=self.batch)
        stream = _Stream(plan)
        if self._num_workers > 0:
            stream = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self._num_workers,
                                                 worker_init_fn=_one_thread)
        for batch in stream:
            for reason, count in batch["skipped"].items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            if batch.get("no_batch"):  # only skip counts, from the end of an eval pass
                continue
            self.batch += 1
            yield batch

    def state_dict(self) -> dict:
        p = self._plan
        return {"batch": self.batch, "epoch": self.epoch, "skipped": dict(self.skipped),
                "seed": p.seed, "world_size": p.world_size, "num_workers": self._num_workers,
                "batch_size": p.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (same seed, world size, workers and batch size)."""
        mine = self.state_dict()
        for k in ("seed", "world_size", "num_workers", "batch_size"):
            if k in state and state[k] != mine[k]:
                raise MMError(f"cannot resume the data stream: {k} was {state[k]}, now {mine[k]}; "
                              f"use the same {k} as the run you resume")
        self.batch = int(state["batch"])
        self.skipped = dict(state.get("skipped", {}))


def _sizes(urls: list[str]) -> list[int | None]:
    """Samples per shard from sizes.json; for ``pipe:cmd ... PATH`` the folder of PATH is used."""
    known = read_sizes(urls)
    out = []
    for url in urls:
        n = known[url]
        if n is None and url.startswith("pipe:"):
            path = url.split()[-1]
            if Path(path).exists():
                n = read_sizes([path])[path]
        out.append(n)
    return out


def _questions_per_sample(urls: list[str]) -> int:
    """Questions in the first readable sample of a source (vqa epochs count questions)."""
    for url in urls:
        for sample in read_shard(url, None):
            try:
                return max(1, len(questions_of(json.loads(sample.get("json", b"{}"))) or []))
            except (ValueError, AttributeError):
                continue
    return 1


def _batches_per_epoch(sizes: list[list[int | None]], urls: list[list[str]], *, train: bool,
                       mode: str, batch_size: int, rank: int, world_size: int) -> int | None:
    flat = [n for s in sizes for n in s]
    if None in flat:
        if train:
            url = next(u for us, ss in zip(urls, sizes) for u, n in zip(us, ss) if n is None)
            raise MMError(f"no sample count for {url} in sizes.json beside it; training needs it "
                          "for equal epochs on every rank (write shards with `mm data ingest`)")
        return None
    if train:
        items = sum(sum(s) * (_questions_per_sample(u) if mode == "vqa" else 1) for s, u in zip(sizes, urls))
        return max(1, items // (world_size * batch_size))
    mine = len(range(rank, sum(flat), world_size))  # eval: raw sample i goes to rank i % world
    q = _questions_per_sample([u for us in urls for u in us]) if mode == "vqa" else 1
    return math.ceil(mine * q / batch_size)


def make_loader(sources: list[str], *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, weights: list[float] | None = None, shuffle_buffer: int = 1000,
                image_size: int = 32, augment: bool = False, tokenizer=None, text_max_len: int = 32,
                mode: str = "caption", train: bool = True, start_batch: int = 0,
                balance: float = 0.0, captions: str = "first") -> Loader:
    """A deterministic, resumable loader over one or more shard sets (see the module docstring).

    ``sources``: shard specs (folder, brace pattern, glob, tar, ``pipe:`` URL), one per mixture
    component. ``mode``: "image" (pixels only), "caption" (needs a caption) or "vqa" (one item
    per question). ``train``: endless resampled stream with fixed-length epochs, or one ordered
    pass split by rank. ``start_batch``: continue exactly from this batch of this rank's stream.
    ``balance``: vqa train only, flatten question-type frequencies f_t to f_t^(1 - balance) by
    thinning the frequent types (see ``question_type_keep``); epochs keep their length in batches.
    ``captions``: which caption a training item uses (``choose_caption``); eval reads the first.
    In eval mode ``batches_per_epoch`` is the expected count; corrupt samples make it smaller.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise MMError("no data sources given; pass at least one shard folder or pattern")
    if mode not in MODES:
        raise MMError(f"unknown data mode '{mode}'; use one of {', '.join(MODES)}")
    if batch_size < 1 or image_size < 1 or num_workers < 0 or start_batch < 0 or shuffle_buffer < 1:
        raise MMError("batch_size, image_size and shuffle_buffer must be >= 1, num_workers and "
                      f"start_batch >= 0 (got {batch_size}, {image_size}, {shuffle_buffer}, "
                      f"{num_workers}, {start_batch})")
    if not 0.0 <= balance <= 1.0:
        raise MMError(f"data.vqa_balance must be between 0 (off) and 1 (every question type equally often), got {balance}")
    if captions not in CAPTION_CHOICES:
        raise MMError(f"data.captions must be one of {', '.join(CAPTION_CHOICES)}, got {captions!r}")
    if not 0 <= rank < world_size:
        raise MMError(f"rank {rank} is outside world size {world_size}")
    weights = list(weights) if weights else [1.0] * len(sources)
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MMError(f"data weights {weights} do not fit {len(sources)} sources; give one "
                      "non-negative weight per source, not all zero")
    urls = [expand_shards(s) for s in sources]
    sizes = [_sizes(u) for u in urls]
    bpe = _batches_per_epoch(sizes, urls, train=train, mode=mode, batch_size=batch_size,
                             rank=rank, world_size=world_size)
    plan = _Plan(sources=tuple(map(tuple, urls)), sizes=tuple(map(tuple, sizes)), weights=tuple(weights),
                 batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                 num_workers=max(1, num_workers), shuffle_buffer=shuffle_buffer, image_size=image_size,
                 augment=augment, tokenizer=tokenizer, text_max_len=text_max_len, mode=mode, train=train,
                 batches_per_epoch=bpe, start_batch=start_batch, captions=captions)
    if balance > 0 and train and mode == "vqa":
        plan = replace(plan, keep=tuple(question_type_keep(sources, balance).items()))
    return Loader(plan, num_workers)
