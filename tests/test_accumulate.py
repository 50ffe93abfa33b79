"""The accumulation engine: the accumulated gradient equals the one-batch gradient, any split."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.accumulate import GradientAccumulator, split_batch


class Recorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is handed at each step."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def make_batch(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 6, generator=gen, dtype=dtype),
            "y": torch.rand(n, 5, generator=gen, dtype=dtype)}


def bce_sum(model, batch):
    logits = model(batch["x"])
    return F.binary_cross_entropy_with_logits(logits, batch["y"], reduction="sum"), batch["y"].shape[0]


def bce_items(model, batch):
    logits = model(batch["x"])
    return F.binary_cross_entropy_with_logits(logits, batch["y"], reduction="sum"), batch["y"].numel()


def full_batch_grads(model, batch, reduction):
    """The reference: one backward over the whole batch, with torch's own reduction."""
    model.zero_grad()
    loss = F.binary_cross_entropy_with_logits(model(batch["x"]), batch["y"], reduction=reduction)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], loss.detach()


def max_rel_diff(got, want):
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


@pytest.mark.parametrize("reduction,loss_fn", [("sum", bce_sum), ("mean", bce_items)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uneven_micro_batches_match_full_batch_float32(reduction, loss_fn, k):
    model, batch = make_model(), make_batch(11)  # 11 samples: uneven for k = 2, 3, 4
    want, want_loss = full_batch_grads(model, batch, reduction)
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches=k, reduction=reduction).step(batch, loss_fn)
    assert result.micro_batches == k
    assert max_rel_diff(opt.seen[0], want) <= 1e-5
    assert float(result.loss) == pytest.approx(float(want_loss), rel=1e-5)


def test_uneven_last_micro_batch_is_not_divided_by_k():
    """The folklore rule (mean per micro-batch / k) is wrong for uneven pieces; the engine is not."""
    model, batch = make_model(torch.float64), make_batch(7, torch.float64)
    want, _ = full_batch_grads(model, batch, "mean")
    folklore = [torch.zeros_like(p) for p in model.parameters()]
    for piece in split_batch(batch, 2):  # 4 + 3 samples
        model.zero_grad()
        (F.binary_cross_entropy_with_logits(model(piece["x"]), piece["y"]) / 2).backward()
        folklore = [f + p.grad for f, p in zip(folklore, model.parameters())]
    assert max_rel_diff(folklore, want) > 1e-3  # the folklore loop really is off
    opt = Recorder(model.parameters())
    GradientAccumulator(model, opt, micro_batches=2, reduction="mean").step(batch, bce_items)
    assert max_rel_diff(opt.seen[0], want) <= 1e-12


def test_gradients_are_zeroed_once_per_update_not_per_micro_batch():
    model, batch = make_model(torch.float64), make_batch(8, torch.float64)
    want, _ = full_batch_grads(model, batch, "sum")
    opt = Recorder(model.parameters())
    acc = GradientAccumulator(model, opt, micro_batches=4, reduction="sum")
    acc.step(batch, bce_sum)
    acc.step(batch, bce_sum)  # a second update starts from zero, not from the first's gradient
    assert max_rel_diff(opt.seen[0], want) <= 1e-12
    assert max_rel_diff(opt.seen[1], want) <= 1e-12


def test_clipping_acts_on_the_accumulated_gradient():
    model, batch = make_model(torch.float64), make_batch(9, torch.float64)
    want, _ = full_batch_grads(model, batch, "sum")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want]))
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches=3, reduction="sum", max_grad_norm=0.5).step(batch, bce_sum)
    assert float(result.grad_norm) == pytest.approx(float(norm), rel=1e-10)
    assert max_rel_diff(opt.seen[0], clipped) <= 1e-10


def test_more_micro_batches_than_samples_are_clamped():
    model, batch = make_model(), make_batch(3)
    opt = Recorder(model.parameters())
    assert GradientAccumulator(model, opt, micro_batches=8).step(batch, bce_sum).micro_batches == 3


def test_split_sizes_differ_by_at_most_one_and_cover_the_batch():
    batch = torch.arange(10)
    pieces = split_batch(batch, 4)
    assert [len(p) for p in pieces] == [2, 3, 2, 3] or sorted(len(p) for p in pieces) == [2, 2, 3, 3]
    assert torch.equal(torch.cat(pieces), batch)
    tuple_pieces = split_batch((torch.arange(5), torch.arange(5) * 2), 2)
    assert isinstance(tuple_pieces[0], tuple) and torch.equal(tuple_pieces[1][1], torch.tensor([4, 6, 8]))


def test_bad_batches_and_losses_are_refused_clearly():
    model = make_model()
    acc = GradientAccumulator(model, Recorder(model.parameters()))
    with pytest.raises(TypeError, match="tensor, or a tuple/list/dict of tensors"):
        acc.step([1, 2, 3], bce_sum)
    with pytest.raises(ValueError, match="share the leading"):
        acc.step({"x": torch.zeros(3, 6), "y": torch.zeros(4, 5)}, bce_sum)
    with pytest.raises(ValueError, match="scalar loss"):
        acc.step(make_batch(4), lambda m, b: (F.binary_cross_entropy_with_logits(
            m(b["x"]), b["y"], reduction="none"), 4))
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        GradientAccumulator(model, Recorder(model.parameters()), reduction="avg")
