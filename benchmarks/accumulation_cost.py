"""Seconds per update of MCAN-small at VQA v2 shapes, k=1 vs k micro-batches, CPU.

    .venv/bin/python benchmarks/accumulation_cost.py [--updates 12] [--warmup 2] [--ks 4 2] [--threads 2]

Random batches with VQA v2's shapes (no data files): BATCH_SIZE 64 questions, each image with N
regions drawn from 10..100, zero-padded to the batch's longest as accuvqa's loader does;
questions of 4..14 tokens (ids in 1..20,572) zero-padded to the batch's longest; soft answer
scores over 3,129 answers (1 to 3 answers per question with scores 0.3/0.6/0.9/1.0). The model,
loss and optimizer are accuvqa's (`build_model`, `make_loss_fn`, `make_optimizer`) of
`load_config("small")`; updates go through `GradientAccumulator(..., reduction="sum").step`.

k=1 and each other k run on their own copy of the model (same initial weights), alternating
update by update on the same sequence of batches (k=1, k=K, k=1, ...; which goes first alternates
too); the median seconds per update of each, samples/s and the ratio (k=K / k=1) are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from accuvqa.accumulate import GradientAccumulator
from accuvqa.config import load_config
from accuvqa.models import build_model
from accuvqa.recipe import make_loss_fn, make_optimizer

TOKENS, ANSWERS = 20573, 3129


def make_batch(cfg, gen: torch.Generator, batch: int, n_regions: int | None = None,
               n_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """One VQA v2-shaped batch; n_regions / n_tokens fixed for every sample when given."""
    d = cfg.IMG_FEAT_SIZE
    counts = (torch.full((batch,), n_regions) if n_regions is not None
              else torch.randint(10, cfg.IMG_FEAT_PAD_SIZE + 1, (batch,), generator=gen))
    img = torch.zeros(batch, int(counts.max()), d)
    for i, n in enumerate(counts.tolist()):
        img[i, :n] = torch.randn(n, d, generator=gen).abs() * 0.5
    lengths = (torch.full((batch,), n_tokens) if n_tokens is not None
               else torch.randint(4, cfg.MAX_TOKEN + 1, (batch,), generator=gen))
    ques = torch.zeros(batch, int(lengths.max()), dtype=torch.int64)
    for i, t in enumerate(lengths.tolist()):
        ques[i, :t] = torch.randint(1, TOKENS, (t,), generator=gen)
    scores = torch.zeros(batch, ANSWERS)
    levels = torch.tensor([0.3, 0.6, 0.9, 1.0])
    for i in range(batch):
        m = int(torch.randint(1, 4, (1,), generator=gen))
        idx = torch.randint(0, ANSWERS, (m,), generator=gen)
        scores[i, idx] = levels[torch.randint(0, 4, (m,), generator=gen)]
    return {"img_feat": img, "ques_ix": ques, "answer_scores": scores}


def make_runner(cfg, k: int):
    torch.manual_seed(0)
    model = build_model(cfg, TOKENS, ANSWERS)
    model.train()
    optimizer = make_optimizer(cfg, model)
    return GradientAccumulator(model, optimizer, micro_batches=k, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=12, help="timed updates of each kind per k")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates of each kind first")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 2], help="micro-batch counts compared with 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("small")
    loss_fn = make_loss_fn(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(cfg, gen, cfg.BATCH_SIZE) for _ in range(args.batches)]
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, python {platform.python_version()}, {cpu}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"MCAN-small: LAYER {cfg.LAYER}, HIDDEN_SIZE {cfg.HIDDEN_SIZE}, DROPOUT_R {cfg.DROPOUT_R}, "
          f"{cfg.OPT}; BATCH_SIZE {cfg.BATCH_SIZE}; batch shapes (N regions, T tokens): "
          + ", ".join(f"({b['img_feat'].shape[1]},{b['ques_ix'].shape[1]})" for b in batches))
    print(f"{args.warmup} warm-up + {args.updates} timed updates of each kind, alternating update by update")
    print(f"{'k':>3}  {'micro':>5}  {'k=1 s/upd':>9}  {'k=K s/upd':>9}  {'k=1 smp/s':>9}  {'k=K smp/s':>9}  "
          f"{'ratio K/1':>9}  {'K min-max s':>13}")
    for k in args.ks:
        runners = {1: make_runner(cfg, 1), k: make_runner(cfg, k)} if k != 1 else {}
        times: dict[int, list[float]] = {1: [], k: []}
        start_all = time.perf_counter()
        for i in range(args.updates + args.warmup):
            batch = batches[i % len(batches)]
            for which in ((1, k) if i % 2 == 0 else (k, 1)):
                start = time.perf_counter()
                runners[which].step(batch, loss_fn)
                if i >= args.warmup:
                    times[which].append(time.perf_counter() - start)
        one, kk = statistics.median(times[1]), statistics.median(times[k])
        b = cfg.BATCH_SIZE
        print(f"{k:>3}  {b // k:>5}  {one:>9.3f}  {kk:>9.3f}  {b / one:>9.1f}  {b / kk:>9.1f}  {kk / one:>9.3f}  "
              f"{min(times[k]):>6.3f}-{max(times[k]):<6.3f}", flush=True)
        print(f"     k=1 min-max {min(times[1]):.3f}-{max(times[1]):.3f} s; this k took "
              f"{time.perf_counter() - start_all:.0f} s wall; load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
