"""What MCAN-small keeps for backward, per sample and per kind of module, with and without the written-out
backward passes of its LayerNorm and ReLU + dropout (`accuvqa.models.layers`).

    .venv/bin/python benchmarks/saved_activations.py [--batch-size 8] [--regions 100] [--tokens 14]

One training-mode forward pass of MCAN-small (`configs/small.yml`, built for 20,573 tokens and 3,129
answers) on random inputs of the given shape, under `torch.autograd.graph.saved_tensors_hooks`:
every tensor autograd keeps for backward (parameters aside) is counted once (by storage) and charged
to the innermost module of a named kind that was running when it was saved. "formulas" runs the
original formulas through plain autograd (`plain_autograd`: LayerNorm's formula; FC's linear,
in-place ReLU and dropout module), as before the written-out backward passes; "accuvqa" is the
model as it trains. Unlike peak RSS, this does not depend on the allocator.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from accuvqa.config import load_config
from accuvqa.models import build_model
from accuvqa.models.layers import FC, MHAtt, SA, SGA, AttFlat, LayerNorm, plain_autograd

ROOT = Path(__file__).resolve().parents[1]


REST = "rest (embedding, LSTM, image linear, classifier)"


def kind(module: torch.nn.Module) -> str:
    """The row a module's saved tensors are charged to (REST: the enclosing module's row)."""
    for cls, name in ((LayerNorm, "LayerNorm"), (FC, "FFN / AttFlat hidden (linear, ReLU, dropout)"),
                      (MHAtt, "attention (projections, SDPA, merge)"), (AttFlat, "AttFlat, other"),
                      (SA, "SA / SGA, other (residual dropout)"), (SGA, "SA / SGA, other (residual dropout)")):
        if isinstance(module, cls):
            return name
    return REST


def measure(formulas: bool, batch: int, regions: int, tokens: int) -> dict[str, int]:
    cfg = load_config(ROOT / "configs/small.yml", {"DATASET": "vqa"})
    torch.manual_seed(0)
    model = build_model(cfg, 20573, 3129).train()
    if formulas:
        plain_autograd(model)
    stack: list[str] = [REST]
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, inp: stack.append(
            stack[-1] if kind(mod) == REST else kind(mod)) and None)
        m.register_forward_hook(lambda mod, inp, out: stack.pop() and None)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in parameters and ptr not in seen:
            seen[ptr] = (stack[-1], t.untyped_storage().nbytes())
        return t

    gen = torch.Generator().manual_seed(1)
    img = torch.randn(batch, regions, cfg.IMG_FEAT_SIZE, generator=gen)
    ques = torch.randint(1, 20573, (batch, tokens), generator=gen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(img, ques)
    rows: dict[str, int] = defaultdict(int)
    for name, nbytes in seen.values():
        rows[name] += nbytes
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=14)
    args = parser.parse_args()
    before = measure(True, args.batch_size, args.regions, args.tokens)
    after = measure(False, args.batch_size, args.regions, args.tokens)
    mib = 2.0**20 * args.batch_size
    print(f"kept for backward, MiB per sample ({args.regions} regions, {args.tokens} tokens, batch "
          f"{args.batch_size}, the batch's input features included)")
    print(f"{'module':>68}  {'formulas':>8}  {'accuvqa':>8}  {'ratio':>6}")
    for name in sorted(set(before) | set(after), key=lambda n: -before.get(n, 0)):
        b, a = before.get(name, 0) / mib, after.get(name, 0) / mib
        print(f"{name:>68}  {b:8.2f}  {a:8.2f}  {a / b if b else float('nan'):6.3f}")
    b, a = sum(before.values()) / mib, sum(after.values()) / mib
    print(f"{'total':>68}  {b:8.2f}  {a:8.2f}  {a / b:6.3f}")


if __name__ == "__main__":
    main()
