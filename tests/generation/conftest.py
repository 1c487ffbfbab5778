"""Generation fixtures: a tiny exported model folder with random weights (also used by tests/eval)."""

import pytest
import torch

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a yellow diamond",
            "three purple circles", "a cyan square in the top left"] * 4


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    """An exported folder with random weights: debug MMModel + tiny VQ + a BPE tokenizer."""
    from mm.data.tokenizer import load_tokenizer, train_tokenizer
    from mm.models.presets import create_model
    from mm.models.vq import VQTokenizer, VQTokenizerConfig

    out = tmp_path_factory.mktemp("bundle")
    train_tokenizer(CAPTIONS, 300, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    torch.manual_seed(0)
    model = create_model("debug", vocab_size=tok.vocab_size)  # 16 px images, 4x4 codes, K = 32
    with torch.no_grad():
        model.t2i_head.weight.mul_(40)  # peaky logits: prompts and guidance visibly matter
        for blk in model.backbone.blocks:
            blk.cross.out.weight.mul_(30)
    model.save_pretrained(out)
    vq = VQTokenizer(VQTokenizerConfig(codebook_size=32, code_dim=4, downsample=4, channels=8,
                                       channel_mult=[1, 1, 1], mid_attention=False, image_size=16))
    vq.save_pretrained(out / "vq")
    return out
