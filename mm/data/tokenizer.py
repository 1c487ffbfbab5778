"""Text tokenizers: train a byte-level BPE on captions, and one wrapper for any tokenizer folder.

``mm data tokenizer --data SHARDS --vocab-size N --out DIR`` trains a byte-level BPE (the
``tokenizers`` library) on the shard captions, plus the VQA questions and answers in the
``json`` field when present, so VQA text does not fall apart into bytes. The folder holds
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` and loads with
``transformers.PreTrainedTokenizerFast.from_pretrained(DIR)`` and ``AutoTokenizer``.
Special tokens have fixed ids: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, [MASK]=4.

:func:`load_tokenizer` gives a :class:`TextTokenizer` for that folder or for any Hugging Face
tokenizer folder (e.g. a BERT/MiniLM one), always offline (``local_files_only=True``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from mm.data.shards import questions_of
from mm.errors import MMError

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]"]  # ids 0..4 in this order
N_BYTES = 256  # a byte-level alphabet always needs every byte


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on ``captions`` and save it to ``out_dir`` (returned)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < N_BYTES + len(SPECIAL_TOKENS):
        raise MMError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; "
                      f"use at least {N_BYTES + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()  # one code-point sequence per visible text
    # A prefix space makes the first word the same token as inside a sentence ("Ġwhat"), so
    # short questions and answers tokenise well; the decoder strips that one space again, so
    # decode(encode(text)) == text for any text not starting with whitespace.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    # [BOS] text [EOS], as transformers' tokenizer(...) adds them with add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B [EOS]",
        special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return _save_as_transformers(tok, Path(out_dir))


def _save_as_transformers(tok, out_dir: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]", mask_token="[MASK]")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 names its own class here; the generic name also loads in transformers 4.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    special = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]",
               "unk_token": "[UNK]", "mask_token": "[MASK]"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out_dir


class TextTokenizer:
    """Batch encoding to fixed-length id tensors plus a padding mask, for any tokenizer folder.

    ``bos_id`` is BOS (or CLS for BERT-style tokenizers), ``eos_id`` EOS (or SEP), ``pad_id``
    PAD (or EOS when the tokenizer has no pad token, as GPT-2). Picklable (DataLoader workers).
    """

    def __init__(self, hf_tokenizer, path: str = ""):
        self.hf = hf_tokenizer
        self.path = path
        self.vocab_size = len(hf_tokenizer)
        self.bos_id = _first_id(hf_tokenizer, "bos_token_id", "cls_token_id")
        self.eos_id = _first_id(hf_tokenizer, "eos_token_id", "sep_token_id")
        self.pad_id = _first_id(hf_tokenizer, "pad_token_id", "eos_token_id", "sep_token_id")
        if self.pad_id is None:
            raise MMError(f"tokenizer {path} has no pad, eos or sep token; add a pad token to it")

    def encode(self, texts: list[str], max_len: int, add_special: bool = True):
        """``(ids (B, L) long, mask (B, L) bool)`` with L = max_len, right-padded.

        Long texts are truncated to fit, keeping BOS and EOS; mask is True on real tokens.
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        specials = [t for t in (self.bos_id, self.eos_id) if t is not None] if add_special else []
        if max_len < len(specials) + 1:
            raise ValueError(f"max_len {max_len} leaves no room for text next to the special tokens")
        room = max_len - len(specials)
        bodies = self.hf(list(texts), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        for i, body in enumerate(bodies):
            seq = list(body[:room])
            if add_special:
                seq = ([self.bos_id] if self.bos_id is not None else []) + seq
                seq = seq + ([self.eos_id] if self.eos_id is not None else [])
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
        return ids, mask

    def decode(self, ids) -> str:
        """Text of one id sequence (list or 1-D tensor), special tokens and padding skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer folder (loadable again with :func:`load_tokenizer`)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
                f"bos={self.bos_id}, eos={self.eos_id})")


def _first_id(tok, *names: str) -> int | None:
    for name in names:
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A :class:`TextTokenizer` for a local tokenizer folder (ours or Hugging Face's)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MMError(f"tokenizer folder not found: {path}; train one with `mm data tokenizer`")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise MMError(f"{path} holds no tokenizer (tokenizer.json / tokenizer_config.json); "
                      "give a tokenizer folder")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for broken folders
        raise MMError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    return TextTokenizer(hf, str(path))


# ----------------------------------------------------------------------------- the command

def captions_from_shards(spec: str | list[str], stats: dict | None = None):
    """Texts to train a tokenizer on: per sample its caption, then its VQA questions and
    (distinct) answers. ``spec`` is anything :func:`mm.data.shards.expand_shards` takes.
    Unreadable shards are skipped; ``stats`` (if given) gets ``samples`` and ``errors``.
    """
    import webdataset as wds

    from mm.data.shards import expand_shards

    stats = stats if stats is not None else {}
    stats.setdefault("samples", 0)
    stats.setdefault("errors", 0)

    def handler(exn: Exception) -> bool:
        stats["errors"] += 1
        return True

    dataset = wds.WebDataset(expand_shards(spec), shardshuffle=False, handler=handler,
                             empty_check=False, nodesplitter=None, workersplitter=None,
                             select_files=lambda name: name.endswith((".txt", ".json")))
    for sample in dataset:
        stats["samples"] += 1
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", errors="replace")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            stats["errors"] += 1
            continue
        qas = questions_of(meta)
        for qa in qas if isinstance(qas, list) else []:
            if isinstance(qa, dict):
                if isinstance(qa.get("question"), str):
                    yield qa["question"]
                answers = qa.get("answers") if isinstance(qa.get("answers"), list) else []
                yield from sorted({a for a in answers if isinstance(a, str)})


def cli_tokenizer(args: argparse.Namespace) -> int:
    stats: dict = {}
    texts = captions_from_shards(args.data, stats)
    first = next(texts, None)  # fail before writing anything when there is no text
    if first is None:
        raise MMError(f"no captions in {args.data} ({stats['errors']} read errors); check the shards")
    out = train_tokenizer(itertools.chain([first], texts), args.vocab_size, args.out)
    tok = load_tokenizer(out)
    print(f"trained a byte-level BPE on {stats['samples']} samples ({stats['errors']} read errors): "
          f"vocab {tok.vocab_size}, saved to {out}")
    return 0
