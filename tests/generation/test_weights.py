"""Decode weights (bf16, int8 weight-only) and the pipeline's decode options (SJD, batch cap)."""

import pytest
import torch
from PIL import Image

from mm.cli import main
from mm.errors import MMError
from mm.generation.pipeline import TextToImagePipeline
from mm.generation.weights import Fp32Head, Int8Linear, decode_weights, weight_bytes
from mm.models.presets import create_model


@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, the dequantising path
def test_int8_linear_is_per_channel_symmetric(in_features):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, 24)
    with torch.no_grad():
        lin.weight[3].mul_(100)  # one large row must not cost the others their precision
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (24,)
    deq = q.weight.float() * q.scale.float()[:, None]
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((deq - lin.weight).abs() <= 0.51 * step).all()  # at most half a quantisation step
    x = torch.randn(5, 3, in_features)
    ref = (x.bfloat16().float() @ deq.t() + lin.bias.bfloat16().float())
    assert torch.allclose(q(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_decode_weights_keep_the_fp32_model_and_shrink_the_bytes():
    torch.manual_seed(0)
    model = create_model("debug").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16, int8 = decode_weights(model, "bf16"), decode_weights(model, "int8")
    assert decode_weights(model, "fp32") is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(int8.backbone.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(int8.t2i_head, Fp32Head) and int8.t2i_head.linear.weight.dtype == torch.float32
    b32, b16, b8 = weight_bytes(model), weight_bytes(bf16), weight_bytes(int8)
    assert b16 < 0.6 * b32 and b8 < 0.6 * b16
    codes = torch.randint(0, 32, (2, 4, 4))
    text = model.encode_text(torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.bool))
    with torch.no_grad():
        ref = model.t2i_logits(codes, *text)
        for m in (bf16, int8):
            out = m.t2i_logits(codes, text[0].to(torch.bfloat16), text[1]).float()
            assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(MMError, match="decode weights must be one of"):
        decode_weights(model, "fp8")


@pytest.fixture()
def pipe(bundle_dir):
    return TextToImagePipeline.from_pretrained(bundle_dir, device="cpu")


def test_batch_cap_does_not_change_images(pipe):
    kwargs = {"num_images_per_prompt": 3, "guidance_scale": 3.0, "top_k": 8, "seed": 2}
    whole = pipe.generate_codes(["a red circle", "two blue squares"], **kwargs)
    stats = []
    pipe.configure(max_batch=4)
    split = pipe.generate_codes(["a red circle", "two blue squares"], stats=stats, **kwargs)
    assert torch.equal(whole, split) and [s["images"] for s in stats] == [4, 2]


def test_pipeline_sjd_greedy_equals_plain_and_counts_forwards(pipe):
    greedy = {"top_k": 1, "seed": 0, "guidance_scale": 3.0}  # strong guidance: a repetitive greedy image
    plain = pipe.generate_codes(["a green triangle"], 2, **greedy)
    stats = []
    sjd = pipe.generate_codes(["a green triangle"], 2, decode="sjd", sjd_window=8, stats=stats, **greedy)
    assert torch.equal(plain, sjd) and stats[0]["forwards"] < 16


def test_pipeline_weights_switch_and_save_fp32(pipe, tmp_path):
    plain = pipe.generate_codes(["a red circle"], 2, seed=1)
    pipe.configure(weights="int8")
    assert isinstance(pipe.model.backbone.blocks[0].mlp.fc, Int8Linear) and isinstance(pipe.model.t2i_head, Fp32Head)
    assert pipe.generate_codes(["a red circle"], 2, seed=1).shape == plain.shape
    pipe.save_pretrained(tmp_path / "copy")  # the fp32 weights, loadable as ever
    again = TextToImagePipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert torch.equal(again.generate_codes(["a red circle"], 2, seed=1), plain)
    pipe.configure(weights="fp32")
    assert torch.equal(pipe.generate_codes(["a red circle"], 2, seed=1), plain)
    with pytest.raises(MMError, match="weights must be one of"):
        pipe.configure(weights="int4")
    with pytest.raises(MMError, match="decode must be one of"):
        pipe.configure(decode="beam")


@pytest.mark.parametrize("extra", [["--decode", "sjd", "--sjd-window", "4"], ["--weights", "bf16"],
                                   ["--weights", "int8", "--decode", "sjd", "--max-batch", "1"]])
def test_generate_cli_decode_options(bundle_dir, tmp_path, capsys, extra):
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", str(bundle_dir), "--prompt", "a red circle", "--num-images", "2",
                 "--out", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).width >= 2 * 128


def test_generate_cli_bad_window_is_one_line(bundle_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(bundle_dir), "--prompt", "a", "--decode", "sjd", "--sjd-window", "0",
                 "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code != 0 and "--sjd-window" in err and "Traceback" not in err
