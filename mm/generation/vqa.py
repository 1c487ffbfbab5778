"""Answering questions about images with a fine-tuned MMModel (the VQA heads at inference).

A VQA model folder is the exported pretraining layout plus the answer vocabulary:

    DIR/ config.json  model.safetensors  tokenizer/  [vq/]  answer_vocab.json

``answer_vocab.json`` = ``{"head": "classifier" | "generative", "rank_candidates": bool,
"answers": [normalised answer strings, most frequent first], "counts": [...]}``.

Both heads read the FUSED states: the backbone over image patches with the question as its
cross-attention context, (B, Li, D).

- classifier: ``model.vqa_logits(fused, question)`` (an MLP on the pooled fused states, and with
  ``vqa_fusion=late`` on the pooled question too) scores every
  answer of the vocabulary independently (sigmoid, trained with BCE on soft scores, as ViLT).
- generative: the TextDecoder writes the answer after BOS, cross-attending to the fused states.
  Free greedy decoding, or (``rank_candidates``) ranking the vocabulary by the decoder's
  log-likelihood as ALBEF/BLIP do: the first-token probability preselects k candidates, then
  each of those is scored by the sum of its token log-probabilities (EOS included).

``load_vqa_answerer(DIR)`` gives a :class:`VQAAnswerer`: ``answerer(images, questions)`` returns
answer strings; ``answerer.top_k(images, questions, 5)`` returns (answer, score) lists (scores
are sigmoid probabilities for the classifier, log-likelihoods for ranked generation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mm.errors import MMError

VOCAB_FILE = "answer_vocab.json"
HEADS = ("classifier", "generative")
RANK_PRESELECT = 128  # candidates kept by first-token probability before full scoring (ALBEF's k)


# ---------------------------------------------------------------------------------------------
# The answer vocabulary file


def save_answer_vocab(path: str | Path, answers: list[str], counts: list[int], head: str,
                      rank_candidates: bool) -> None:
    """Write answer_vocab.json atomically (several ranks may look for it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"head": head, "rank_candidates": bool(rank_candidates), "answers": list(answers),
            "counts": [int(c) for c in counts]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_answer_vocab(path: str | Path) -> dict:
    """The parsed answer_vocab.json, checked; a one-line MMError when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise MMError(f"{path.parent} has no VQA head ({VOCAB_FILE} missing); fine-tune it first with "
                      "`mm train configs/vqa/shapes.yaml` and use RUN/final")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MMError(f"{path} is not valid JSON; export the VQA model again") from None
    answers = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise MMError(f"{path} needs a non-empty list of answer strings under 'answers'")
    if data.get("head") not in HEADS:
        raise MMError(f"{path} names head {data.get('head')!r}; expected classifier or generative")
    return data


# ---------------------------------------------------------------------------------------------
# Inputs


def images_to_tensor(images: list, size: int) -> Tensor:
    """PIL images -> (B, 3, size, size) in [-1, 1]: centred square crop, bicubic resize.

    The same transform as the data pipeline without augmentation (mm.data.transforms.load_image).
    """
    from PIL import Image

    from mm.data.transforms import crop_box, to_tensor

    arrays = []
    for im in images:
        im = im.convert("RGB") if im.mode != "RGB" else im
        box = crop_box(im.width, im.height, False, 0)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return to_tensor(arrays)


def question_and_fused(model, images: Tensor, question_ids: Tensor, question_mask: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(fused (B, Li, D), question states (B, Lt, D), question mask (B, Lt)): all the classifier reads."""
    text_states, text_mask = model.encode_text(question_ids, question_mask.bool())
    return model.fuse(images, text_states, text_mask), text_states, text_mask


# ---------------------------------------------------------------------------------------------
# Decoding with the generative head


def greedy_answers(model, tokenizer, fused: Tensor) -> list[str]:
    """Greedy answers from the TextDecoder: BOS, then argmax tokens until EOS (KV-cached)."""
    from mm.generation.text import sample_text

    seqs = sample_text(model, fused, tokenizer.bos_id, tokenizer.eos_id, method="greedy")
    return [tokenizer.decode(seq).strip() for seq in seqs]


def encode_candidates(tokenizer, answers: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """(ids (A, L), mask (A, L)) of every candidate as [BOS] answer [EOS], L = longest candidate."""
    ids, mask = tokenizer.encode(answers, max_len)
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


@torch.no_grad()
def rank_candidates(model, fused: Tensor, cand_ids: Tensor, cand_mask: Tensor, k: int = RANK_PRESELECT,
                    chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Candidates ranked by decoder log-likelihood: (indices (B, k), log-likelihoods (B, k)), best first.

    cand_ids (A, L) start with BOS. k candidates per question are preselected by the probability
    of their first answer token (one decoder step), then scored in full, ``chunk`` rows at a time.
    """
    b, a = fused.shape[0], cand_ids.shape[0]
    k = min(k, a)
    cand_ids, cand_mask = cand_ids.to(fused.device), cand_mask.to(fused.device).bool()
    bos = cand_ids[:1, :1].expand(b, 1)  # (B, 1)
    first = model.caption_logits(fused, bos)[:, 0].float().log_softmax(-1)  # (B, V)
    top = first[:, cand_ids[:, 1]].topk(k, dim=1).indices  # (B, k) candidate indices
    rows = top.reshape(-1)  # (B*k,) row r is question r // k, candidate rows[r]
    scores = []
    for s in range(0, rows.numel(), chunk):
        r = rows[s: s + chunk]
        q = torch.arange(s, s + r.numel(), device=fused.device) // k
        ids, mask = cand_ids[r], cand_mask[r]  # (R, L)
        logp = model.caption_logits(fused[q], ids).float().log_softmax(-1)[:, :-1]  # (R, L-1, V)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (R, L-1) log p(token t+1 | ≤ t)
        scores.append((tok * mask[:, 1:]).sum(1))
    scores = torch.cat(scores).view(b, k)
    order = scores.argsort(dim=1, descending=True)
    return top.gather(1, order), scores.gather(1, order)


# ---------------------------------------------------------------------------------------------
# The answerer


class VQAAnswerer:
    """Answers questions about images with a VQA-fine-tuned model (either head)."""

    def __init__(self, model, tokenizer, answers: list[str], head: str, rank: bool = False):
        if head not in HEADS:
            raise MMError(f"unknown VQA head '{head}'; use classifier or generative")
        if head == "classifier" and model.vqa_head is None:
            raise MMError("this model has no VQA classifier head; fine-tune it with vqa.head=classifier")
        if head == "classifier" and model.config.vqa_answers != len(answers):
            raise MMError(f"the classifier has {model.config.vqa_answers} outputs but the answer vocabulary "
                          f"{len(answers)} answers; export the model and its {VOCAB_FILE} together")
        self.model, self.tokenizer, self.answers = model, tokenizer, list(answers)
        self.head, self.rank = head, bool(rank)
        self._cands = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def candidates(self) -> tuple[Tensor, Tensor]:
        if self._cands is None:
            self._cands = encode_candidates(self.tokenizer, self.answers, self.model.config.text_max_len)
        return self._cands

    def encode(self, images: list, questions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        if len(images) != len(questions):
            raise MMError(f"{len(images)} images for {len(questions)} questions; give one image per question")
        x = images_to_tensor(images, self.model.config.image_size).to(self.device)
        ids, mask = self.tokenizer.encode(list(questions), self.model.config.text_max_len)
        return x, ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def from_tensors(self, images: Tensor, question_ids: Tensor, question_mask: Tensor, k: int = 1
                     ) -> list[list[tuple[str, float]]]:
        """Per question the k best (answer, score); free generation gives one answer, score nan."""
        fused, q_states, q_mask = question_and_fused(self.model, images, question_ids, question_mask)  # (B, Li, D)
        if self.head == "classifier":
            probs = torch.sigmoid(self.model.vqa_logits(fused, q_states, q_mask).float())  # (B, A)
            values, index = probs.topk(min(k, probs.shape[1]), dim=1)
        elif self.rank:
            index, values = rank_candidates(self.model, fused, *self.candidates(), k=max(k, RANK_PRESELECT))
            index, values = index[:, :k], values[:, :k]
        else:
            return [[(a, float("nan"))] for a in greedy_answers(self.model, self.tokenizer, fused)]
        return [[(self.answers[i], float(v)) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(index.tolist(), values.tolist())]

    def top_k(self, images: list, questions: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
        return self.from_tensors(*self.encode(images, questions), k=k)

    def __call__(self, images: list, questions: list[str]) -> list[str]:
        return [best[0][0] for best in self.top_k(images, questions, 1)]


def load_vqa_answerer(model_dir: str | Path, device: str | torch.device | None = None) -> VQAAnswerer:
    """A :class:`VQAAnswerer` for an exported VQA model folder (or a finished VQA run folder)."""
    from mm.data.tokenizer import load_tokenizer
    from mm.models.model import MMModel

    d = Path(model_dir).expanduser()
    if not (d / "config.json").is_file() and (d / "final" / "config.json").is_file():
        d = d / "final"
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise MMError(f"{model_dir} is not an exported mm model (needs config.json and model.safetensors); "
                      "pass RUN/final of `mm train configs/vqa/shapes.yaml`")
    vocab = read_answer_vocab(d / VOCAB_FILE)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MMModel.from_pretrained(d, device=device)
    tokenizer = load_tokenizer(d / "tokenizer")
    return VQAAnswerer(model, tokenizer, vocab["answers"], vocab["head"], vocab.get("rank_candidates", False))
