"""How much does a VQA model's answer depend on the question? A probe on shapes val images.

    python scripts/vqa_question_probe.py --run RUN [--images 200]

RUN is a VQA run folder (``RUN/final`` and ``RUN/answer_vocab.json``) of a 32-px shapes model.
For each image it asks "Are there any {colour} shapes?" for the 6 colours and "Is there a {shape}
in the image?" for the 4 shapes, and prints per family: accuracy against the scene, how often the
answer is "yes", and the *spread* — the std of the fused states (or the text states, or each
backbone block's cross-attention output) across the questions of the family, over their overall
std. A model that reads the question has a spread well above 0; one that answers from the image
and the answer prior alone has a spread near 0 (text: the masked mean of the encoder states) and one answer for every question.
"""

from __future__ import annotations

import argparse
import io

import torch
from PIL import Image

from mm.data.shapes import COLORS, SHAPES, make_sample
from mm.data.tokenizer import load_tokenizer
from mm.generation import vqa as gen
from mm.models.model import MMModel

FAMILIES = (("any colour", COLORS, "Are there any {} shapes?", "color"),
            ("shape present", SHAPES, "Is there a {} in the image?", "shape"))


def spread(xs: list[torch.Tensor]) -> float:
    """std across the questions (dim 0 of the stack), averaged, over the overall std."""
    x = torch.stack(xs).float()
    overall = float(x.std())
    return float(x.std(0).mean()) / overall if overall > 0 else 0.0  # all zeros: nothing moves


@torch.no_grad()
def probe(run: str, images: int) -> None:
    model = MMModel.from_pretrained(f"{run}/final").eval()
    tok = load_tokenizer(f"{run}/final/tokenizer")
    answers = gen.read_answer_vocab(f"{run}/answer_vocab.json")["answers"]
    samples = [make_sample(0, "val", i, model.config.image_size) for i in range(images)]
    pixels = gen.images_to_tensor([Image.open(io.BytesIO(s["png"])) for s in samples], model.config.image_size)
    cross: list[torch.Tensor] = []
    hooks = [b.cross.register_forward_hook(lambda mod, i, out: cross.append(out)) for b in model.backbone.blocks]
    for name, values, template, key in FAMILIES:
        fused, text, per_block, hits, yes = [], [], [], 0, 0
        for value in values:
            ids, mask = tok.encode([template.format(value)] * len(samples), model.config.text_max_len)
            cross.clear()
            f, states, smask = gen.question_and_fused(model, pixels, ids, mask)  # (B, Li, D), (B, Lt, D)
            fused.append(f)
            m = smask[..., None].to(states.dtype)
            text.append((states * m).sum(1) / m.sum(1))  # (B, D): lengths differ between questions
            per_block.append(list(cross))
            for i, s in zip(model.vqa_logits(f, states, smask).argmax(1).tolist(), samples):
                truth = "yes" if value in [o[key] for o in s["json"]["objects"]] else "no"
                hits, yes = hits + (answers[i] == truth), yes + (answers[i] == "yes")
        n = len(values) * len(samples)
        blocks = ", ".join(f"{spread([b[k] for b in per_block]):.3f}" for k in range(len(per_block[0])))
        print(f"{name}: accuracy {100 * hits / n:.1f} %, answers yes {100 * yes / n:.1f} %; spread across "
              f"questions: fused {spread(fused):.3f}, text {spread(text):.3f}, cross-attention by block {blocks}")
    for h in hooks:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="VQA run folder (with final/ and answer_vocab.json)")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    probe(args.run, args.images)


if __name__ == "__main__":
    main()
