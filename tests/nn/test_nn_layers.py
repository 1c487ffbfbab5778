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
