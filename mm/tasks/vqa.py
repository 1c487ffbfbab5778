"""VQA fine-tuning of a pretrained MMModel: answer vocabulary, two heads, accuracy, export.

The trainer builds ``VQATask(cfg)`` with ``run.init_from`` resolved to an exported pretrained
folder (config.json, model.safetensors, tokenizer/, vq/) and ``data.tokenizer`` set, then calls
``task.setup(run_dir, accelerator)`` before it builds the optimizer. There the answer vocabulary
is built (or read back on resume) and the classifier head sized to it.

Answer vocabulary: every annotator answer of every training question is normalised with the
official VQA rules (mm.eval.vqa.normalize_answer) and counted; the K most frequent (ties by
text) form the vocabulary, K = ``vqa.answer_vocab_size``. Every rank reads the same shards in
the same order, so every rank builds the same list; rank 0 writes it to RUN/answer_vocab.json
and a resumed run reads that file, so the head never changes shape under a checkpoint.

Heads (``vqa.head``), both on the fused states (backbone over the patches with the question as
cross-attention context):

    classifier  MLP on the mean-pooled fused states -> (B, A) logits; target per answer is its
                soft score min(#annotators/3, 1); loss = BCE averaged over B·A, times A (as ViLT),
                i.e. summed over answers and averaged over questions.
    generative  the TextDecoder writes [BOS] answer [EOS] cross-attending to the fused states;
                next-token loss on the most common (normalised) answer. At test time: greedy
                decoding, or with ``vqa.rank_candidates`` the vocabulary ranked by log-likelihood
                (ALBEF/BLIP).

Export = the pretraining layout + answer_vocab.json (which records the head), read back by
``mm.generation.vqa.load_vqa_answerer``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mm.config import Config
from mm.errors import MMError
from mm.eval.vqa import normalize_answer, soft_score, vqa_accuracy
from mm.generation import vqa as gen
from mm.models.bundle import model_folder
from mm.tasks import objectives as obj

# ---------------------------------------------------------------------------------------------
# Answer vocabulary and targets


_normalize = functools.lru_cache(maxsize=1 << 16)(normalize_answer)  # answers repeat a lot


def answer_counts(answers: list[str]) -> Counter:
    """Annotators per normalised answer of one question (empty normalisations dropped)."""
    return Counter(a for a in (_normalize(str(x)) for x in answers) if a)


def build_answer_vocab(questions, size: int) -> tuple[list[str], list[int]]:
    """The ``size`` most frequent normalised answers over all annotator answers, with their counts.

    ``questions`` iterates over each question's list of (10) answers. Ties are broken by the
    answer text so the order never depends on the reading order.
    """
    if size < 1:
        raise MMError(f"vqa.answer_vocab_size must be >= 1, got {size}")
    total = Counter()
    for answers in questions:
        total.update(answer_counts(answers))
    if not total:
        raise MMError("no answers in the VQA training data; shards need a json with qa [{question, answers}]")
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return [a for a, _ in ranked], [c for _, c in ranked]


def soft_targets(answer_lists: list[list[str]], index: dict[str, int]) -> torch.Tensor:
    """(B, A) training targets: min(#annotators/3, 1) for each vocabulary answer, else 0."""
    targets = torch.zeros(len(answer_lists), len(index))
    for i, answers in enumerate(answer_lists):
        for a, n in answer_counts(answers).items():
            if a in index:
                targets[i, index[a]] = soft_score(n)
    return targets


def most_common_answer(answers: list[str]) -> str:
    """The normalised answer most annotators gave (ties by text): the generative target."""
    counts = answer_counts(answers)
    if not counts:
        return ""
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def answers_from_shards(sources: list[str]):
    """Each training question's answer list, in shard order (unreadable shards are skipped)."""
    from mm.data.shards import questions_of, shard_metadata

    for meta in shard_metadata(sources):
        qas = questions_of(meta) if meta is not None else []
        for qa in qas if isinstance(qas, list) else []:
            if isinstance(qa, dict) and isinstance(qa.get("answers"), list):
                yield [str(a) for a in qa["answers"]]


def init_folder(path: str) -> Path:
    """The exported model folder of ``run.init_from`` (a model folder or a finished run folder)."""
    if not path:
        raise MMError("VQA fine-tuning needs run.init_from=RUN_OR_MODEL_DIR (a pretrained model) "
                      "or vqa.pretrain_config to pretrain first (through `mm train`)")
    return model_folder(path, "point it at RUN/final of a pretraining run")


# ---------------------------------------------------------------------------------------------
# The task


class VQATask:
    data_mode = "vqa"

    def __init__(self, cfg: Config):
        from mm.data.tokenizer import load_tokenizer
        from mm.models.model import MMModel

        self.cfg = cfg
        self.head = cfg.vqa.head
        self.init_dir = init_folder(cfg.run.init_from)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or self.init_dir / "tokenizer")
        self.model = MMModel.from_pretrained(self.init_dir).train()
        c = self.model.config
        if c.vocab_size != self.tokenizer.vocab_size:
            raise MMError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model in {self.init_dir} "
                          f"{c.vocab_size}; use the tokenizer saved with it ({self.init_dir}/tokenizer)")
        if c.image_size != cfg.data.image_size or cfg.data.text_max_len > c.text_max_len:
            raise MMError(f"the model in {self.init_dir} takes {c.image_size} px images and {c.text_max_len} "
                          f"tokens; set data.image_size={c.image_size} and data.text_max_len<={c.text_max_len}")
        if self.head == "generative" and self.model.vqa_head is not None:
            self.model.vqa_head, self.model.vqa_pool, self.model.vqa_reader, c.vqa_answers = None, None, None, 0  # it would get no gradient
        for name in ("vqa_pool", "vqa_fusion"):  # the head is new at fine-tuning: setup() builds it with these
            if getattr(cfg.model, name):  # (values checked by mm.config.validate)
                setattr(c, name, getattr(cfg.model, name))
        if cfg.train.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            from mm.tasks.pretrain import compile_blocks

            compile_blocks(self.model)
        self.answers: list[str] = []
        self.counts: list[int] = []
        self.index: dict[str, int] = {}

    # -- vocabulary -----------------------------------------------------------------------------

    def setup(self, run_dir: str | Path, accelerator=None) -> None:
        """Build (or, on resume, read) the answer vocabulary; size the classifier head to it."""
        path = Path(run_dir) / gen.VOCAB_FILE
        if path.is_file():
            vocab = gen.read_answer_vocab(path)
            if vocab["head"] != self.head:
                raise MMError(f"{path} was built for vqa.head={vocab['head']}, now {self.head}; "
                              "resume with the same config or choose a new run.dir")
            answers, counts = vocab["answers"], vocab.get("counts", [])
        else:
            answers, counts = build_answer_vocab(answers_from_shards(self.cfg.data.train),
                                                 self.cfg.vqa.answer_vocab_size)
            if accelerator is None or accelerator.is_main_process:
                gen.save_answer_vocab(path, answers, counts, self.head, self.cfg.vqa.rank_candidates)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        self.set_answers(answers, counts)

    def set_answers(self, answers: list[str], counts: list[int] | None = None) -> None:
        self.answers, self.counts = list(answers), list(counts or [])
        self.index = {a: i for i, a in enumerate(self.answers)}
        if self.head == "classifier":
            self.model.set_vqa_answers(len(self.answers))

    def _check_ready(self) -> None:
        if not self.answers:
            raise MMError("the VQA task has no answer vocabulary yet; call task.setup(run_dir) first")

    # -- trainer hooks --------------------------------------------------------------------------

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._check_ready()
        m = self.model
        fused, q_states, q_mask = gen.question_and_fused(m, batch["image"], batch["question_ids"],
                                                         batch["question_mask"])  # (B, Li, D), (B, Lt, D)
        if self.head == "classifier":
            logits = m.vqa_logits(fused, q_states, q_mask).float()  # (B, A)
            targets = soft_targets(batch["answers"], self.index).to(logits.device)
            # ViLT: BCE averaged over all entries, times A = summed over answers, mean over questions.
            loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
            hit = targets.gather(1, logits.argmax(1, keepdim=True)).mean()  # soft score of the top answer
            return loss, {"vqa_train_score": float(hit)}
        targets = [most_common_answer(a) for a in batch["answers"]]
        ids, mask = self.tokenizer.encode(targets, self.cfg.data.text_max_len)
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length].to(fused.device), mask[:, :length].to(fused.device)
        loss, _ = obj.caption_loss(m, fused, ids, mask)
        return loss, {}

    def answerer(self) -> gen.VQAAnswerer:
        self._check_ready()
        return gen.VQAAnswerer(self.model, self.tokenizer, self.answers, self.head, self.cfg.vqa.rank_candidates)

    @torch.no_grad()
    def validate(self, batches) -> dict[str, float]:
        """Official VQA accuracy (×100) over the val questions, overall and per answer type."""
        answerer = self.answerer()
        overall, per_type = [], {}
        for batch in batches:
            preds = answerer.from_tensors(batch["image"], batch["question_ids"], batch["question_mask"])
            for (best, _), refs, atype in zip((p[0] for p in preds), batch["answers"], batch["answer_type"]):
                acc = vqa_accuracy(best, refs)
                overall.append(acc)
                per_type.setdefault(atype or "other", []).append(acc)
        if not overall:
            return {}
        out = {"vqa_accuracy": 100.0 * sum(overall) / len(overall), "vqa_questions": float(len(overall))}
        for t, accs in sorted(per_type.items()):
            out[f"vqa_accuracy_{t.replace('/', '_').replace(' ', '_')}"] = 100.0 * sum(accs) / len(accs)
        return out

    def export(self, out_dir: str | Path) -> None:
        """The fine-tuned model folder: config.json, model.safetensors, tokenizer/, vq/, answer_vocab.json."""
        self._check_ready()
        out = Path(out_dir)
        self.model.save_pretrained(out)
        self.tokenizer.save(out / "tokenizer")
        gen.save_answer_vocab(out / gen.VOCAB_FILE, self.answers, self.counts, self.head,
                              self.cfg.vqa.rank_candidates)
        vq = self.init_dir / "vq"
        if vq.is_dir() and (out / "vq").resolve() != vq.resolve():
            shutil.copytree(vq, out / "vq", dirs_exist_ok=True)

    @classmethod
    def for_export(cls, cfg: Config, run_dir: str | Path) -> VQATask:
        """The task of a saved run config, with the init model and vocabulary the trainer used."""
        cfg, run_dir = copy.deepcopy(cfg), Path(run_dir)
        if not cfg.run.init_from:
            cfg.run.init_from = str(run_dir / "pretrain" / "final")  # where the trainer pretrains first
        if not cfg.data.tokenizer and cfg.model.text_encoder == "builtin":
            cfg.data.tokenizer = str(init_folder(cfg.run.init_from) / "tokenizer")
        elif not cfg.data.tokenizer:
            cfg.data.tokenizer = cfg.model.text_encoder
        cfg.train.compile = False
        if not (run_dir / gen.VOCAB_FILE).is_file():
            raise MMError(f"{run_dir} has no {gen.VOCAB_FILE}; it is not a started VQA run")
        task = cls(cfg)
        task.setup(run_dir)
        return task


# ---------------------------------------------------------------------------------------------
# `mm answer`


def _open_image(path: str):
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise MMError(f"image not found: {path}; pass the path of an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many kinds for broken or non-image files
        raise MMError(f"cannot read image {path} ({type(e).__name__}); pass a PNG, JPEG or WebP file") from None


def cli_answer(args: argparse.Namespace) -> int:
    """``mm answer --model DIR --image IMG --question TEXT``: the answer, and the top-5 with scores for
    the classifier (and for generative models that rank the candidate list)."""
    import warnings

    from mm.generation.pipeline import clean_prompt

    with warnings.catch_warnings(record=True) as caught:  # undecodable bytes from the shell (lone
        warnings.simplefilter("always")  # surrogates) and control characters are dropped, with a note
        question = clean_prompt(args.question or "")
    if not question:
        raise MMError("the question is empty; pass --question 'what color is the circle?'")
    image = _open_image(args.image)
    answerer = gen.load_vqa_answerer(args.model)
    for w in caught:  # only once the inputs are accepted: a refusal stays one line
        print(f"mm: warning: {str(w.message).replace('prompt', 'question', 1)}", file=sys.stderr)
    if answerer.head == "generative" and not answerer.rank:  # free decoding: one answer, no scores
        print(f"answer: {answerer([image], [question])[0]}")
        return 0
    (top,) = answerer.top_k([image], [question], 5)
    print(f"answer: {top[0][0]}")
    # classifier: sigmoid probability per answer; ranked generation: log-likelihood of the answer
    print("top-5:" if answerer.head == "classifier" else "top-5 (log-likelihood):")
    for answer, score in top:
        print(f"  {score:.4f}  {answer}")
    return 0
