"""The ``mm`` command (also ``python -m mm``).

Each subcommand declares its arguments here (the command line is a contract, DESIGN.md §3) and
hands the parsed arguments to one function in the package that does the work, imported only
when the command runs so ``mm --help`` stays fast. User mistakes raise ``MMError``; they are
printed as one line ``mm: error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mm.errors import MMError
from mm.generation import DEFAULT_GUIDANCE


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="make, ingest, inspect and tokenise shard data sets")
    dsub = data.add_subparsers(dest="data_command", metavar="{shapes,ingest,inspect,tokenizer,codes}")
    dsub.required = True

    p = dsub.add_parser("shapes", help="write the built-in shapes image-caption-VQA data set as shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, required=True, help="samples in the train split")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--val-samples", type=int, default=None, help="samples in val and test (default: 10%%)")
    p.set_defaults(func="mm.data.shapes:cli_shapes")

    p = dsub.add_parser("ingest", help="convert images + captions into webdataset shards")
    p.add_argument("src", help="folder (image + same-named .txt, or HF imagefolder) or a CSV/JSONL file")
    p.add_argument("--out", required=True, help="output folder for shards")
    p.add_argument("--image-column", default="image", help="CSV/JSONL column with the image path")
    p.add_argument("--caption-column", default="caption", help="CSV/JSONL column with the caption")
    p.add_argument("--label-column", default="label", help="CSV/JSONL/metadata column with a class label")
    p.add_argument("--classes", default="", help="comma-separated class list; other labels are skipped")
    p.add_argument("--resize", type=int, default=0, help="resize the short side to N and centre-crop (0 = keep)")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dedup", action="store_true", help="drop images whose content hash was already seen")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images are skipped as bombs")
    p.add_argument("--images", default="", help="COCO instances json: the image folder (default: beside the json)")
    p.set_defaults(func="mm.data.ingest:cli_ingest")

    p = dsub.add_parser("inspect", help="count samples and shards, caption statistics, skipped files")
    p.add_argument("path", help="shard folder or pattern (shards-{000000..000009}.tar)")
    p.add_argument("--grid", default="", help="write a contact sheet of samples with captions to this PNG")
    p.add_argument("--num", type=int, default=16, help="samples in the contact sheet and examples")
    p.set_defaults(func="mm.data.inspect:cli_inspect")

    p = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on shard captions")
    p.add_argument("--data", required=True, help="shard folder or pattern")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.set_defaults(func="mm.data.tokenizer:cli_tokenizer")

    p = dsub.add_parser("codes", help="add pre-extracted VQ codes (codes.npy) to shards")
    p.add_argument("--vq", required=True, help="trained VQ tokenizer folder")
    p.add_argument("--data", required=True, help="input shard folder or pattern")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func="mm.tasks.vq:cli_codes")


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate: VQA accuracy, retrieval, text-to-image")
    esub = ev.add_subparsers(dest="eval_command", metavar="{vqa,retrieval,t2i,caption,curves}")
    esub.required = True

    p = esub.add_parser("vqa", help="VQAv2 accuracy from official files or from a model")
    p.add_argument("--predictions", help="results JSON [{question_id, answer}]")
    p.add_argument("--annotations", help="official annotations JSON")
    p.add_argument("--questions", help="official questions JSON")
    p.add_argument("--model", help="model folder (instead of --predictions)")
    p.add_argument("--data", help="shards with VQA questions (with --model)")
    p.add_argument("--out", default="", help="write the metrics JSON here")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func="mm.eval.vqa:cli_eval_vqa")

    p = esub.add_parser("retrieval", help="image-text retrieval R@1/5/10 with ITC then ITM re-ranking")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--k", type=int, default=16, help="ITC candidates re-ranked by ITM (0 = no re-ranking)")
    p.add_argument("--max-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="")
    p.set_defaults(func="mm.tasks.pretrain:cli_eval_retrieval")

    p = esub.add_parser("t2i", help="compositional text-to-image score on held-out shapes prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance (1 = none)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0 = all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--plan-temperature", type=float, default=None,
                   help="temperature of a plan model's plan tokens (model.t2i_plan; default: --temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-data", default="", help="shards of real images for FID (optional)")
    p.add_argument("--inception", default="", help="local Inception weights for FID (default: mm features)")
    p.add_argument("--out", default="")
    p.set_defaults(func="mm.eval.t2i:cli_eval_t2i")

    p = esub.add_parser("caption", help="BLEU-4 and CIDEr-D of generated captions against references")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--out", default="")
    p.set_defaults(func="mm.tasks.pretrain:cli_eval_caption")

    p = esub.add_parser("curves", help="evaluate every checkpoint of runs; quality against training CPU-minutes")
    p.add_argument("--run", action="append", required=True, help="run folder of `mm train`; repeat to compare")
    p.add_argument("--data", default="", help="shards to evaluate retrieval and VQA on (e.g. the test split)")
    p.add_argument("--max-samples", type=int, default=500, help="retrieval images per checkpoint")
    p.add_argument("--num-prompts", type=int, default=60, help="held-out T2I prompts per checkpoint")
    p.add_argument("--out", required=True, help="folder for curves.json, curves.png and the exports")
    p.set_defaults(func="mm.train.curves:cli_eval_curves")


def _add_model_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate images from prompts into a PNG grid")
    p.add_argument("--model", required=True, help="exported model folder or run folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance (1 = none)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--plan-temperature", type=float, default=None,
                   help="temperature of a plan model's plan tokens (model.t2i_plan; default: --temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG grid")
    p.add_argument("--out-dir", default="", help="also write each image here")
    p.add_argument("--decode", choices=["plain", "sjd"], default="plain",
                   help="sjd: speculative Jacobi decoding, same distribution in fewer forwards")
    p.add_argument("--sjd-window", type=int, default=16, help="draft codes checked per forward (--decode sjd)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default="fp32", help="decode weights")
    p.add_argument("--max-batch", type=int, default=0, help="images sampled together (0 = the pipeline's default)")
    p.set_defaults(func="mm.generation:cli_generate")

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("--model", required=True)
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--method", default="greedy", choices=["greedy", "beam", "top-p"])
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func="mm.generation:cli_caption")

    p = sub.add_parser("answer", help="answer a question about an image")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.set_defaults(func="mm.tasks.vqa:cli_answer")

    p = sub.add_parser("classify", help="the top classes of images with a trained classifier")
    p.add_argument("--model", required=True, help="exported classifier folder or classify run folder")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--top-k", type=int, default=5, help="classes printed per image")
    p.set_defaults(func="mm.tasks.classify:cli_classify")

    p = sub.add_parser("detect", help="detect objects in images with a trained detector; draws labelled boxes")
    p.add_argument("--model", required=True, help="exported detector folder or detect run folder")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--out", required=True, help="PNG with the boxes drawn")
    p.add_argument("--min-score", type=float, default=0.5, help="boxes with a lower class probability are left out")
    p.set_defaults(func="mm.tasks.detect:cli_detect")

    p = sub.add_parser("export", help="export a run's newest checkpoint as a Hugging Face-style folder")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.set_defaults(func="mm.train.export:cli_export")

    p = sub.add_parser("demo", help="the whole pipeline on the built-in shapes data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="a first look in about 3 minutes")
    p.add_argument("--long", action="store_true", help="the long recipe: about 70-95 minutes on 2 CPU cores")
    p.set_defaults(func="mm.train.demo:cli_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm",
        description="mm: vision-language pretraining, text-to-image generation and VQA on one backbone.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_data(sub)

    p = sub.add_parser("train", help="train a stage (vq | pretrain | vqa | classify | detect) from a YAML config; resumes")
    p.add_argument("config", help="YAML config, e.g. configs/vq/shapes.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func="mm.train.trainer:cli_train")

    _add_model_commands(sub)
    _add_eval(sub)
    return parser


def _resolve(target: str):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


# An error is one line even when it quotes user input with line breaks (an override "a\rb", a
# file name with a newline): the characters str.splitlines() breaks on are printed escaped.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args.func)(args) or 0)
    except MMError as e:
        print(f"mm: error: {str(e).translate(_LINE_BREAKS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mm data inspect … | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
