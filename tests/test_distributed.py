"""Under DistributedDataParallel (2 gloo processes on CPU) the update equals one process's."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from accuvqa.accumulate import GradientAccumulator

N, FEATURES, TOKENS = 13, 6, 5  # 13 samples: each rank's share (7, 6) splits unevenly


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, TOKENS)).double()


def make_batch() -> dict:
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(N, TOKENS, generator=gen) < 0.5).double()
    mask[:, 0] = 1
    return {"x": torch.randn(N, FEATURES, generator=gen, dtype=torch.float64),
            "y": torch.rand(N, TOKENS, generator=gen, dtype=torch.float64), "mask": mask}


def token_loss(model, batch):
    per_item = F.binary_cross_entropy_with_logits(model(batch["x"]), batch["y"], reduction="none")
    return (per_item * batch["mask"]).sum(), batch["mask"].sum()


class Recorder(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def _worker(rank: int, world: int, init_file: str, out_dir: str, reduction: str, micro_batches: int):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = Recorder(model.parameters())
        calls = []
        orig_reducer_hook = ddp.require_backward_grad_sync
        batch = make_batch()
        share = {k: v.tensor_split(world)[rank] for k, v in batch.items()}

        def counting_loss(m, piece):
            calls.append(ddp.require_backward_grad_sync)  # False inside no_sync()
            return token_loss(m, piece)

        acc = GradientAccumulator(ddp, opt, micro_batches=micro_batches, reduction=reduction)
        result = acc.step(share, counting_loss)
        torch.save({"grads": opt.seen[0], "loss": result.loss, "n_items": result.n_items,
                    "sync_flags": calls, "initial_flag": orig_reducer_hook},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path, reduction):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), reduction, 3),
                       nprocs=2, join=True, start_method="spawn")
    model, batch = make_model(), make_batch()
    loss_sum, items = token_loss(model, batch)
    loss = loss_sum / items if reduction == "mean" else loss_sum
    loss.backward()
    want = [p.grad for p in model.parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        scale = max(float(w.abs().max()) for w in want)
        diff = max(float((g - w).abs().max()) for g, w in zip(got["grads"], want)) / scale
        assert diff <= 1e-6, diff
        assert float(got["n_items"]) == float(items)  # item count all-reduced: global window
        assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-9)
        assert got["sync_flags"] == [False, False, True]  # all-reduce on the last micro-batch only
