"""The accumulation engine: the accumulated gradient equals the one-batch gradient, any split."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.accumulate import GradientAccumulator, split_batch

# Exactness is judged in float64: there the accumulated gradient differs from the one-batch gradient only by
# summation order, measured at most 4.4e-16 relative (400 random batches and splits of this file's model, both
# reductions; AMD EPYC, torch 2.13 CPU). EXACT is 2e5 x that floor, and each exactness test shows in a control
# that a real error (dividing by k on uneven pieces, a perturbed item) exceeds it by orders of magnitude.
EXACT = 1e-10
# The same engine on a float32 model: measured at most 3.4e-7 relative (same 400 draws; 1.3e-7 for the fixed
# 11-sample batch below) -> FLOAT32 = 1e-5, a margin of 30 over the worst draw.
FLOAT32 = 1e-5
BOUND = {torch.float64: EXACT, torch.float32: FLOAT32}


class Recorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is handed at each step."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.detach().clone()
                          for g in self.param_groups for p in g["params"]])


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
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, loss.detach()


def max_rel_diff(got, want):
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


def divided_by_k_grads(model, batch, k, reduction):
    """The folklore loop: each micro-batch's loss with torch's own reduction, divided by k, backward, summed.
    Wrong for `sum` (a factor k) and for `mean` on uneven pieces (items of smaller pieces weigh more)."""
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for piece in split_batch(batch, k):
        model.zero_grad()
        (F.binary_cross_entropy_with_logits(model(piece["x"]), piece["y"], reduction=reduction) / k).backward()
        grads = [g + p.grad for g, p in zip(grads, model.parameters())]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction,loss_fn", [("sum", bce_sum), ("mean", bce_items)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uneven_micro_batches_match_full_batch(dtype, reduction, loss_fn, k):
    model, batch = make_model(dtype), make_batch(11, dtype)  # 11 samples: uneven for k = 2, 3, 4
    want, want_loss = full_batch_grads(model, batch, reduction)
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches=k, reduction=reduction).step(batch, loss_fn)
    assert result.micro_batches == k
    assert max_rel_diff(opt.seen[0], want) <= BOUND[dtype]
    assert float(result.loss) == pytest.approx(float(want_loss), rel=BOUND[dtype])
    if k > 1:  # control: the divide-by-k loop misses by >= 3e-2 here, 100 x FLOAT32 and 1e8 x EXACT
        assert max_rel_diff(divided_by_k_grads(model, batch, k, reduction), want) > 100 * BOUND[dtype]


def test_uneven_last_micro_batch_is_not_divided_by_k():
    """The folklore rule (mean per micro-batch / k) is wrong for uneven pieces; the engine is not."""
    model, batch = make_model(torch.float64), make_batch(7, torch.float64)
    want, _ = full_batch_grads(model, batch, "mean")
    folklore = divided_by_k_grads(model, batch, 2, "mean")  # 4 + 3 samples
    assert max_rel_diff(folklore, want) > 1e-3  # the folklore loop really is off
    opt = Recorder(model.parameters())
    GradientAccumulator(model, opt, micro_batches=2, reduction="mean").step(batch, bce_items)
    assert max_rel_diff(opt.seen[0], want) <= EXACT


def test_gradients_are_zeroed_once_per_update_not_per_micro_batch():
    model, batch = make_model(torch.float64), make_batch(8, torch.float64)
    want, _ = full_batch_grads(model, batch, "sum")
    opt = Recorder(model.parameters())
    acc = GradientAccumulator(model, opt, micro_batches=4, reduction="sum")
    acc.step(batch, bce_sum)
    acc.step(batch, bce_sum)  # a second update starts from zero, not from the first's gradient
    assert max_rel_diff(opt.seen[0], want) <= EXACT
    assert max_rel_diff(opt.seen[1], want) <= EXACT  # not zeroed: 2 x want, a relative difference of 1


def test_clipping_acts_on_the_accumulated_gradient():
    model, batch = make_model(torch.float64), make_batch(9, torch.float64)
    want, _ = full_batch_grads(model, batch, "sum")
    for p, g in zip(model.parameters(), want):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want]))
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches=3, reduction="sum", max_grad_norm=0.5).step(batch, bce_sum)
    assert float(result.grad_norm) == pytest.approx(float(norm), rel=EXACT)
    assert max_rel_diff(opt.seen[0], clipped) <= EXACT
    # control: clipping each micro-batch's gradient instead (before summing) is off by far more than the bound
    per_piece = [torch.zeros_like(p) for p in model.parameters()]
    for piece in split_batch(batch, 3):
        model.zero_grad()
        bce_sum(model, piece)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        per_piece = [a + p.grad for a, p in zip(per_piece, model.parameters())]
    assert max_rel_diff(per_piece, clipped) > 1e6 * EXACT


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


# ----------------------------------------------------------------------------- property-based

from hypothesis import given, settings, strategies as st  # noqa: E402


def masked_token_loss(model, batch):
    """A token-level loss: items are the unmasked positions, a different count per sample."""
    logits = model(batch["x"])  # (B, 5) read as 5 "tokens" per sample
    per_item = F.binary_cross_entropy_with_logits(logits, batch["y"], reduction="none")
    return (per_item * batch["mask"]).sum(), batch["mask"].sum()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), data=st.data(), reduction=st.sampled_from(["sum", "mean"]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_any_split_of_any_batch_matches_the_full_batch(n, data, reduction, dtype):
    k = data.draw(st.integers(1, n), label="micro_batches")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = make_model(dtype)
    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(n, 6, generator=gen, dtype=dtype),
             "y": torch.rand(n, 5, generator=gen, dtype=dtype),
             "mask": (torch.rand(n, 5, generator=gen) < 0.6).to(dtype)}
    batch["mask"][0, 0] = 1  # at least one real item in the window
    # reference: one backward over the whole batch, mean over all real tokens of the window
    model.zero_grad()
    loss_sum, items = masked_token_loss(model, batch)
    (loss_sum / items if reduction == "mean" else loss_sum).backward()
    want = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches=k, reduction=reduction).step(batch, masked_token_loss)
    assert result.micro_batches == k and float(result.n_items) == float(items)
    assert max_rel_diff(opt.seen[0], want) <= BOUND[dtype]
    # control: one item's target moved by 0.5 (a perturbed micro-batch) moves the last bias's gradient by exactly
    # 0.5 (sum; 0.5 / items for mean, as the scale): >= 0.1 relative over 400 draws, far above either bound
    perturbed = {**batch, "y": batch["y"].clone()}
    perturbed["y"][0, 0] += 0.5 if perturbed["y"][0, 0] < 0.5 else -0.5
    model.zero_grad(set_to_none=True)
    opt = Recorder(model.parameters())
    GradientAccumulator(model, opt, micro_batches=k, reduction=reduction).step(perturbed, masked_token_loss)
    assert max_rel_diff(opt.seen[0], want) > 100 * BOUND[dtype]


# ----------------------------------------------------------------------------- mixed precision

def test_bf16_autocast_runs_the_forward_in_bf16_with_float32_parameters_and_gradients():
    model, batch = make_model(), make_batch(12)
    want, _ = full_batch_grads(model, batch, "sum")
    forward_dtypes = []  # the dtype each Linear computes in, recorded during step()
    for layer in (model[0], model[2]):
        layer.register_forward_hook(lambda m, args, out: forward_dtypes.append(out.dtype))
    opt = Recorder(model.parameters())
    GradientAccumulator(model, opt, micro_batches=3, autocast_dtype=torch.bfloat16).step(batch, bce_sum)
    assert forward_dtypes == [torch.bfloat16] * 6  # 3 micro-batches x 2 Linears, all under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in opt.seen[0])
    # bf16 matmuls keep ~3 significant digits: this case measures 1.8e-3 relative against the float32 one-batch
    # gradient, 5.0e-3 at worst over 20 random models and batches (AMD EPYC, torch 2.13): 3e-2 is a margin of 6
    assert max_rel_diff(opt.seen[0], want) <= 3e-2
    forward_dtypes.clear()
    model(batch["x"])  # autocast is scoped to step(): outside it the model runs in float32 again
    assert forward_dtypes == [torch.float32] * 2


def test_grad_scaler_unscales_once_and_skips_inf_updates():
    model, batch = make_model(torch.float64), make_batch(10, torch.float64)  # the scaler works in float64 too
    want, _ = full_batch_grads(model, batch, "mean")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: parameters stay, gradients are seen
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    acc = GradientAccumulator(model, opt, micro_batches=3, reduction="mean", scaler=scaler)
    result = acc.step(batch, bce_items)
    assert not result.skipped and max_rel_diff(seen[0], want) <= EXACT  # unscaled exactly once
    # control: a gradient left scaled (or unscaled twice) is off by the scale, 2**12, not by rounding
    assert max_rel_diff([g * 2.0**12 for g in want], want) > 1e8 * EXACT
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.1

    def overflowing(model, piece):
        loss, n = bce_items(model, piece)
        return loss * float("inf"), n

    result = acc.step(batch, overflowing)
    assert result.skipped and scaler.get_scale() == 2.0**11
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_scheduler_steps_once_per_applied_update_after_the_optimizer_and_not_on_skipped_ones():
    model, batch = make_model(), make_batch(10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events = []
    opt.register_step_post_hook(lambda o, a, k: events.append("optimizer"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    original_step = scheduler.step
    scheduler.step = lambda *a, **k: (events.append("scheduler"), original_step(*a, **k))[1]
    acc = GradientAccumulator(model, opt, micro_batches=3, reduction="mean", scaler=scaler,
                              scheduler=scheduler)

    for _ in range(2):
        assert not acc.step(batch, bce_items).skipped
    # 2 updates of 3 micro-batches each: 2 scheduler steps, each after its optimizer step
    assert events == ["optimizer", "scheduler"] * 2
    assert scheduler.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)

    def overflowing(model, piece):
        loss, n = bce_items(model, piece)
        return loss * float("inf"), n

    assert acc.step(batch, overflowing).skipped
    assert events == ["optimizer", "scheduler"] * 2  # skipped update: neither steps
    assert scheduler.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)

    assert not acc.step(batch, bce_items).skipped
    assert events == ["optimizer", "scheduler"] * 3
    assert scheduler.last_epoch == 3


# ----------------------------------------------------------------------------- micro_batches="auto"

def test_auto_retry_after_a_late_out_of_memory_drops_the_partial_gradient_and_keeps_the_count():
    """The OOM strikes the 2nd micro-batch, after the 1st already put its gradient in .grad."""
    model, batch = make_model(torch.float64), make_batch(16, torch.float64)
    # memory cost per sample: the second half of the batch is twice as expensive as the first
    batch["cost"] = torch.tensor([1.0] * 8 + [2.0] * 8, dtype=torch.float64)
    want, _ = full_batch_grads(model, batch, "mean")
    calls = []  # (piece size, whether .grad already held a gradient when the piece started)

    def fits_cost_twelve(model, piece):
        grad = model[0].weight.grad
        calls.append((len(piece["x"]), grad is not None and bool(grad.abs().sum() > 0)))
        if float(piece["cost"].sum()) > 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return bce_items(model, piece)

    opt = Recorder(model.parameters())
    acc = GradientAccumulator(model, opt, micro_batches="auto", reduction="mean")
    result = acc.step(batch, fits_cost_twelve)
    # the 1st half's gradient from the failed k=2 attempt must not be counted twice
    assert max_rel_diff(opt.seen[0], want) <= EXACT
    assert result.micro_batches == 4 and acc.micro_batches == 4
    # k=1: 16 (cost 24) fails; k=2: 8 (cost 8) runs backward, 8 (cost 16) fails; k=4: all fit
    assert calls == [(16, False), (8, False), (8, True), (4, False), (4, True), (4, True), (4, True)]
    calls.clear()
    acc.step(batch, fits_cost_twelve)
    assert [size for size, _ in calls] == [4, 4, 4, 4]  # later windows start from the count found
    assert max_rel_diff(opt.seen[1], want) <= EXACT


def test_auto_retries_a_cpu_allocation_failure_as_out_of_memory():
    """torch's CPU allocator says "can't allocate memory" (a RuntimeError), not CUDA's "out of memory"."""
    model, batch = make_model(torch.float64), make_batch(16, torch.float64)
    want, _ = full_batch_grads(model, batch, "sum")

    def needs_small_pieces(model, piece):
        if len(piece["x"]) > 4:
            torch.empty(2**60, dtype=torch.uint8)  # a real allocation the CPU allocator refuses
        return bce_items(model, piece)

    with pytest.raises(RuntimeError, match="can't allocate memory"):
        GradientAccumulator(model, Recorder(model.parameters())).step(batch, needs_small_pieces)
    model.zero_grad(set_to_none=True)
    opt = Recorder(model.parameters())
    result = GradientAccumulator(model, opt, micro_batches="auto").step(batch, needs_small_pieces)
    assert result.micro_batches == 4
    assert max_rel_diff(opt.seen[0], want) <= EXACT


def test_auto_gives_up_when_one_sample_does_not_fit():
    model, batch = make_model(), make_batch(2)

    def never_fits(model, piece):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    acc = GradientAccumulator(model, Recorder(model.parameters()), micro_batches="auto")
    with pytest.raises(torch.OutOfMemoryError):
        acc.step(batch, never_fits)


# ----------------------------------------------------------------------------- misuse guards

def test_stray_backward_before_a_window_is_an_error():
    model, batch = make_model(), make_batch(4)
    bce_sum(model, batch)[0].backward()
    with pytest.raises(RuntimeError, match=r"already hold gradients.*zero_grad\(set_to_none=True\)"):
        GradientAccumulator(model, Recorder(model.parameters())).step(batch, bce_sum)


def test_parameters_without_gradient_are_named_once():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = make_model(), nn.Linear(2, 2)  # extra: never used by forward

        def forward(self, x):
            return self.body(x)

    model = WithUnused()
    acc = GradientAccumulator(model, Recorder(model.parameters()))
    with pytest.warns(UserWarning, match=r"2 parameters with requires_grad got no gradient.*extra.weight"):
        acc.step(make_batch(4), bce_sum)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.step(make_batch(4), bce_sum)  # warned once only


def test_batchnorm_is_reported():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match=r"BatchNorm layers \(1\).*depend on the micro-batch size"):
        GradientAccumulator(model, Recorder(model.parameters()))


def test_window_without_items_is_an_error():
    model = make_model()
    acc = GradientAccumulator(model, Recorder(model.parameters()), reduction="mean")
    with pytest.raises(ValueError, match="the window has no items"):
        acc.step(make_batch(4), lambda m, b: (bce_sum(m, b)[0] * 0, 0))
