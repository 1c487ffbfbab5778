"""The T2I plan (model.t2i_plan): a t×t colour thumbnail drawn before the codes.

Plan tokens from images, their grid positions, cached decoding and sampling against a naive
reference, the loss and the probe with a plan, save/load, clear errors, and a tiny overfit.
"""

from collections import Counter

import pytest
import torch

from mm.errors import MMError
from mm.eval.t2i_probe import (
    code_log_likelihood,
    continue_codes,
    log_likelihood_parts,
    probe_images,
    prompt_variants,
    summary,
)
from mm.generation.sampler import SamplingParams, sample_codes, sample_codes_uncached, seeds_tensor
from mm.generation.sjd import sample_codes_sjd
from mm.models.backbone import PLAN_LEVELS, PLAN_VOCAB, plan_tokens, sequence_positions
from mm.models.model import MMModel
from mm.models.presets import create_model
from mm.tasks import objectives as obj

K = 32


def plan_model(sides=3, **kw):
    torch.manual_seed(0)
    return create_model("debug", code_grid=[6, 6], codebook_size=K, image_size=24, t2i_plan=sides,
                        image_pos="both", cross_pos=True, **kw).eval()


SIDES = [3, [2, 3]]  # one plan, and a coarse-to-fine one (2x2 then 3x3)


def prompt(model, b=2):
    ids = torch.randint(0, model.config.vocab_size, (b, 7))
    mask = torch.arange(7)[None] < torch.tensor([7, 4] * (b // 2) + [7] * (b % 2))[:, None]
    return model.encode_prompt(ids, mask)


def unplan(token: int) -> tuple[int, int, int]:
    return token // PLAN_LEVELS**2, token // PLAN_LEVELS % PLAN_LEVELS, token % PLAN_LEVELS


def test_plan_tokens_are_block_mean_colours():
    img = torch.full((1, 3, 24, 24), -0.5)  # grey: level (−0.5 + 1)·4 = 2 in every channel
    img[0, :, 0:8, 16:24] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red top-right block
    img[0, :, 18:22, 2:6] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]  # a small blue square, bottom left
    plan = plan_tokens(img, 3)[0]
    assert plan.shape == (3, 3) and int(plan.max()) < PLAN_VOCAB
    assert unplan(int(plan[1, 1])) == (2, 2, 2)  # empty grey cell
    assert unplan(int(plan[0, 2])) == (7, 0, 0)  # all red
    r, g, b = unplan(int(plan[2, 0]))  # a quarter blue: the mean moves toward blue, off the grey diagonal
    assert b > r and b > g
    grey = plan_tokens(img[:, :1], 3)  # one-channel images repeat their channel
    assert all(len(set(unplan(int(t)))) == 1 for t in grey.flatten())
    with pytest.raises(MMError, match="divide"):
        plan_tokens(img, 5)


def test_plan_cells_sit_at_the_middle_of_their_code_blocks():
    pos = sequence_positions((6, 6), 3)
    assert pos[:9].tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]  # (2r+1, 2c+1) on the 6x6 grid
    assert pos[9:].tolist() == list(range(36))
    assert sequence_positions((6, 6), 0).tolist() == list(range(36))
    with pytest.raises(MMError, match="divide"):
        sequence_positions((6, 6), 4)


def test_coarse_to_fine_plans_concatenate_levels_with_ids_of_their_own():
    images = torch.rand(2, 3, 24, 24) * 2 - 1
    plan = plan_tokens(images, (2, 3))
    assert plan.shape == (2, 13)
    assert torch.equal(plan, torch.cat([plan_tokens(images, 2).flatten(1), plan_tokens(images, 3).flatten(1)], 1))
    pos = sequence_positions((6, 6), (2, 3))
    assert pos[:4].tolist() == [7, 10, 25, 28]  # 2x2 blocks of 3x3 codes: middle (3r+1, 3c+1)
    assert pos[4:13].tolist() == sequence_positions((6, 6), 3)[:9].tolist() and pos[13:].tolist() == list(range(36))
    model = plan_model([2, 3])
    embed = model.code_embed
    assert embed.plan == (2, 3) and embed.plan_len == 13 and embed.emb.num_embeddings == K + 1 + 2 * PLAN_VOCAB
    ids = embed.inputs(torch.zeros(2, 6, 6, dtype=torch.long), torch.zeros(2, 13, dtype=torch.long))
    # level 0's token v is K + 1 + v, level 1's K + 1 + PLAN_VOCAB + v: the same colour, a different id
    assert ids[0, 1:5].tolist() == [K + 1] * 4 and ids[0, 5:14].tolist() == [K + 1 + PLAN_VOCAB] * 9
    assert int(embed.plan_id(torch.tensor([5]), 4)) == K + 1 + PLAN_VOCAB + 5
    with pytest.raises(MMError, match="13"):
        embed.inputs(torch.zeros(2, 6, 6, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long))


@pytest.mark.parametrize("sides", SIDES)
def test_cached_decoding_equals_the_full_forward_with_a_plan(sides):
    model = plan_model(sides)
    p = model.code_embed.plan_len
    states, mask = prompt(model)
    codes = torch.randint(0, K, (2, 6, 6))
    plan = model.t2i_plan_tokens(torch.rand(2, 3, 24, 24) * 2 - 1)
    with torch.no_grad():
        hidden = model.t2i_states(codes, states, mask, plan)  # (2, P + 36, D)
        ref_plan, ref_codes = model.plan_logits(hidden[:, :p]), model.code_logits(hidden[:, p:])
        torch.testing.assert_close(model.t2i_logits(codes, states, mask, plan), ref_codes)
        seq = torch.cat([plan.flatten(1) + model.code_embed.plan_ids, codes.flatten(1)], 1)
        logits, state = model.t2i_prefill(states, mask)
        steps = [logits]
        for n in range(1, p + 36):
            steps.append(model.t2i_step(seq[:, n - 1], state, plan=n < p))
    torch.testing.assert_close(torch.stack(steps[:p], 1), ref_plan, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps[p:], 1), ref_codes, atol=1e-5, rtol=1e-5)


def greedy_reference(model, states, mask, guidance: float) -> torch.Tensor:
    """Greedy plan then codes with CFG, recomputing the whole sequence every step (no cache)."""
    b, p = states.shape[0], model.code_embed.plan_len
    plan, codes = torch.zeros(b, p, dtype=torch.long), torch.zeros(b, 6, 6, dtype=torch.long)
    null, nmask = model.null_context(b, states.shape[1])
    for n in range(p + 36):
        cond = model.t2i_states(codes, states, mask, plan)[:, n]
        uncond = model.t2i_states(codes, null, nmask, plan)[:, n]
        head = model.plan_logits if n < p else model.code_logits
        guided = head(cond) + (guidance - 1) * (head(cond) - head(uncond))
        target = plan if n < p else codes
        target.view(b, -1)[:, n if n < p else n - p] = guided.argmax(-1)
    return codes


@pytest.mark.parametrize("sides", SIDES)
def test_greedy_sampling_with_a_plan_equals_the_uncached_reference(sides):
    model = plan_model(sides)
    states, mask = prompt(model)
    with torch.no_grad():
        got = sample_codes(model, (states, mask), seeds_tensor(0, 2), SamplingParams(guidance_scale=2.0, top_k=1))
        ref = greedy_reference(model, states, mask, 2.0)
    assert got.shape == (2, 6, 6) and int(got.max()) < K
    assert torch.equal(got, ref)


def test_plan_loss_save_load_and_errors(tmp_path):
    model = plan_model()
    states, mask = prompt(model)
    codes = torch.randint(0, K, (2, 6, 6))
    plan = model.t2i_plan_tokens(torch.rand(2, 3, 24, 24) * 2 - 1)
    _, metrics, correct = obj.t2i_loss(model, codes, states, mask, plan=plan)
    assert correct.shape == (2, 36) and metrics["t2i_plan"].requires_grad
    hidden = model.t2i_states(codes, states, mask, plan)
    manual = torch.nn.functional.cross_entropy(model.plan_logits(hidden[:, :9]).flatten(0, 1), plan.flatten())
    torch.testing.assert_close(metrics["t2i_plan"], manual)
    model.save_pretrained(tmp_path)
    back = MMModel.from_pretrained(tmp_path)
    assert back.config.t2i_plan == 3
    torch.testing.assert_close(back.t2i_logits(codes, states, mask, plan), model.t2i_logits(codes, states, mask, plan))
    with pytest.raises(MMError, match="plan"):
        model.t2i_logits(codes, states, mask)  # a plan model needs its plan
    with pytest.raises(MMError, match="no plan"):
        create_model("debug", code_grid=[6, 6], codebook_size=K).t2i_logits(codes, None, None, plan)
    with pytest.raises(MMError, match="divide"):
        create_model("debug", code_grid=[6, 6], codebook_size=K, t2i_plan=4)
    for sampler in (sample_codes_uncached, sample_codes_sjd):
        with pytest.raises(MMError, match="plan"):
            sampler(model, (states, mask), seeds_tensor(0, 2), SamplingParams())
    with pytest.raises(MMError, match="plan"):
        continue_codes(model, codes, states, mask, rows=2)


def test_the_plan_loss_is_the_mean_over_all_levels_and_each_level_is_logged():
    model = plan_model([2, 3])
    states, mask = prompt(model)
    codes = torch.randint(0, K, (2, 6, 6))
    plan = model.t2i_plan_tokens(torch.rand(2, 3, 24, 24) * 2 - 1)  # (2, 4 + 9)
    _, metrics, _ = obj.t2i_loss(model, codes, states, mask, plan=plan)
    logits = model.plan_logits(model.t2i_states(codes, states, mask, plan)[:, :13])
    coarse = torch.nn.functional.cross_entropy(logits[:, :4].flatten(0, 1), plan[:, :4].flatten())
    fine = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), plan[:, 4:].flatten())
    torch.testing.assert_close(metrics["t2i_plan"], (4 * coarse + 9 * fine) / 13)  # per plan token
    assert metrics["t2i_plan2"] == pytest.approx(float(coarse)) and metrics["t2i_plan3"] == pytest.approx(float(fine))


@pytest.mark.parametrize("sides", SIDES)
def test_probe_likelihood_counts_the_plan(sides):
    model = plan_model(sides)
    p = model.code_embed.plan_len

    class Tok:
        def encode(self, prompts, length):
            ids = torch.stack([torch.arange(length) * (i + 3) % 100 for i in range(len(prompts))])
            return ids, torch.ones_like(ids, dtype=torch.bool)

    codes = torch.randint(0, K, (6, 6))
    plan = torch.randint(0, PLAN_VOCAB, (3, 3) if sides == 3 else (p,))
    with torch.no_grad():
        ll = code_log_likelihood(model, Tok(), codes, ["a", "b"], plan)
        states, mask = model.encode_prompt(*Tok().encode(["a", "b"], model.config.text_max_len))
        hidden = model.t2i_states(codes.expand(2, -1, -1), states, mask, plan.expand(2, *plan.shape))
        lp_code = model.code_logits(hidden[:, p:]).log_softmax(-1).gather(-1, codes.flatten().expand(2, -1)[..., None])
        lp_plan = model.plan_logits(hidden[:, :p]).log_softmax(-1).gather(-1, plan.flatten().expand(2, -1)[..., None])
    torch.testing.assert_close(ll, lp_code.sum((1, 2)) + lp_plan.sum((1, 2)), atol=1e-4, rtol=1e-5)
    # each part on its own: the codes, and every plan level (2x2 then 3x3 tokens in order)
    parts = log_likelihood_parts(model, Tok(), codes, ["a", "b"], plan)
    sides = [sides] if isinstance(sides, int) else sides
    assert list(parts) == ["codes", *[f"plan{t}" for t in sides]]
    torch.testing.assert_close(parts["codes"], lp_code.sum((1, 2)), atol=1e-4, rtol=1e-5)
    levels = lp_plan.squeeze(-1).split([t * t for t in sides], dim=1)
    for t, level in zip(sides, levels):
        torch.testing.assert_close(parts[f"plan{t}"], level.sum(1), atol=1e-4, rtol=1e-5)

    # the probe counts each part too: every total equals the whole's, hits are per part
    meta = {"objects": [{"color": "red", "shape": "circle", "cell": "center", "size": "large",
                         "bbox": [8, 8, 16, 16]}], "width": 24, "height": 24}
    hits, totals = Counter(), Counter()
    probe_images(model, Tok(), codes[None], [meta], hits, totals, plan[None])
    found = summary(hits, totals)
    assert sorted(found["by_part"]) == ["cell", "colour", "count", "shape"]
    assert sorted(found["by_part"]["cell"]) == sorted(["codes", *[f"plan{t}" for t in sides]])
    assert all(totals[f"cell@{p}"] == totals["cell"] == 1 for p in found["by_part"]["cell"])
    true, others = prompt_variants(meta["objects"])["cell"]
    for part, ll in log_likelihood_parts(model, Tok(), codes, [true, *others], plan).items():
        assert hits[f"cell@{part}"] == int(bool(ll[0] > ll[1:].max())), part


def test_a_tiny_plan_model_learns_where_to_draw():
    """Two prompts, two layouts (a red block top left / bottom right on grey): after a short overfit,
    greedy sampling draws each prompt's plan and codes."""
    model = plan_model().train()
    images = torch.full((2, 3, 24, 24), -0.5)
    images[0, :, 0:8, 0:8] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    images[1, :, 16:24, 16:24] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    plan = plan_tokens(images, 3)
    codes = torch.zeros(2, 6, 6, dtype=torch.long)
    codes[0, :2, :2] = 5
    codes[1, 4:, 4:] = 5
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        states, smask = model.encode_prompt(ids, mask)
        loss, metrics, _ = obj.t2i_loss(model, codes, states, smask, plan=plan)
        total = loss + metrics["t2i_plan"]
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(metrics["t2i_plan"].detach()) < 0.05 and float(loss.detach()) < 0.05
    model.eval()
    with torch.no_grad():
        got = sample_codes(model, model.encode_prompt(ids, mask), seeds_tensor(0, 2), SamplingParams(guidance_scale=1.0,
                                                                                                     top_k=1))
    assert torch.equal(got, codes)


@pytest.mark.parametrize("bad", [-3, [6, 3], [3, 3], [0, 3], "3", [2.5]])
def test_a_bad_plan_is_a_one_line_error(bad):
    with pytest.raises(MMError, match="t2i_plan"):
        create_model("debug", code_grid=[6, 6], t2i_plan=bad)


def test_the_run_config_takes_one_side_or_a_list():
    from mm.config import Config, apply_overrides
    from mm.models.presets import model_from_config

    for text, sides in (("3", 3), ("[2,3]", [2, 3]), ("2,3", [2, 3]), ("0", 0)):
        cfg = apply_overrides(Config(), [f"model.t2i_plan={text}", "model.preset=debug"])
        model = model_from_config(cfg.model, 100, K, (6, 6), 24)
        assert model.config.t2i_plan == sides  # one side is saved as the plain integer of older models


def test_plan_temperature_acts_on_the_plan_tokens_only():
    """A near-zero plan temperature draws the greedy plan (as top-k 1 everywhere does) while the codes are
    still sampled; plan temperature 1 is the default run bit for bit."""
    model = plan_model([2, 3])
    p = model.code_embed.plan_len
    states, mask = prompt(model)
    seeds = seeds_tensor(7, 2)
    real_step = model.t2i_step

    def run(params):
        fed = []

        def spy(codes, state, plan=False):
            fed.append(codes.clone())
            return real_step(codes, state, plan)

        model.t2i_step = spy
        try:
            with torch.no_grad():
                codes = sample_codes(model, (states, mask), seeds, params)
        finally:
            del model.t2i_step
        ids = torch.stack(fed, 1)  # (2, P + N - 1): what each step was fed; the first P are the plan
        return ids[:, :p], codes

    base_plan, base = run(SamplingParams(guidance_scale=2.0))
    one_plan, one = run(SamplingParams(guidance_scale=2.0, plan_temperature=1.0))
    cold_plan, cold = run(SamplingParams(guidance_scale=2.0, plan_temperature=1e-4))
    greedy_plan, greedy = run(SamplingParams(guidance_scale=2.0, top_k=1))
    assert torch.equal(one_plan, base_plan) and torch.equal(one, base)
    assert torch.equal(cold_plan, greedy_plan) and not torch.equal(cold, greedy)  # codes still sampled
    assert not torch.equal(base_plan, greedy_plan)  # at temperature 1 this seed leaves the greedy plan
    assert int(cold_plan.min()) > K  # fed as plan ids (level offsets added)
    assert SamplingParams(temperature=0.7).for_plan().temperature == 0.7
    with pytest.raises(MMError, match="plan temperature"):
        SamplingParams(plan_temperature=0.0).check()
