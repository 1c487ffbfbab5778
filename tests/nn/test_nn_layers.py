"""Norms, MLPs and the pre-norm block."""

import pytest
import torch
import torch.nn.functional as F

from mm.nn.layers import MLP, Block, RMSNorm, make_norm


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)
    ln = make_norm("layernorm", 8)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,)))
    with pytest.raises(ValueError):
        make_norm("batchnorm", 8)


def test_swiglu_matches_formula():
    mlp = MLP(8, 12, "swiglu")
    x = torch.randn(2, 3, 8)
    w1, w2 = mlp.fc.weight[:12], mlp.fc.weight[12:]
    b1, b2 = mlp.fc.bias[:12], mlp.fc.bias[12:]
    want = (F.silu(x @ w1.T + b1) * (x @ w2.T + b2)) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), want)


def test_gelu_mlps_are_the_tanh_and_the_erf_forms():
    x = torch.randn(2, 3, 8) * 3
    tanh, exact = MLP(8, 12, "gelu"), MLP(8, 12, "gelu_exact")
    exact.load_state_dict(tanh.state_dict())  # same weights: the two differ only in the activation
    h = x @ tanh.fc.weight.T + tanh.fc.bias
    for mlp, form in ((tanh, 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))),
                      (exact, 0.5 * h * (1 + torch.erf(h / 2 ** 0.5)))):
        torch.testing.assert_close(mlp(x), form @ mlp.proj.weight.T + mlp.proj.bias)
    assert (tanh(x) - exact(x)).abs().max() > 1e-5
    with pytest.raises(ValueError, match="gelu_exact"):
        MLP(8, 12, "relu")


def test_block_residuals_and_optional_cross_attention():
    blk = Block(16, 4, context_dim=10).eval()
    x, c = torch.randn(2, 5, 16), torch.randn(2, 3, 10)
    # reference: x + attn(norm1 x); + cross(norm2 x, c); + mlp(norm3 x)
    h = x + blk.attn(blk.norm1(x), causal=True)
    without = h + blk.mlp(blk.norm3(h))
    h2 = h + blk.cross(blk.norm2(h), c)
    with_ctx = h2 + blk.mlp(blk.norm3(h2))
    torch.testing.assert_close(blk(x, causal=True), without)
    torch.testing.assert_close(blk(x, c, causal=True), with_ctx)
    # gradients reach every parameter when a context is given
    blk.train()
    blk(x, c).sum().backward()
    assert all(p.grad is not None for p in blk.parameters())


def test_pool_mean_max_and_attention_probe_match_naive():
    from mm.nn.layers import Pool

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    assert torch.equal(Pool("mean", 8, 2)(x), x.mean(1))
    assert torch.equal(Pool("max", 8, 2)(x), x.amax(1))
    assert not list(Pool("mean", 8, 2).parameters())  # no weights: old checkpoints load unchanged
    pool = Pool("attn", 8, 2)
    # naive: per head, softmax(q k^T / sqrt(d)) v with one query (the probe), then the output projection
    k, v = pool.kv(pool.norm(x)).chunk(2, dim=-1)  # (B, L, D) each
    q = pool.q(pool.probe)[0, 0]  # (D,)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(k[..., sl] @ q[sl] / 2.0, dim=1)  # (B, L)
        heads.append((w[..., None] * v[..., sl]).sum(1))  # (B, 4)
    torch.testing.assert_close(pool(x), pool.out(torch.cat(heads, -1)))
    with pytest.raises(ValueError, match="pool must be one of"):
        Pool("cls", 8, 2)


def test_block_second_parts_are_named_and_checked():
    blk = Block(16, 2, context_dim=16, second=("attn", "cross", "mlp"))
    assert {"attn_b.qkv.weight", "cross_b.q.weight", "mlp_b.fc.weight", "norm1b.weight"} <= set(blk.state_dict())
    assert Block(16, 2, second=("cross",)).second == frozenset()  # no cross-attention to copy
    with pytest.raises(ValueError, match="second parts must be attn, cross or mlp"):
        Block(16, 2, second=("norm",))
