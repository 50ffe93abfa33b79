"""Under a memory cap, which BATCH_SIZE trains MCAN-small with GRAD_ACCU_STEPS 1 and with `auto`.

    .venv/bin/python benchmarks/auto_batch_memory.py [--cap-mib 4096] [--batch-sizes 32 64 128 256] [--ks 1 auto] [--threads 2]

Each (BATCH_SIZE, GRAD_ACCU_STEPS) runs in a fresh process: build `load_config("small")`'s model
(`build_model(cfg, 20573, 3129)`), `make_optimizer`, `make_loss_fn` and one worst-case batch
(every image 100 regions, every question 14 tokens), run one warm-up matrix product (so torch's
threads exist), then cap the process's address space with `RLIMIT_AS` = --cap-mib and run 2
updates through `GradientAccumulator(..., micro_batches=k or "auto")`. On CPU an allocation past
the cap fails in torch's allocator ("can't allocate memory"), which `auto` treats as out of
memory: it halves the micro-batch and redoes the window. Printed per run: trained or the error,
the micro-batches used, the peak RSS (VmHWM) and the address space (VmPeak) in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def status_mib(keys: tuple[str, ...] = ("VmHWM", "VmPeak", "VmSize")) -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024
    return out


def child(batch_size: int, k: str, cap_mib: int, threads: int) -> dict:
    import logging

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from accumulation_cost import ANSWERS, TOKENS, make_batch
    from accuvqa.accumulate import GradientAccumulator
    from accuvqa.config import load_config
    from accuvqa.models import build_model
    from accuvqa.recipe import make_loss_fn, make_optimizer

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(threads)
    cfg = load_config("small", {"BATCH_SIZE": batch_size})
    torch.manual_seed(0)
    model = build_model(cfg, TOKENS, ANSWERS).train()
    optimizer = make_optimizer(cfg, model)
    batch = make_batch(cfg, torch.Generator().manual_seed(0), batch_size, n_regions=cfg.IMG_FEAT_PAD_SIZE,
                       n_tokens=cfg.MAX_TOKEN)
    torch.randn(256, 256) @ torch.randn(256, 256)  # start torch's threads before the cap
    base = status_mib()
    resource.setrlimit(resource.RLIMIT_AS, (cap_mib * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    engine = GradientAccumulator(model, optimizer, micro_batches=k if k == "auto" else int(k), reduction="sum")
    try:
        for _ in range(2):
            engine.step(batch, make_loss_fn(cfg))
        outcome = "trained"
    except (RuntimeError, MemoryError) as e:
        outcome = "failed: " + str(e).split("DefaultCPUAllocator: ")[-1][:60]
    return {"outcome": outcome, "micro_batches": engine.micro_batches, "base": base, "end": status_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mib", type=int, default=4096, help="RLIMIT_AS (address space) in MiB")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", nargs="+", default=["1", "auto"], choices=["1", "auto"],
                        help="GRAD_ACCU_STEPS settings to run for each BATCH_SIZE")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.cap_mib, args.threads)))
        return
    print(f"cap: RLIMIT_AS {args.cap_mib} MiB; MCAN-small, worst-case batches (100 regions, 14 tokens), 2 updates")
    print(f"{'BATCH_SIZE':>10}  {'GRAD_ACCU_STEPS':>15}  {'outcome':<40}  {'micro-batches':>13}  "
          f"{'base VmSize':>11}  {'peak RSS':>8}  {'VmPeak':>7}")
    largest: dict[str, int] = {}
    for batch_size in args.batch_sizes:
        for k in args.ks:
            done = subprocess.run([sys.executable, __file__, "--child", str(batch_size), k, "--cap-mib",
                                   str(args.cap_mib), "--threads", str(args.threads)], capture_output=True, text=True)
            if done.returncode != 0:
                r = {"outcome": f"process died ({done.returncode})", "micro_batches": "-", "base": {}, "end": {}}
            else:
                r = json.loads(done.stdout.strip().splitlines()[-1])
            if r["outcome"] == "trained":
                largest[k] = max(largest.get(k, 0), batch_size)
            print(f"{batch_size:>10}  {k:>15}  {r['outcome']:<40}  {r['micro_batches']:>13}  "
                  f"{r['base'].get('VmSize', 0):>11.0f}  {r['end'].get('VmHWM', 0):>8.0f}  "
                  f"{r['end'].get('VmPeak', 0):>7.0f}", flush=True)
    print(f"largest BATCH_SIZE that trained: GRAD_ACCU_STEPS 1: {largest.get('1', 'none')}, "
          f"auto: {largest.get('auto', 'none')} (of {args.batch_sizes})")


if __name__ == "__main__":
    main()
