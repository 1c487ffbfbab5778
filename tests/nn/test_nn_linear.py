"""mm.nn.linear: the oneDNN fp32 path equals F.linear (forward and gradients) and steps aside
wherever it must (autocast, other dtypes, the "aten" backend, empty inputs)."""

import pytest
import torch
import torch.nn.functional as F

from mm.nn import linear as lin
from mm.nn.linear import Linear, linear, set_linear_backend, use_onednn

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def _grads(fn, x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a non-uniform upstream grad
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.fixture
def onednn_calls(monkeypatch):
    """Records each call of oneDNN's product (whether its weight was packed) and runs it."""
    calls = []
    real = lin._onednn
    monkeypatch.setattr(lin, "_onednn", lambda x, w, b: calls.append(w.is_mkldnn) or real(x, w, b))
    return calls


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 3, 4, 16), (1, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(24, 16)
    b = torch.randn(24) if bias else None
    assert use_onednn(x, w)
    ours = _grads(linear, x, w, b)
    ref = _grads(F.linear, x, w, b)
    for a, r in zip(ours, ref):
        if r is not None:
            assert a.shape == r.shape
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_is_actually_called(onednn_calls):
    calls = onednn_calls
    layer = Linear(16, 8)
    layer(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # forward, dx, dW
    with torch.no_grad():
        layer(torch.randn(4, 16))
    assert len(calls) == 4


@needs_onednn
def test_non_contiguous_input_and_frozen_weight():
    torch.manual_seed(1)
    layer = Linear(16, 8).requires_grad_(False)
    x = torch.randn(16, 10).t().requires_grad_()  # (10, 16), strides (1, 10)
    y = layer(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, layer.weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(y, F.linear(x2, layer.weight, layer.bias))
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.weight.grad is None


def test_falls_back_where_onednn_must_not_run(monkeypatch):
    w = torch.randn(8, 16)
    assert not use_onednn(torch.randn(4, 16, dtype=torch.float64), w.double())
    assert not use_onednn(torch.randn(4, 16).bfloat16(), w.bfloat16())
    assert not use_onednn(torch.randn(0, 16), w)  # empty batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(torch.randn(4, 16), w)
        assert Linear(16, 8)(torch.randn(4, 16)).dtype == torch.bfloat16  # autocast still applies
    old = set_linear_backend("aten")
    try:
        assert not use_onednn(torch.randn(4, 16), w)
        calls = []
        monkeypatch.setattr(lin, "_onednn", lambda *a: calls.append(1))
        Linear(16, 8)(torch.randn(4, 16))
        assert calls == []
    finally:
        set_linear_backend(old)
    with pytest.raises(ValueError, match="linear backend must be one of"):
        set_linear_backend("mkl")


def test_linear_is_a_drop_in_nn_linear():
    torch.manual_seed(2)
    a = Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())  # same keys and shapes both ways
    a.load_state_dict(b.state_dict())
    assert isinstance(a, torch.nn.Linear)
    x = torch.randn(3, 16)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_compiled_linear_matches():
    torch.manual_seed(3)
    layer = Linear(16, 8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.compile(layer)(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_for_rows_matches_and_is_used_only_at_its_row_count(dtype, onednn_calls):
    from mm.nn.linear import _PACKED, packed_for_rows

    torch.manual_seed(4)
    model = torch.nn.Sequential(Linear(16, 32), torch.nn.GELU(), Linear(32, 8)).to(dtype)
    x4, x5 = torch.randn(4, 1, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        plain4, plain5 = model(x4), model(x5)
    used = onednn_calls
    used.clear()  # count from here: the packed block below
    with torch.no_grad(), packed_for_rows(model, 4) as n:
        assert n == 2 and len(_PACKED) == 2
        packed4, again5 = model(x4), model(x5)
    assert used == [True, True, False, False]  # 4 rows: packed weights; 5 rows: the plain ones
    assert not _PACKED  # nothing left behind
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(packed4, plain4, **tol)  # bf16: bit-identical to the plain product
    torch.testing.assert_close(again5, plain5, rtol=0, atol=0)
    with packed_for_rows(model, 4):  # gradients: the packed weight is never used
        y = model(x4.float().to(dtype).requires_grad_())
    y.float().sum().backward()
    assert model[0].weight.grad is not None


@needs_onednn
def test_packed_for_rows_cleans_up_after_an_error():
    from mm.nn.linear import _PACKED, packed_for_rows

    layer = Linear(16, 8)
    with pytest.raises(RuntimeError, match="boom"), packed_for_rows(layer, 2):
        raise RuntimeError("boom")
    assert not _PACKED


@needs_onednn
def test_compiled_inference_uses_the_onednn_operator(onednn_calls):
    from mm.nn.linear import packed_for_rows

    torch.manual_seed(5)
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    calls = onednn_calls
    torch._dynamo.reset()
    with torch.no_grad(), packed_for_rows(layer, 3):
        y = torch.compile(lambda t: torch.relu(layer(t)), fullgraph=True)(x)
    assert calls  # the custom operator ran oneDNN inside the compiled graph
    torch.testing.assert_close(y, torch.relu(F.linear(x, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_compiled_training_keeps_onednn_and_its_gradients(onednn_calls):
    torch.manual_seed(6)
    layer = Linear(16, 8)
    x = torch.randn(2, 3, 16, requires_grad=True)
    calls = onednn_calls
    torch._dynamo.reset()
    out = torch.compile(lambda t: torch.tanh(layer(t)).square().sum(), fullgraph=True)(x)
    out.backward()
    assert len(calls) == 3  # forward, dx, dW: all oneDNN inside the compiled graphs
    x2 = x.detach().requires_grad_()
    ref = layer.weight.grad.clone(), layer.bias.grad.clone(), x.grad.clone()
    layer.zero_grad()
    torch.tanh(F.linear(x2, layer.weight, layer.bias)).square().sum().backward()
    for a, r in zip(ref, (layer.weight.grad, layer.bias.grad, x2.grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_square_packed_weight_is_not_used_for_its_transpose():
    from mm.nn.linear import _product, packed_for_rows

    torch.manual_seed(7)
    layer = Linear(16, 16, bias=False)
    g = torch.randn(4, 16)
    with torch.no_grad(), packed_for_rows(layer, 4):
        got = _product(g, layer.weight.t(), None)  # what a backward computes: g @ W
    torch.testing.assert_close(got, g @ layer.weight.detach(), rtol=1e-5, atol=1e-5)
