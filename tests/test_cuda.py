"""The CUDA paths of the engine: fp16 with GradScaler, bf16 autocast. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.accumulate import GradientAccumulator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _setup(n: int = 40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).cuda()
    batch = {"x": torch.randn(n, 32, device="cuda"), "y": torch.rand(n, 8, device="cuda")}
    return model, batch


def _loss(model, batch):
    return F.binary_cross_entropy_with_logits(model(batch["x"]).float(), batch["y"], reduction="sum"), batch["y"].numel()


def _reference(model, batch):
    model.zero_grad()
    (F.binary_cross_entropy_with_logits(model(batch["x"]), batch["y"], reduction="sum") / batch["y"].numel()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mixed_precision_accumulation_is_close_to_float32(dtype):
    model, batch = _setup()
    want = _reference(model, batch)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.register_step_post_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    acc = GradientAccumulator(model, opt, micro_batches=3, reduction="mean", scaler=scaler, autocast_dtype=dtype)
    result = acc.step(batch, _loss)
    assert not result.skipped
    assert all(p.dtype == torch.float32 for p in model.parameters())
    scale = max(float(w.abs().max()) for w in want)
    diff = max(float((g - w).abs().max()) for g, w in zip(seen[0], want)) / scale
    # Not measured in this file's sessions (no GPU was lent): the bounds are the formats' rounding, 4 x fp16's unit
    # roundoff (4.9e-4) and 5 x bf16's (3.9e-3). The nearest measurement, bf16 autocast on the CPU
    # (tests/test_accumulate.py), gives 1.8e-3 for such a model, 5.0e-3 at worst over 20 random ones.
    assert diff <= (2e-3 if dtype == torch.float16 else 2e-2), diff
