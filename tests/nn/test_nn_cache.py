"""Incremental decoding with each cache kind equals the full causal forward."""

import pytest
import torch

from mm.nn.cache import KVCache, StaticKVCache, make_caches
from mm.nn.layers import Block
from mm.nn.position import RoPE1D

B, T, D, H, DC, TC = 2, 9, 32, 4, 24, 6


def stack():
    blocks = torch.nn.ModuleList([Block(D, H, context_dim=DC, mlp="swiglu", norm="rmsnorm") for _ in range(3)])
    return blocks.eval(), RoPE1D(D // H, max_len=16)


def run(blocks, rope, x, ctx, ctx_mask, positions, caches=None):
    cs = rope(positions)
    for i, blk in enumerate(blocks):
        x = blk(x, ctx, ctx_mask, causal=True, rope=cs, cache=None if caches is None else caches[i])
    return x


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("first_chunk", [1, 4])
def test_incremental_equals_full_forward(kind, first_chunk):
    blocks, rope = stack()
    x, ctx = torch.randn(B, T, D), torch.randn(B, TC, DC)
    ctx_mask = torch.ones(B, TC, dtype=torch.bool)
    ctx_mask[1, 3:] = False
    with torch.no_grad():
        full = run(blocks, rope, x, ctx, ctx_mask, torch.arange(T))
        caches = make_caches(3, kind, batch=B, heads=H, max_len=16, head_dim=D // H)
        outs, t = [], 0
        # prefill a chunk (context K/V computed here), then one token per step without the context
        for n in [first_chunk] + [1] * (T - first_chunk):
            pos = torch.arange(t, t + n)
            outs.append(run(blocks, rope, x[:, t:t + n], ctx if t == 0 else None, ctx_mask, pos, caches))
            t += n
    inc = torch.cat(outs, dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert all(c.cross_attn.k is not None for c in caches)  # cross K/V were cached once


def test_static_cache_writes_at_position_and_resets():
    cache = StaticKVCache(1, 2, 5, 4)
    k = torch.randn(1, 2, 3, 4)
    keys, _ = cache.update(k, k)
    assert keys.shape == (1, 2, 5, 4) and int(cache.next_position()) == 3
    torch.testing.assert_close(keys[:, :, :3], k)
    cache.update(k[:, :, :1] * 2, k[:, :, :1])
    torch.testing.assert_close(cache.k[:, :, 3], 2 * k[:, :, 0])
    cache.reset()
    assert int(cache.next_position()) == 0
    with pytest.raises(ValueError, match=r"\(1, 3, 1, 4\)"):
        cache.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def test_dynamic_cache_grows():
    cache = KVCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    k, _ = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert k.shape == (1, 2, 4, 4) and cache.next_position() == 4


def test_visible_masks_are_causal_against_the_cache():
    static, dynamic = StaticKVCache(1, 1, 6, 2), KVCache()
    k = torch.randn(1, 1, 2, 2)
    static.update(k, k)
    dynamic.update(k, k)
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # queries at 2, 3
    assert torch.equal(static.visible(2), want)
    assert torch.equal(dynamic.visible(2), want[:, :4])
    assert dynamic.visible(1) is None  # one new token sees every key of a growing cache
