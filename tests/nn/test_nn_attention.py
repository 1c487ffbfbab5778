"""Attention: equals a line-by-line implementation of the four steps, matches torch's MHA, masks."""

import math

import pytest
import torch
from torch import nn

from mm.nn.attention import Attention

B, TQ, TK, D, H, DC = 2, 5, 7, 16, 4, 12


def naive_attention(attn: Attention, x, context=None, key_mask=None, causal=False):
    """Q = XW_q, K = CW_k, V = CW_v; scores = QKᵀ/√d; softmax over keys; weights·V; concat; W_o."""
    d = attn.head_dim
    if attn.is_cross:
        wq, bq = attn.q.weight, attn.q.bias
        wk, wv = attn.kv.weight[:D], attn.kv.weight[D:]
        bk, bv = attn.kv.bias[:D], attn.kv.bias[D:]
        c = context
    else:
        wq, wk, wv = attn.qkv.weight[:D], attn.qkv.weight[D:2 * D], attn.qkv.weight[2 * D:]
        bq, bk, bv = attn.qkv.bias[:D], attn.qkv.bias[D:2 * D], attn.qkv.bias[2 * D:]
        c = x
    out = torch.zeros(x.shape[0], x.shape[1], D)
    for b in range(x.shape[0]):
        heads = []
        for h in range(attn.heads):
            sl = slice(h * d, (h + 1) * d)
            q = x[b] @ wq[sl].T + bq[sl]  # (Tq, d)
            k = c[b] @ wk[sl].T + bk[sl]  # (Tk, d)
            v = c[b] @ wv[sl].T + bv[sl]
            scores = q @ k.T / math.sqrt(d)  # (Tq, Tk)
            allowed = torch.ones_like(scores, dtype=torch.bool)
            if key_mask is not None:
                allowed &= key_mask[b][None, :]
            if causal:
                tq, tk = scores.shape
                for i in range(tq):
                    for j in range(tk):
                        if j > i + (tk - tq):
                            allowed[i, j] = False
            rows = []
            for i in range(scores.shape[0]):
                if not allowed[i].any():
                    rows.append(torch.zeros(d))
                    continue
                s = scores[i].masked_fill(~allowed[i], float("-inf"))
                w = torch.softmax(s, dim=-1)
                rows.append(w @ v)
            heads.append(torch.stack(rows))
        out[b] = torch.cat(heads, dim=-1) @ attn.out.weight.T + attn.out.bias
    return out


def padding_mask():
    m = torch.ones(B, TK, dtype=torch.bool)
    m[0, 4:] = False
    m[1, :2] = False
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_matches_naive(causal, padded):
    attn = Attention(D, H)
    x = torch.randn(B, TK, D)
    km = padding_mask() if padded else None
    got = attn(x, key_mask=km, causal=causal)
    want = naive_attention(attn, x, key_mask=km, causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_matches_naive(padded):
    attn = Attention(D, H, context_dim=DC)
    x, c = torch.randn(B, TQ, D), torch.randn(B, TK, DC)
    km = padding_mask() if padded else None
    got = attn(x, c, key_mask=km)
    torch.testing.assert_close(got, naive_attention(attn, x, c, key_mask=km), atol=1e-5, rtol=1e-5)


def test_causal_with_fewer_queries_than_keys_matches_naive():
    attn = Attention(D, H)
    x = torch.randn(B, TK, D)
    # the explicit-mask causal path (padding forces it) must align queries to the last positions
    got = attn(x, key_mask=torch.ones(B, TK, dtype=torch.bool), causal=True)
    torch.testing.assert_close(got, naive_attention(attn, x, causal=True), atol=1e-5, rtol=1e-5)


def test_self_attention_matches_torch_multihead_attention():
    attn = Attention(D, H).eval()
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    x = torch.randn(B, TK, D)
    km = padding_mask()
    causal = torch.ones(TK, TK, dtype=torch.bool).tril()
    want, _ = mha(x, x, x, key_padding_mask=~km, attn_mask=~causal, need_weights=False)
    got = attn(x, key_mask=km, causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_torch_multihead_attention():
    attn = Attention(D, H, context_dim=DC).eval()
    mha = nn.MultiheadAttention(D, H, kdim=DC, vdim=DC, batch_first=True).eval()
    with torch.no_grad():
        mha.q_proj_weight.copy_(attn.q.weight)
        mha.k_proj_weight.copy_(attn.kv.weight[:D])
        mha.v_proj_weight.copy_(attn.kv.weight[D:])
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    x, c = torch.randn(B, TQ, D), torch.randn(B, TK, DC)
    km = padding_mask()
    want, _ = mha(x, c, c, key_padding_mask=~km, need_weights=False)
    torch.testing.assert_close(attn(x, c, key_mask=km), want, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    attn = Attention(D, H, context_dim=DC)
    attn.out.bias.data.zero_()  # so the zero attention output stays exactly zero after W_o
    x = torch.randn(B, TQ, D, requires_grad=True)
    c = torch.randn(B, TK, DC, requires_grad=True)
    km = torch.ones(B, TK, dtype=torch.bool)
    km[1] = False  # sample 1 has an empty context
    y = attn(x, c, key_mask=km)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.isfinite(y).all()
    y.pow(2).sum().backward()
    for g in (x.grad, c.grad, attn.q.weight.grad, attn.kv.weight.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(c.grad[1], torch.zeros_like(c.grad[1]))  # nothing flowed from masked keys
    # per-query masks: one query row of sample 0 sees nothing, the others see everything
    am = torch.ones(B, TQ, TK, dtype=torch.bool)
    am[0, 2] = False
    y2 = attn(x, c, attn_mask=am)
    assert torch.equal(y2[0, 2], torch.zeros(D)) and torch.isfinite(y2).all()


def test_bad_shapes_and_dtypes_raise_value_error_naming_shapes():
    self_attn, cross = Attention(D, H), Attention(D, H, context_dim=DC)
    x = torch.randn(B, TQ, D)
    with pytest.raises(ValueError, match=r"\(2, 5, 8\)"):
        self_attn(torch.randn(B, TQ, 8))
    with pytest.raises(ValueError, match=r"\(2, 7, 5\).*\(B, Tk, 12\)"):
        cross(x, torch.randn(B, TK, 5))
    with pytest.raises(ValueError, match="needs a context"):
        cross(x)
    with pytest.raises(ValueError, match=r"\(2, 5\).*torch.float32"):
        self_attn(x, key_mask=torch.ones(B, TQ))  # float mask
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        self_attn(x, key_mask=torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        self_attn(x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, 3)


def test_rope_in_attention_equals_rotating_q_and_k_separately():
    """The fused path (QKV view, RoPE on q and k together, full tables) equals the textbook one."""
    from mm.nn.position import RoPE2D, apply_rope

    attn = Attention(D, H)
    rope = RoPE2D(D // H, 2, 3)
    x = torch.randn(B, 6, D)
    pos = torch.arange(6)
    q, k, v = attn._heads(attn.qkv(x), 3)
    q, k = apply_rope(q, *rope(pos)), apply_rope(k, *rope(pos))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = attn.out(y.transpose(1, 2).reshape(B, 6, D))
    assert torch.equal(attn(x, causal=True, rope=rope.full(pos)), want)
    assert torch.equal(attn(x, causal=True, rope=rope(pos)), want)  # half tables are accepted too
    with pytest.raises(ValueError, match="RoPE table"):
        attn(x, rope=rope.full(torch.arange(5)))


def test_cached_cross_attention_prepares_the_mask_once_and_zeros_empty_contexts():
    from mm.nn.cache import CrossKVCache

    attn = Attention(D, H, context_dim=DC).eval()
    x, c = torch.randn(B, 3, D), torch.randn(B, TK, DC)
    for km in (padding_mask(), torch.stack([padding_mask()[0], torch.zeros(TK, dtype=torch.bool)])):
        cache = CrossKVCache()
        first = attn(x[:, :1], c, key_mask=km, cache=cache)  # computes K/V and the mask
        later = attn(x[:, 1:], None, key_mask=km, cache=cache)  # reuses both
        full = attn(x, c, key_mask=km)
        torch.testing.assert_close(torch.cat([first, later], 1), full, atol=1e-6, rtol=1e-6)
        assert (cache.mask[1] is None) == bool(km.any(-1).all())  # keep only when a context is empty
        torch.testing.assert_close(full, naive_attention(attn, x, c, key_mask=km), atol=1e-5, rtol=1e-5)


def test_cpu_half_precision_training_attention_runs_in_fp32():
    from mm.nn.attention import attend

    q, k, v = (torch.randn(2, 3, 6, 8).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, is_causal=True, rows_may_be_empty=False)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("masked", ["none", "padded", "empty_row"])
def test_bf16_few_query_attention_without_grad_matches_fp32(masked, monkeypatch):
    """The written-out path for bf16 decoding (mm.nn.attention._few_query_attention) equals SDPA
    in fp32 to bf16 rounding, including a row with no visible key (zeros)."""
    import torch.nn.functional as F

    from mm.nn import attention as att

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    mask = None
    if masked != "none":
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., 25:] = False
        if masked == "empty_row":
            mask[1] = False
    used = []
    real = att._few_query_attention
    monkeypatch.setattr(att, "_few_query_attention", lambda *a, **kw: used.append(1) or real(*a, **kw))
    with torch.no_grad():
        got = att.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        ref = att.attend(q, k, v, mask)
    assert used == [1] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    if masked == "empty_row":
        assert torch.equal(got[1].float(), torch.zeros_like(got[1].float()))
    if masked == "none":
        torch.testing.assert_close(got.float(), F.scaled_dot_product_attention(q, k, v), atol=2e-2, rtol=2e-2)
