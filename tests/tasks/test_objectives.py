"""The pretraining objectives: ITC against explicit loops, hard-negative sampling rules, CFG
dropout, KV-cached T2I logits, and each objective's loss falling on a tiny overfit."""

import math

import pytest
import torch
import torch.nn.functional as F

from mm.tasks import objectives as obj
from mm.tasks.pretrain import PretrainTask

from .pretrain_util import make_batch, tiny_config


def naive_itc(img, txt, scale):
    """InfoNCE both ways with explicit Python loops over rows and columns."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]  # image i against every text
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]  # text i against every image
        lse_r = math.log(sum(math.exp(v) for v in row))
        lse_c = math.log(sum(math.exp(v) for v in col))
        total += 0.5 * ((lse_r - row[i]) + (lse_c - col[i]))
    return total / n


def test_itc_loss_equals_naive_reference():
    img = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    loss, _, logits_i2t, logits_t2i = obj.itc_loss(img, txt, torch.tensor(7.5))
    assert loss.item() == pytest.approx(naive_itc(img, txt, 7.5), rel=1e-5)
    assert logits_i2t.shape == logits_t2i.shape == (6, 6)
    assert torch.allclose(logits_i2t, logits_t2i.t())
    perfect = obj.itc_loss(img, img, torch.tensor(100.0))[1]["itc_acc"]
    assert perfect == 1.0


def test_same_text_marks_identical_token_sequences():
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 5, 6, 2, 0], [1, 5, 7, 2, 0]])
    mask = ids != 0
    mask[1, 4] = False
    same = obj.same_text(ids, mask, ids, mask)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_hard_negatives_never_pick_the_positive_nor_an_identical_caption():
    torch.manual_seed(1)
    captions = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])  # caption ids: duplicates must be excluded
    excluded = captions[:, None] == captions[None, :]  # (B, G), includes the diagonal
    logits = torch.randn(8, 8) * 5
    logits.fill_diagonal_(50.0)  # the positive is by far the most similar: still never drawn
    logits[1, 2] = 40.0  # identical caption: likewise
    for _ in range(200):
        for hard in (True, False):
            idx = obj.sample_negatives(logits, excluded, hard)
            assert (idx >= 0).all()
            assert not excluded[torch.arange(8), idx].any()


def test_hard_negatives_follow_the_softmax_of_allowed_columns():
    torch.manual_seed(0)
    logits = torch.tensor([[9.0, 1.0, 0.0, math.log(3.0)]]).repeat(4000, 1)
    excluded = torch.tensor([[True, False, False, False]]).repeat(4000, 1)
    idx = obj.sample_negatives(logits, excluded)
    freq = torch.bincount(idx, minlength=4).float() / len(idx)
    p = torch.softmax(torch.tensor([1.0, 0.0, math.log(3.0)]), 0)
    assert freq[0] == 0
    assert torch.allclose(freq[1:], p, atol=0.03)


def test_rows_without_any_allowed_negative_give_minus_one():
    excluded = torch.ones(3, 3, dtype=torch.bool)
    excluded[2, 0] = False
    idx = obj.sample_negatives(torch.randn(3, 3), excluded)
    assert idx.tolist() == [-1, -1, 0]


def test_itm_pairs_are_positives_then_negatives_with_correct_labels():
    torch.manual_seed(0)
    b, length = 6, 5
    caption = torch.tensor([0, 1, 2, 2, 3, 4])  # samples 2 and 3 share a caption
    ids = torch.stack([torch.full((length,), int(c) + 10) for c in caption])
    mask = torch.ones(b, length, dtype=torch.bool)
    images = torch.arange(b, dtype=torch.float).view(b, 1, 1, 1).expand(b, 3, 2, 2)  # pixel value = sample id
    states = torch.arange(b, dtype=torch.float).view(b, 1, 1).expand(b, length, 4)  # state value = sample id
    logits = torch.randn(b, b)
    for _ in range(20):
        imgs, sts, _, labels = obj.itm_pairs(images, states, mask, ids, mask, logits, logits.t())
        assert len(labels) == 3 * b and labels[:b].eq(1).all() and labels[b:].eq(0).all()
        img_id, txt_id = imgs[:, 0, 0, 0].long(), sts[:, 0, 0].long()
        assert torch.equal(img_id[:b], txt_id[:b])  # positives are the batch's own pairs
        assert (caption[img_id[b:]] != caption[txt_id[b:]]).all()  # negatives never share a caption
        assert torch.equal(img_id[b:2 * b], torch.arange(b))  # one negative text per image
        assert torch.equal(txt_id[2 * b:], torch.arange(b))  # one negative image per text


def test_cfg_dropout_uses_the_global_rng_and_the_null_context(tmp_path):
    task = PretrainTask(tiny_config(tmp_path))
    m = task.model
    states, mask = torch.randn(5, 7, 32), torch.ones(5, 7, dtype=torch.bool)
    mask[:, 5:] = False
    s0, m0, d0 = obj.cfg_drop(m, states, mask, 0.0)
    assert not d0.any() and torch.equal(s0, states) and torch.equal(m0, mask)
    s1, m1, d1 = obj.cfg_drop(m, states, mask, 1.0)
    null_states, null_mask = m.null_context(5, 7)
    assert d1.all() and torch.equal(s1, null_states) and torch.equal(m1, null_mask)
    torch.manual_seed(3)
    _, _, dropped = obj.cfg_drop(m, states, mask, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropped, torch.rand(5) < 0.5)  # draws come from torch's global RNG


def test_t2i_logits_with_kv_cache_equal_full_forward(tmp_path):
    task = PretrainTask(tiny_config(tmp_path))
    m = task.model.eval()
    batch = make_batch(task.tokenizer, 3)
    with torch.no_grad():
        states, mask = m.encode_text(batch["input_ids"], batch["attention_mask"])
        codes = torch.randint(0, m.config.codebook_size, (3, *m.config.code_grid))
        full = m.t2i_logits(codes, states, mask)  # (B, N, K)
        for kind in ("static", "dynamic"):
            logits, state = m.t2i_prefill(states, mask, cache=kind)
            steps = [logits]
            flat = codes.flatten(1)
            for n in range(flat.shape[1] - 1):
                steps.append(m.t2i_step(flat[:, n], state))
            assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5), kind


def overfit(task, batch, steps=12, lr=3e-3):
    opt = torch.optim.AdamW(task.model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for step in range(steps):
        loss, metrics = task.loss(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history, metrics


@pytest.mark.parametrize("name", ["itc", "itm", "caption", "t2i"])
def test_each_objective_loss_falls_on_a_tiny_overfit(tmp_path, name):
    weights = {n: float(n == name) for n in ("itc", "itm", "caption", "t2i")}
    task = PretrainTask(tiny_config(tmp_path, **weights))
    batch = make_batch(task.tokenizer, 8, start=0)
    assert len(set(batch["caption"])) == 8  # distinct captions: ITC can reach a low loss
    if name == "t2i":
        task.cfg.objectives.cfg_dropout = 0.0
    history, metrics = overfit(task, batch, steps=20, lr=1e-2 if name in ("caption", "t2i") else 3e-3)
    assert {k for k in metrics if k.startswith("loss_")} == {f"loss_{name}"}  # others not computed
    if name == "itm":
        # 1 positive : 2 negatives. On the debug model the text's effect on the fused states starts
        # tiny, so within a few steps ITM only reaches the class prior H(1/3) = 0.637 (it needs ~60+
        # steps to go well below); the pairing itself is checked in the test above.
        late = sum(history[-5:]) / 5
        assert late < history[0] - 0.03 and late < 0.64, history
    else:
        assert history[-1] < 0.7 * history[0], history


def test_object_weights_cover_the_cells_under_each_box():
    metas = [{"objects": [{"bbox": [0, 0, 9, 9]}, {"bbox": [32, 17, 47, 32]}]}, {"objects": []}]
    w = obj.object_weights(metas, (12, 12), 48, 5.0).view(2, 12, 12)
    half = [{"image_size": 96, "objects": [{"bbox": [0, 0, 18, 18]}, {"bbox": [64, 34, 94, 64]}]}, {"objects": []}]
    assert torch.equal(obj.object_weights(half, (12, 12), 48, 5.0).view(2, 12, 12), w)  # boxes of a 96 px original
    expect = torch.ones(2, 12, 12)
    expect[0, 0:3, 0:3] = 5.0  # pixels 0..8 touch code rows/cols 0..2 (4 px per code)
    expect[0, 4:8, 8:12] = 5.0  # pixels 17..31 -> rows 4..7, 32..46 -> cols 8..11
    assert torch.equal(w, expect)
    assert obj.object_weights(metas, (12, 12), 48, 1.0) is None
    assert obj.object_weights([{"caption": "no boxes"}], (12, 12), 48, 5.0) is None


class FreeLogits(torch.nn.Module):
    """A stand-in T2I model whose calibrated code logits are free parameters z - log w (one row)."""

    def __init__(self, k: int, weights: torch.Tensor):
        super().__init__()
        self.config = type("C", (), {"t2i_code_weights": True})()
        self.z = torch.nn.Parameter(torch.zeros(k))
        self.register_buffer("t2i_log_weight", weights.log())

    def t2i_states(self, codes, states, mask, plan=None):
        return codes.new_zeros(codes.shape[0], codes[0].numel(), 1, dtype=torch.float)  # (B, N, 1)

    def code_logits(self, h):
        return h + self.z - self.t2i_log_weight  # (B, N, K)

    def t2i_logits(self, codes, states, mask):
        return self.code_logits(self.t2i_states(codes, states, mask))


def test_code_weighted_t2i_loss_trains_the_weighted_optimum_and_returns_calibrated_logits():
    """Weighted NLL (weights by target code) has optimum softmax(z) ∝ w·p; the logits the model
    returns, z - log w, then give p itself: extra weight on object codes must not inflate them."""
    k = 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    w = torch.tensor([1.0, 1.0, 10.0, 10.0, 3.0])
    model = FreeLogits(k, w)
    codes = torch.multinomial(p, 4000, replacement=True, generator=torch.Generator().manual_seed(0)).view(-1, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        loss, _, _ = obj.t2i_loss(model, codes, None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    freq = torch.bincount(codes.flatten(), minlength=k).float() / codes.numel()
    assert torch.allclose(model.z.softmax(0), freq * w / (freq * w).sum(), atol=2e-3)
    calibrated = model.t2i_logits(codes[:1], None, None)[0, 0].softmax(0)
    assert torch.allclose(calibrated, freq, atol=2e-3)
    # the loss itself: sum_y w_y CE(z, y) / sum_y w_y
    ce = -model.z.detach().log_softmax(0)[codes.flatten()]
    ww = w[codes.flatten()]
    assert obj.t2i_loss(model, codes, None, None)[0].item() == pytest.approx(float((ce * ww).sum() / ww.sum()), rel=1e-5)


def test_t2i_code_weights_are_computed_from_object_boxes_saved_and_used_by_sampling(tmp_path, shapes_shards):
    from mm.models.model import MMModel

    cfg = tiny_config(tmp_path, t2i_object_weight=6.0)
    cfg.data.train = [str(shapes_shards / "train")]  # 32 px images read at 16 px: boxes scale with them
    task = PretrainTask(cfg)
    m = task.model
    assert m.config.t2i_code_weights
    w = m.t2i_log_weight.exp()
    assert float(w.min()) >= 1.0 - 1e-6 and float(w.max()) <= 6.0 + 1e-5 and float(w.max()) > 2.0
    codes = torch.randint(0, m.config.codebook_size, (2, *m.config.code_grid))
    states, mask = m.null_context(2)
    x, rope, qpos = m.code_embed(m.code_embed.inputs(codes), torch.arange(codes[0].numel()))
    raw = m.t2i_head(m.backbone(x, rope, states, mask, causal=True, query_pos=qpos))
    assert torch.allclose(m.t2i_logits(codes, states, mask), raw - m.t2i_log_weight, atol=1e-5)
    logits, _ = m.t2i_prefill(states, mask)
    assert torch.allclose(logits, m.t2i_logits(codes, states, mask)[:, 0], atol=1e-5)
    m.save_pretrained(tmp_path / "saved")
    back = MMModel.from_pretrained(tmp_path / "saved")
    assert back.config.t2i_code_weights and torch.equal(back.t2i_log_weight, m.t2i_log_weight)
    from mm.generation.weights import decode_weights

    bf16 = decode_weights(back, "bf16")
    assert bf16.t2i_log_weight.dtype == torch.float32 and torch.equal(bf16.t2i_log_weight, m.t2i_log_weight)
    # a model without code weights has no buffer and plain logits
    plain = PretrainTask(tiny_config(tmp_path)).model
    assert not plain.config.t2i_code_weights and not hasattr(plain, "t2i_log_weight")


def test_t2i_plan_weights_are_computed_per_plan_token_trained_weighted_and_leave_calibrated_logits(tmp_path,
                                                                                                   shapes_shards):
    """objectives.t2i_plan_object_weight does for the plan's tokens what t2i_object_weight does for the
    codes: weights 1 + (w - 1)·f_v from the object boxes over every plan level, the weighted CE of the
    raw plan logits as the plan loss, logits minus log w everywhere else (sampling, saving, bf16)."""
    from mm.errors import MMError
    from mm.generation.weights import decode_weights
    from mm.models.model import MMModel

    cfg = tiny_config(tmp_path, t2i_plan_object_weight=6.0)
    cfg.model.t2i_plan = [2, 4]
    cfg.data.train = [str(shapes_shards / "train")]
    m = PretrainTask(cfg).model
    assert m.config.t2i_plan_weights and not m.config.t2i_code_weights  # the codes keep uniform weights
    w = m.t2i_plan_log_weight.exp()  # (V,)
    assert float(w.min()) >= 1.0 - 1e-6 and float(w.max()) <= 6.0 + 1e-5 and float(w.max()) > 2.0
    torch.manual_seed(0)
    codes = torch.randint(0, m.config.codebook_size, (3, *m.config.code_grid))
    plan = torch.randint(0, w.numel(), (3, 20))
    states, mask = m.null_context(3)
    _, mt, _ = obj.t2i_loss(m, codes, states, mask, plan=plan)
    hidden = m.t2i_states(codes, states, mask, plan)[:, :20]  # (B, P, D)
    raw = m.t2i_plan_head(hidden).float()  # (B, P, V)
    assert torch.allclose(m.plan_logits(hidden), raw - m.t2i_plan_log_weight, atol=1e-5)
    ce_raw = F.cross_entropy(raw.transpose(1, 2), plan, reduction="none")  # (B, P)
    wy = w[plan]
    assert float(mt["t2i_plan"].detach()) == pytest.approx(float((ce_raw * wy).sum() / wy.sum()), rel=1e-5)
    calibrated = F.cross_entropy((raw - m.t2i_plan_log_weight).transpose(1, 2), plan, reduction="none")
    assert mt["t2i_plan4"] == pytest.approx(float(calibrated[:, 4:].mean()), rel=1e-5)  # levels log calibrated CE
    logits, _ = m.t2i_prefill(states, mask)  # the first plan token, as sampling sees it
    assert torch.allclose(logits, m.plan_logits(hidden[:, 0]), atol=1e-5)
    m.save_pretrained(tmp_path / "saved")
    back = MMModel.from_pretrained(tmp_path / "saved")
    assert back.config.t2i_plan_weights and torch.equal(back.t2i_plan_log_weight, m.t2i_plan_log_weight)
    bf16 = decode_weights(back, "bf16")
    assert bf16.t2i_plan_log_weight.dtype == torch.float32
    cfg.model.t2i_plan = 0
    with pytest.raises(MMError, match="needs a model with a T2I plan"):
        PretrainTask(cfg)


def naive_future_targets(codes, positions, regions, k):
    """Explicit loops: code k is to come in region j after position p."""
    b, h, w = codes.shape
    out = torch.zeros(b, len(positions), regions * regions, k)
    for i in range(b):
        for pi, p in enumerate(positions.tolist()):
            for n in range(p, h * w):
                r, c = divmod(n, w)
                j = (r * regions // h) * regions + c * regions // w
                out[i, pi, j, int(codes[i, r, c])] = 1.0
    return out


@pytest.mark.parametrize("grid,regions", [((4, 4), 1), ((6, 6), 3), ((5, 7), 3), ((4, 6), 2)])
def test_future_code_targets_equal_explicit_loops(grid, regions):
    g = torch.Generator().manual_seed(regions)
    codes = torch.randint(0, 9, (3, *grid), generator=g)
    positions = torch.randperm(grid[0] * grid[1], generator=g)[:7]
    got = obj.future_code_targets(codes, positions, regions, 9)
    assert torch.equal(got, naive_future_targets(codes, positions, regions, 9))
    # position 0 with one region is the bag of the whole image; the last position holds one code
    whole = obj.future_code_targets(codes, torch.tensor([0, grid[0] * grid[1] - 1]), 1, 9)
    assert torch.equal(whole[:, 0, 0], F.one_hot(codes.flatten(1), 9).amax(1).float())
    assert whole[:, 1, 0].sum(-1).tolist() == [1.0, 1.0, 1.0]


def test_t2i_future_loss_trains_its_head_and_leaves_sampling_logits_alone(tmp_path):
    from mm.errors import MMError

    torch.manual_seed(0)
    task = PretrainTask(tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, cfg_dropout=0.0, t2i_future=1.0,
                                    t2i_future_regions=2, t2i_future_positions=4))
    m = task.model
    assert m.config.t2i_future_regions == 2 and m.t2i_future_head.out_features == 4 * m.config.codebook_size
    batch = make_batch(task.tokenizer, 4)
    codes = task.vq(torch.device("cpu")).encode(batch["image"])
    batch = {**batch, "codes": codes}
    _, metrics = task.loss(batch, 0)
    assert {"loss_t2i", "loss_t2i_future"} <= set(metrics)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, metrics = task.loss(batch, 0)
        first = first if first is not None else metrics["loss_t2i_future"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["loss_t2i_future"] < 0.5 * first
    # the head is training-only: the logits sampling reads do not depend on it
    states, mask = m.encode_prompt(batch["input_ids"], batch["attention_mask"].bool())
    before = m.t2i_logits(codes, states, mask)
    torch.nn.init.normal_(m.t2i_future_head.weight)
    assert torch.equal(before, m.t2i_logits(codes, states, mask))
    m.save_pretrained(tmp_path / "export")  # config.json carries the head, so a strict load finds it
    back = type(m).from_pretrained(tmp_path / "export")
    assert torch.equal(back.t2i_future_head.weight, m.t2i_future_head.weight)
    with pytest.raises(MMError, match="trained with t2i future regions 2"):
        back.set_t2i_future(3)
    with pytest.raises(MMError, match="regions must be in"):
        PretrainTask(tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, t2i_future=1.0, t2i_future_regions=99))


def test_t2i_future_loss_at_every_position_is_the_mean_over_positions_and_draws_no_random_numbers(tmp_path):
    from mm.errors import MMError

    task = PretrainTask(tiny_config(tmp_path, itc=0.0, itm=0.0, caption=0.0, t2i_future=1.0))
    m = task.model
    codes = torch.randint(0, m.config.codebook_size, (2, *m.config.code_grid))
    states = m.t2i_states(codes, None, None)  # (B, N, D)
    state = torch.get_rng_state()
    loss = obj.t2i_future_loss(m, states, codes)
    assert torch.equal(state, torch.get_rng_state())  # all positions: the RNG stream is untouched
    n = states.shape[1]
    logits = m.t2i_future_head(states).float()  # (B, N, K): one region
    target = obj.future_code_targets(codes, torch.arange(n), 1, m.config.codebook_size).flatten(2)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)
    m.t2i_future_head = None
    with pytest.raises(MMError, match="needs the model's future head"):
        obj.t2i_future_loss(m, states, codes)
