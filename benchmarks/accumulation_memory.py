"""Peak memory (CPU RSS) of MCAN-small updates at VQA v2 shapes for several GRAD_ACCU_STEPS.

    .venv/bin/python benchmarks/accumulation_memory.py [--ks 1 2 4 8 64] [--updates 2] [--threads 2]

Each k runs in a fresh subprocess (so no peak carries over): build `load_config("small")`'s
model (`build_model(cfg, 20573, 3129)`), `make_optimizer`, `make_loss_fn` and one worst-case
BATCH_SIZE 64 batch (every image 100 regions, every question 14 tokens, soft scores over 3,129
answers), read the baseline, then run `--updates` updates through
`GradientAccumulator(model, optimizer, micro_batches=k, reduction="sum").step` and read the peak.
Peak = VmHWM of /proc/self/status (= ru_maxrss on Linux), current = VmRSS, in MiB.
Activation(k) = peak(k) - peak(k=64) (k=64: one sample per micro-batch); the ratio
activation(8) / activation(1) is printed (ideal (64/8 - 1) / (64 - 1) = 7/63 = 0.111).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys


def status_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def child(k: int, updates: int, threads: int, trim: bool = False) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from accumulation_cost import ANSWERS, TOKENS, make_batch
    from accuvqa.accumulate import GradientAccumulator
    from accuvqa.config import load_config
    from accuvqa.models import build_model
    from accuvqa.recipe import make_loss_fn, make_optimizer

    torch.set_num_threads(threads)
    cfg = load_config("small")
    torch.manual_seed(0)
    model = build_model(cfg, TOKENS, ANSWERS)
    model.train()
    optimizer = make_optimizer(cfg, model)
    loss_fn = make_loss_fn(cfg)
    batch = make_batch(cfg, torch.Generator().manual_seed(0), cfg.BATCH_SIZE,
                       n_regions=cfg.IMG_FEAT_PAD_SIZE, n_tokens=cfg.MAX_TOKEN)
    engine = GradientAccumulator(model, optimizer, micro_batches=k, reduction="sum", trim_memory=trim)
    n_params = sum(p.numel() for p in model.parameters())
    base = status_mib()
    per_update = []
    for _ in range(updates):
        engine.step(batch, loss_fn)
        per_update.append(status_mib())
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"k": k, "params": n_params, "base": base, "updates": per_update, "maxrss": maxrss,
                      "shape": list(batch["img_feat"].shape) + [batch["ques_ix"].shape[1]]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trim", action="store_true",
                        help="GradientAccumulator(trim_memory=True): free heap pages returned after every update")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.updates, args.threads, args.trim)
        return
    import torch
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads; MiB = 2**20 bytes; {args.updates} updates per fresh process"
          + ("; trim_memory on" if args.trim else ""))
    rows = {}
    for k in args.ks:
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--updates", str(args.updates),
                              "--threads", str(args.threads), *(["--trim"] if args.trim else [])], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[k] = r
        if len(rows) == 1:
            print(f"params {r['params']:,} ({r['params'] * 4 / 2**20:.0f} MiB float32); batch img_feat "
                  f"{tuple(r['shape'][:3])}, ques_ix (64, {r['shape'][3]})")
            print(f"{'k':>3}  {'micro':>5}  {'base RSS':>8}  {'base HWM':>8}  "
                  + "  ".join(f"{'HWM upd' + str(i + 1):>9}  {'RSS upd' + str(i + 1):>9}"
                              for i in range(args.updates)) + f"  {'peak':>8}")
        print(f"{k:>3}  {64 // k:>5}  {r['base']['VmRSS']:>8.0f}  {r['base']['VmHWM']:>8.0f}  "
              + "  ".join(f"{u['VmHWM']:>9.0f}  {u['VmRSS']:>9.0f}" for u in r["updates"])
              + f"  {r['maxrss']:>8.0f}", flush=True)
    ref = max(rows)
    print(f"\nactivation(k) = peak(k) - peak(k={ref}), MiB; ideal(k) = activation(1) * (64/k - 1) / 63")
    act = {k: rows[k]["maxrss"] - rows[ref]["maxrss"] for k in rows}
    for k in rows:
        ideal = act[1] * (64 / k - 1) / 63 if 1 in act else float("nan")
        print(f"{k:>3}  {act[k]:>8.0f}  ideal {ideal:>8.0f}")
    if 1 in act and 8 in act and act[1] > 0:
        print(f"activation(8) / activation(1) = {act[8] / act[1]:.3f} (ideal 7/63 = {7 / 63:.3f}, goal <= 0.14)")


if __name__ == "__main__":
    main()
