"""Time per update of GradientAccumulator vs a minimal hand-written correct loop, same model.

    .venv/bin/python benchmarks/accumulation_overhead.py [--config configs/easyvqa.yml] [--updates 150]

Both run MCAN of the given config on the same random batches (BATCH_SIZE samples, the config's
feature and token sizes), `sum` loss, Adam. Rounds alternate engine and hand loop so that drift
of the machine affects both; the ratio of medians is printed (engine / hand; 1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from accuvqa.accumulate import GradientAccumulator, split_batch
from accuvqa.config import load_config
from accuvqa.models import build_model

TOKENS, ANSWERS = 200, 13


def make_batch(cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = cfg.BATCH_SIZE
    return {"img_feat": torch.randn(b, cfg.IMG_FEAT_PAD_SIZE, cfg.IMG_FEAT_SIZE, generator=gen),
            "ques_ix": torch.randint(1, TOKENS, (b, 10), generator=gen),
            "answer_scores": torch.rand(b, ANSWERS, generator=gen)}


def loss_fn(model, batch):
    logits = model(batch["img_feat"], batch["ques_ix"])
    return F.binary_cross_entropy_with_logits(logits, batch["answer_scores"], reduction="sum"), len(logits)


def hand_loop(model, optimizer, batch, k: int) -> None:
    """The minimal correct loop: zero once, sum-loss backward per micro-batch, one step."""
    optimizer.zero_grad(set_to_none=True)
    for piece in split_batch(batch, k):
        loss_fn(model, piece)[0].backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/easyvqa.yml")
    parser.add_argument("--updates", type=int, default=150, help="timed updates of each kind per k")
    args = parser.parse_args()
    cfg = load_config(args.config, {"DROPOUT_R": 0})
    if cfg.NUM_THREADS:
        torch.set_num_threads(cfg.NUM_THREADS)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(cfg, gen) for _ in range(10)]
    print(f"MCAN {cfg.LAYER}+{cfg.LAYER} layers, hidden {cfg.HIDDEN_SIZE}, batch {cfg.BATCH_SIZE}, "
          f"{args.updates} updates of each kind, alternating, {torch.get_num_threads()} threads")
    print(f"{'k':>3}  {'hand s/update':>13}  {'engine s/update':>15}  {'ratio':>6}")
    for k in (1, 4):
        runners = {}
        for name in ("hand", "engine"):
            torch.manual_seed(0)
            model = build_model(cfg, TOKENS, ANSWERS)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
            engine = GradientAccumulator(model, optimizer, micro_batches=k)
            runners[name] = (lambda b, m=model, o=optimizer: hand_loop(m, o, b, k)) if name == "hand" \
                else (lambda b, e=engine: e.step(b, loss_fn))
        times = {"hand": [], "engine": []}
        for i in range(args.updates + 10):  # the first 10 of each warm up
            batch = batches[i % len(batches)]
            for name in ("hand", "engine") if i % 2 else ("engine", "hand"):  # alternate who goes first
                start = time.perf_counter()
                runners[name](batch)
                if i >= 10:
                    times[name].append(time.perf_counter() - start)
        hand, eng = statistics.median(times["hand"]), statistics.median(times["engine"])
        print(f"{k:>3}  {hand:>13.4f}  {eng:>15.4f}  {eng / hand:>6.3f}")


if __name__ == "__main__":
    main()
