"""MCAN's building blocks with written-out backward passes against plain autograd through the original formulas."""

import pytest
import torch
import torch.nn.functional as F

from accuvqa.config import load_config
from accuvqa.models import build_model
from accuvqa.models.layers import (FC, MLP, LayerNorm, OriginalLayerNorm, ReLUDropout, layer_norm_values,
                                   plain_autograd)


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while fn() builds its graph (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def graph_names(t):
    """Names of the backward nodes of t's graph."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node.name()
            todo.extend(f for f, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_relu_dropout_matches_the_two_modules_bit_for_bit(p):
    mlp = MLP(24, 40, 6, dropout_r=p).train()  # FFN's shape: linear, ReLU, dropout, linear
    fc = mlp.fc
    x = torch.randn(3, 7, 24, requires_grad=True)
    grad = torch.randn(3, 7, 6)

    def reference():  # what FC computed before: linear, in-place ReLU, dropout module
        return mlp.linear(fc.dropout(fc.relu(fc.linear(x))))

    torch.manual_seed(5)
    want, want_saved = saved_bytes(reference)
    want_grads = torch.autograd.grad(want, [x, *mlp.parameters()], grad)
    torch.manual_seed(5)
    got, got_saved = saved_bytes(lambda: mlp(x))
    got_grads = torch.autograd.grad(got, [x, *mlp.parameters()], grad)
    assert "ReLUDropoutBackward" in graph_names(got)
    assert torch.equal(got, want)  # same values, same random numbers drawn
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    hidden = fc(x)
    assert 0.0 < (hidden == 0).float().mean() < 1.0  # both ReLU and dropout zeroed something
    # no longer kept for backward: the ReLU output and the dropout's scaled mask (the dropout's
    # output, which the second linear keeps anyway, is all ReLUDropout keeps)
    assert want_saved - got_saved == 2 * hidden.numel() * 4


def test_relu_dropout_only_where_it_applies():
    fc = FC(8, 8, dropout_r=0.1)
    x = torch.randn(2, 8, requires_grad=True)
    assert fc.eval()(x).grad_fn.name() != "ReLUDropoutBackward"  # eval: no dropout
    with torch.no_grad():
        assert fc.train()(x).grad_fn is None
    assert FC(8, 8, dropout_r=0.0).train()(x).grad_fn.name().startswith("Relu")  # no dropout: plain ReLU
    assert torch.equal(fc.eval()(x), F.relu(fc.linear(x)))  # eval: the ReLU alone
    assert "ReLUDropoutBackward" in graph_names(ReLUDropout.apply(x, 0.1))


def test_layer_norm_gradient_equals_autograd_in_float64():
    torch.manual_seed(0)
    norm = LayerNorm(32).double()
    with torch.no_grad():
        norm.a_2.uniform_(0.5, 1.5)
        norm.b_2.uniform_(-0.5, 0.5)
    x = (torch.randn(4, 9, 32, dtype=torch.float64) * 3 + 1).requires_grad_()
    grad = torch.randn(4, 9, 32, dtype=torch.float64)
    got = norm(x)
    assert got.grad_fn.name().startswith("OriginalLayerNorm")
    want = layer_norm_values(x, norm.a_2, norm.b_2, norm.eps)  # plain autograd through the formula
    assert torch.equal(got, want)
    got_grads = torch.autograd.grad(got, [x, norm.a_2, norm.b_2], grad)
    want_grads = torch.autograd.grad(want, [x, norm.a_2, norm.b_2], grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: OriginalLayerNorm.apply(t, norm.a_2, norm.b_2, 1e-6),
                                    (x[:2, :3].detach().clone().requires_grad_(),))


def test_layer_norm_float32_keeps_less_and_stays_close():
    norm = LayerNorm(512)
    x = torch.randn(8, 30, 512, requires_grad=True)
    grad = torch.randn(8, 30, 512)
    got, got_saved = saved_bytes(lambda: norm(x))
    want, want_saved = saved_bytes(lambda: layer_norm_values(x, norm.a_2, norm.b_2, norm.eps))
    assert torch.equal(got, want)
    size = x.numel() * 4
    assert want_saved >= 3 * size and got_saved < 1.1 * size  # x, x - mean, a * (x - mean)  vs  x - mean
    x64 = x.detach().double().requires_grad_()
    ref = torch.autograd.grad(layer_norm_values(x64, norm.a_2.double(), norm.b_2.double(), norm.eps), x64,
                              grad.double())[0]
    got_grad = torch.autograd.grad(got, x, grad)[0]
    want_grad = torch.autograd.grad(want, x, grad)[0]
    # both float32 gradients are as close to the float64 one as each other
    assert (got_grad.double() - ref).abs().max() <= 2 * (want_grad.double() - ref).abs().max() + 1e-7


def test_layer_norm_constant_row_gets_autograds_gradient():
    norm = LayerNorm(6)
    x = torch.ones(2, 6, requires_grad=True)
    weights = torch.arange(6.0)
    got = torch.autograd.grad((norm(x) * weights).sum(), x)[0]
    want = torch.autograd.grad((layer_norm_values(x, norm.a_2, norm.b_2, norm.eps) * weights).sum(), x)[0]
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_mcan_step_keeps_less_for_backward_and_trains_the_same():
    """A whole MCAN: the same logits, gradients within float32 rounding, less kept for backward."""
    cfg = load_config(overrides={"LAYER": 2, "HIDDEN_SIZE": 64, "MULTI_HEAD": 4, "FLAT_MLP_SIZE": 64,
                                 "FLAT_OUT_SIZE": 128, "IMG_FEAT_SIZE": 16, "WORD_EMBED_SIZE": 16})
    torch.manual_seed(0)
    model = build_model(cfg, 30, 10).train()
    img = torch.randn(4, 12, 16)
    img[0, 9:] = 0  # padded regions
    ques = torch.randint(1, 30, (4, 7))

    def grads():
        torch.manual_seed(1)
        out, saved = saved_bytes(lambda: model(img, ques))
        model.zero_grad()
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], saved

    got, got_grads, got_saved = grads()
    plain_autograd(model)  # the formulas through plain autograd
    want, want_grads, want_saved = grads()
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert got_saved < 0.8 * want_saved


def test_under_bf16_autocast_the_same_values_and_gradients_as_close_to_float32():
    """AMP bf16 on the CPU: the written-out backward passes take what autocast hands them; their
    gradients are as close to float32's as autograd's through the formulas are."""
    cfg = load_config(overrides={"LAYER": 1, "HIDDEN_SIZE": 32, "MULTI_HEAD": 4, "FLAT_MLP_SIZE": 32,
                                 "FLAT_OUT_SIZE": 64, "IMG_FEAT_SIZE": 8, "WORD_EMBED_SIZE": 8})
    torch.manual_seed(0)
    model = build_model(cfg, 20, 5).train()
    img, ques = torch.randn(3, 6, 8), torch.randint(1, 20, (3, 5))

    def run(bf16=True):
        torch.manual_seed(1)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(img, ques)
        out.float().pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got, got_grads = run()
    _, f32_grads = run(bf16=False)
    plain_autograd(model)
    want, want_grads = run()
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    largest = max(float(g.abs().max()) for g in f32_grads.values())
    compared = 0
    for name, ref in f32_grads.items():
        scale = float(ref.abs().max())
        if scale < 1e-4 * largest:  # e.g. the key biases: zero gradient in exact arithmetic, rounding noise
            continue
        assert got_grads[name].dtype == want_grads[name].dtype
        got_err = float((got_grads[name] - ref).abs().max()) / scale
        want_err = float((want_grads[name] - ref).abs().max()) / scale
        assert got_err <= 2 * want_err + 0.01, name
        compared += 1
    assert compared > 50
