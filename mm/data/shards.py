"""Shard sets on disk: writing them reproducibly and naming them.

A shard set is a folder of webdataset tars ``{prefix}-000000.tar …`` plus ``sizes.json``
(shard file name → sample count). Every tool that takes "a shard folder or pattern" goes
through :func:`expand_shards`, which accepts a folder, a brace pattern
``shards-{000000..000009}.tar``, a glob, a single tar, or a ``pipe:`` URL.

A data set root (``train/``, ``val/``, ``test/`` split folders of shards, as ``mm data shapes
--out DIR`` writes it) is not a shard folder: evaluation commands turn it into its test (else
val) split with :func:`eval_split`; everywhere else :func:`expand_shards` names the split
folders in its error.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import webdataset as wds

from mm.errors import MMError

SIZES = "sizes.json"


class ShardWriter:
    """Write samples into numbered tar shards, byte-identical for identical input.

    Each shard is written under a temporary name and renamed when complete, so a crash never
    leaves a half-written shard that looks finished. ``sizes.json`` is written on close.
    Samples are dicts as webdataset expects: ``{"__key__": "000001", "png": bytes, "txt": str,
    "json": dict, ...}``.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shards", samples_per_shard: int = 1000,
                 start_index: int = 0):
        if samples_per_shard < 1:
            raise MMError(f"samples per shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.sizes: dict[str, int] = {}
        self._writer = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:06d}.tar"
        self._name = name
        self._tmp = self.out_dir / (name + ".tmp")
        self._stream = open(self._tmp, "wb")
        # Fixed mtime/user/group: the same samples give the same bytes.
        self._writer = wds.TarWriter(self._stream, user="mm", group="mm", mtime=0)
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._writer = None
        self.index += 1

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def close(self) -> dict[str, int]:
        self._finish()
        write_sizes(self.out_dir, self.sizes)
        return self.sizes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._writer is not None:  # an error: drop the partial shard
            self._writer.close()
            self._stream.close()
            self._tmp.unlink(missing_ok=True)


def write_sizes(out_dir: str | Path, sizes: dict[str, int]) -> None:
    """Merge ``sizes`` into ``out_dir/sizes.json`` (atomically)."""
    path = Path(out_dir) / SIZES
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(sizes)
    tmp = path.with_name(SIZES + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1))
    os.replace(tmp, path)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard URLs from a folder, brace pattern, glob, tar path or ``pipe:`` URL (or a list)."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s)]
    spec = str(spec)
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        splits = {} if urls else split_folders(path)
        if splits:  # a data set root as `mm data shapes --out` writes it, not a shard folder
            raise MMError(f"{path} holds split folders {', '.join(f'{s}/' for s in splits)}: "
                          f"pass one of them, e.g. {next(iter(splits.values()))}")
        if not urls:
            raise MMError(f"no .tar shards in folder {path}; write some with `mm data shapes` or `mm data ingest`")
        return urls
    urls = []
    for part in braceexpand.braceexpand(str(path)):
        urls += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    missing = [u for u in urls if not Path(u).exists()]
    if not urls or missing:
        raise MMError(f"shards not found: {missing[0] if missing else spec}; check the path or pattern")
    return urls


SPLIT_NAMES = ("train", "val", "test")
EVAL_SPLITS = ("test", "val")  # what an evaluation uses of a data set root, in order of preference


def split_folders(path: str | Path) -> dict[str, Path]:
    """The split sub-folders holding shards (``train/``, ``val/``, ``test/``) of a data set root,
    as ``mm data shapes --out DIR`` writes it; empty for anything else."""
    path = Path(path).expanduser()
    return {s: path / s for s in SPLIT_NAMES if any((path / s).glob("*.tar"))}


def eval_split(spec):
    """``spec``, or its test split (else val) when it is a data set root with split folders.

    Evaluation commands call this on their ``--data``; it says on stderr which split it took, so
    a figure is never silently of an unexpected split. Other commands get an error naming the
    split folders from :func:`expand_shards` instead.
    """
    path = Path(spec).expanduser() if isinstance(spec, (str, Path)) else None
    if path is None or not path.is_dir() or any(path.glob("*.tar")):
        return spec
    splits = split_folders(path)
    chosen = next((s for s in EVAL_SPLITS if s in splits), None)
    if chosen is None:
        return spec  # no test/ or val/: expand_shards says what is there
    print(f"mm: {spec} holds split folders {', '.join(f'{s}/' for s in splits)}; "
          f"evaluating on its {chosen} split {splits[chosen]}", file=sys.stderr)
    return str(splits[chosen])


def read_sizes(urls: list[str]) -> dict[str, int | None]:
    """Sample count per shard URL from the ``sizes.json`` beside it (None where unknown)."""
    cache: dict[Path, dict] = {}
    out = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            out[url] = None
            continue
        folder = Path(url).parent
        if folder not in cache:
            f = folder / SIZES
            cache[folder] = json.loads(f.read_text()) if f.exists() else {}
        out[url] = cache[folder].get(Path(url).name)
    return out


def count_samples(urls: list[str]) -> int:
    """Total samples from ``sizes.json``; an error naming the shard when a count is missing."""
    sizes = read_sizes(urls)
    unknown = [u for u, n in sizes.items() if n is None]
    if unknown:
        raise MMError(f"no sample count for {unknown[0]} in sizes.json beside it; "
                      "write shards with mm (`mm data ingest`) or add sizes.json")
    return sum(sizes.values())


def questions_of(meta) -> list | None:
    """The VQA questions of a sample's metadata: ``meta["qa"]`` (the shapes format, several per
    image) or a single top-level ``{"question", "answers", "answer_type"}`` (one per sample);
    None when it has neither."""
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("qa"), list):
        return meta["qa"]
    if "question" in meta and "answers" in meta:
        return [{k: meta[k] for k in ("question", "answers", "answer_type", "question_type") if k in meta}]
    return None


def question_type_of(question: str) -> str:
    """A question type for data that has none: its first two words ("what color", "how many")."""
    words = question.lower().replace("?", " ").split()
    return " ".join(words[:2]) if words else "none"


def qa_question_type(qa: dict) -> str:
    """The question type a qa dict names, or the first two words of its question."""
    return str(qa.get("question_type") or question_type_of(str(qa.get("question", ""))))


# Reading shards (the pipeline's and every vocabulary's reader)


def _shard_error(exn: Exception) -> str:
    return "truncated_shard" if isinstance(exn, (tarfile.TarError, EOFError)) else "unreadable_shard"


def read_shard(url: str, counts: Counter | None, expected: int | None = None):
    """Raw samples ({"__key__", ext: bytes}) of one tar; a broken tar ends early and is counted.

    ``counts`` is None when another slot counts this shard's errors (several slots may read
    the same shard). tarfile cannot tell a cut-off tar from a normal end, so a tar with fewer
    samples than ``sizes.json`` promises is counted as truncated and its last sample dropped.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    stream, current, n = None, None, 0
    try:
        stream = gopen(url)
        for f in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            if current is not None and prefix != current["__key__"]:
                n += 1
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = f["data"]
        # tarfile's stream mode ends quietly when a tar is cut off, so sizes.json is the judge;
        # in a short shard the last sample is where the cut is: drop it (its data may be partial).
        short = expected is not None and n + (current is not None) < expected
        if current is not None and not short:
            yield current
        if short and counts is not None:
            counts["truncated_shard"] += 1
    except Exception as exn:  # noqa: BLE001 - tarfile, gzip and pipes raise many kinds; the partial
        # sample at the break is dropped with the rest
        if counts is not None:
            counts[_shard_error(exn)] += 1
    finally:
        try:
            if stream is not None:
                stream.close()
        except Exception:  # noqa: BLE001, S110 - a pipe: closed early reports a broken pipe
            pass


def shard_metadata(sources: list[str]):
    """Each sample's metadata dict (its ``json``), in shard order over ``sources``; None for a sample
    whose json is missing or unreadable. Label and answer vocabularies are built from this."""
    for source in sources:
        for url in expand_shards(source):
            for sample in read_shard(url, None):
                try:
                    meta = json.loads(sample.get("json", b"{}"))
                except (ValueError, UnicodeDecodeError):
                    meta = None
                yield meta if isinstance(meta, dict) else None
