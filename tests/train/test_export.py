"""Hugging Face interop: a training run's checkpoint → `mm export RUN --out DIR` → from_pretrained.

A tiny pretraining run (configs/pretrain/shapes.yaml with the debug preset, 32 px, 8-px patches,
a tiny VQ with a 4×4 code grid, a BPE trained by the run) is trained in this process, then
exported from its newest checkpoint with the `mm export` command. The exported folder must give
exactly what the trainer's in-memory model gives — logits bit for bit and the same sampled codes
for the same seeds — through MMModel.from_pretrained and TextToImagePipeline.from_pretrained,
hold nothing pickled, and survive a pipeline save_pretrained round trip.
"""

import pytest
import torch
from safetensors.torch import load_file

from mm.cli import main
from mm.config import load_config
from mm.train.trainer import Trainer

from .conftest import ROOT

STEPS = 2
PROMPTS = ["a red circle", "two blue squares"]


def make_tiny_vq(path):
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    torch.manual_seed(0)
    cfg = VQTokenizerConfig(codebook_size=32, code_dim=4, downsample=8, channels=8, channel_mult=[1, 1, 1, 1],
                            image_size=32, mid_attention=False)  # 32 px -> a 4x4 code grid
    VQTokenizer(cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    vq, run, out = root / "vq", root / "run", root / "exported"
    make_tiny_vq(vq)
    overrides = {
        "run.dir": run, "vq.path": vq, "model.preset": "debug", "model.patch_size": 8,
        "data.image_size": 32, "data.text_max_len": 16, "data.vocab_size": 300,
        "data.shapes_cache": root / "shapes", "data.shapes_train": 64, "data.shapes_val": 16,
        "data.val_samples": 8, "data.shuffle_buffer": 16, "train.batch_size": 4, "train.max_steps": STEPS,
        "train.warmup_steps": 1, "train.checkpoint_every": 0, "train.eval_every": 0, "log.every": 1,
    }
    trainer = Trainer(load_config(ROOT / "configs" / "pretrain" / "shapes.yaml",
                                  [f"{k}={v}" for k, v in overrides.items()]))
    assert trainer.fit()["step"] == STEPS
    assert main(["export", str(run), "--out", str(out)]) == 0
    task = trainer.task  # the in-memory model, tokenizer and VQ the run trained with
    return run, out, (task.model.eval(), task.tokenizer, task.vq(torch.device("cpu")))


def batch(tokenizer, n=4):
    from mm.data.shapes import make_sample
    from mm.data.transforms import load_image, to_tensor

    samples = [make_sample(0, "val", i, 32) for i in range(n)]
    images = to_tensor([load_image(s["png"], 32) for s in samples])
    ids, mask = tokenizer.encode([s["txt"] for s in samples], 16)
    return images, ids, mask


@torch.no_grad()
def outputs(model, images, ids, mask):
    """Every head's output on one batch (codes from the VQ are fixed inputs)."""
    codes = torch.randint(0, model.config.codebook_size, (images.shape[0], *model.config.code_grid),
                          generator=torch.Generator().manual_seed(0))
    states, smask = model.encode_text(ids, mask)
    image_states = model.image_states(images)
    fused = model.fuse(images, states, smask)
    return {"text_emb": model.pool_text(states, smask), "image_emb": model.pool_image(image_states),
            "itm": model.itm_logits(fused), "caption": model.caption_logits(image_states, ids, mask),
            "t2i": model.t2i_logits(codes, states, smask), "t2i_uncond": model.t2i_logits(codes, None, None)}


def test_exported_folder_has_no_pickle(exported):
    _, out, _ = exported
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"config.json", "model.safetensors", "vq/config.json", "vq/model.safetensors"} <= names
    assert any(n.startswith("tokenizer/") for n in names)
    for p in files:
        assert p.suffix in (".json", ".safetensors", ".txt"), f"unexpected file {p.name}"
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p.name} looks like a pickle / torch.save archive"


def test_export_keeps_every_weight_bitwise(exported):
    run, out, _ = exported
    saved = load_file(str(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert saved.keys() == written.keys()
    for k in saved:
        assert torch.equal(saved[k], written[k]), k
    # The trainer's own final/ (exported from memory at the end of the run) is the same model.
    final = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], written[k]) for k in written)


def test_from_pretrained_gives_identical_logits(exported):
    from mm.data.tokenizer import load_tokenizer
    from mm.models.bundle import load_bundle
    from mm.models.model import MMModel

    _, out, (ref_model, ref_tok, ref_vq) = exported
    model = MMModel.from_pretrained(out)
    assert model.config == ref_model.config
    tok_dir = load_bundle(out)[1]
    tokenizer = load_tokenizer(tok_dir)
    assert tokenizer.vocab_size == ref_tok.vocab_size
    images, ids, mask = batch(ref_tok)
    assert torch.equal(tokenizer.encode(PROMPTS, 16)[0], ref_tok.encode(PROMPTS, 16)[0])
    ref, got = outputs(ref_model, images, ids, mask), outputs(model, images, ids, mask)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after export"
    _, _, vq = load_bundle(out)
    with torch.no_grad():
        assert torch.equal(vq.encode(images), ref_vq.encode(images))
        codes = ref_vq.encode(images)
        assert torch.equal(vq.decode(codes), ref_vq.decode(codes))


def test_pipeline_from_pretrained_samples_identical_codes(exported, tmp_path):
    from mm.generation.pipeline import TextToImagePipeline

    _, out, (ref_model, ref_tok, ref_vq) = exported
    reference = TextToImagePipeline(ref_model, ref_vq, ref_tok, device="cpu")
    loaded = TextToImagePipeline.from_pretrained(out, device="cpu")
    kwargs = {"num_images_per_prompt": 2, "guidance_scale": 3.0, "top_k": 8, "temperature": 1.0, "seed": 7}
    codes = reference.generate_codes(PROMPTS, **kwargs)
    assert codes.shape == (4, 4, 4)
    assert torch.equal(loaded.generate_codes(PROMPTS, **kwargs), codes)
    assert torch.equal(loaded(PROMPTS, output_type="pt", **kwargs), reference(PROMPTS, output_type="pt", **kwargs))
    assert not torch.equal(loaded.generate_codes(PROMPTS, **{**kwargs, "seed": 8}), codes)  # the seed matters

    loaded.save_pretrained(tmp_path / "again")  # pipeline round trip: same layout, same samples
    again = TextToImagePipeline.from_pretrained(tmp_path / "again", device="cpu")
    assert torch.equal(again.generate_codes(PROMPTS, **kwargs), codes)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm: error:") and "not a run folder" in err and "\n" not in err
