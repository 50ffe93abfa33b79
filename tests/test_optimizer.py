"""The optimizer `train` builds: fused where torch has one, the same updates as foreach and as float64 Adam."""

import pytest
import torch
from torch import nn

from accuvqa.accumulate import GradientAccumulator
from accuvqa.config import load_config
from accuvqa.recipe import make_optimizer


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))


def test_fused_where_torch_has_one_foreach_otherwise():
    assert make_optimizer(load_config(), model()).defaults["fused"] is True  # Adam on the CPU
    assert make_optimizer(load_config(overrides={"OPT": "SGD"}), model()).defaults["fused"] is True
    adamax = make_optimizer(load_config(overrides={"OPT": "Adamax"}), model())  # no fused Adamax in torch
    assert adamax.defaults["foreach"] is True and "fused" not in adamax.defaults
    # OPT_PARAMS naming foreach or fused decides
    chosen = make_optimizer(load_config(overrides={"OPT_PARAMS": {"foreach": False}}), model()).defaults
    assert chosen["foreach"] is False and not chosen["fused"]
    chosen = make_optimizer(load_config(overrides={"OPT_PARAMS": {"fused": False}}), model()).defaults
    assert chosen["foreach"] is True and not chosen["fused"]
    # an integer parameter (as some models keep counters) rules fused out
    odd = model()
    odd.register_parameter("count", nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))
    assert make_optimizer(load_config(), odd).defaults["foreach"] is True


def adam_float64(params, grads_per_step, lr, betas, eps):
    """Adam written out in float64 from its paper's formulas: the independent reference."""
    p = [x.detach().double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            p[i] = p[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("opt_params", [{}, {"foreach": True}])
def test_fused_and_foreach_adam_make_the_same_updates(opt_params):
    """Five accumulated updates (3 micro-batches each) agree with float64 Adam to float32 rounding."""
    cfg = load_config(overrides={"OPT_PARAMS": opt_params, "LR_BASE": 1e-2})
    net = model()
    start = [p.detach().clone() for p in net.parameters()]
    optimizer = make_optimizer(cfg, net)
    assert bool(optimizer.defaults.get("fused")) is (not opt_params)
    seen = []

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch["x"]), batch["y"], reduction="sum"), batch["x"].shape[0]

    original_step = optimizer.step

    def record(*args, **kw):  # the summed gradient each update hands the optimizer
        seen.append([p.grad.detach().clone() for p in net.parameters()])
        return original_step(*args, **kw)

    optimizer.step = record
    acc = GradientAccumulator(net, optimizer, micro_batches=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        acc.step({"x": torch.randn(10, 6, generator=gen), "y": torch.randn(10, 5, generator=gen)}, loss_fn)
    want = adam_float64(start, seen, cfg.LR_BASE, cfg.OPT_BETAS, cfg.OPT_EPS)
    for got, ref, first in zip(net.parameters(), want, start):
        moved = float((ref - first.double()).abs().max())
        assert moved > 1e-3  # the updates did move the weights
        assert float((got.detach().double() - ref).abs().max()) <= 1e-5 * moved + 1e-6
