"""`accuvqa check`: measure that accumulation gives the one-batch gradient on a real model and batch."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from accuvqa.accumulate import Batch, GradientAccumulator, LossFn, batch_size, split_batch
from accuvqa.config import Config
from accuvqa.data.loader import epoch_batches, load_questions, make_dataset
from accuvqa.errors import ConfigError
from accuvqa.models import build_model
from accuvqa.recipe import make_loss_fn
from accuvqa.runtime import mixed_precision, setup_runtime, to_device

TOLERANCE = 1e-4  # relative difference above which float32 accumulation is called non-equivalent
TOLERANCE_FLOAT64 = 1e-10  # the same in float64, where a model's float32 rounding exceeds TOLERANCE
# under AMP each micro-batch's products are rounded to the 16-bit format before the float32 gradients add up, where
# one batch rounds once: the difference is a few units of the format's relative rounding (bf16 2^-8, fp16 2^-11);
# four units are allowed
TOLERANCE_AMP = {"bf16": 4 * 2**-8, "fp16": 4 * 2**-11}


class _GradientCapture(torch.optim.Optimizer):
    """An optimizer that keeps a copy of the gradient it is handed and changes nothing."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor | None] = []

    def step(self, closure: Any = None) -> None:  # noqa: D102 - see class docstring
        self.grads = [None if p.grad is None else p.grad.detach().clone()
                      for g in self.param_groups for p in g["params"]]


@dataclass
class CheckRow:
    """One line of the equivalence table."""

    micro_batches: int
    micro_batch_size: str  # "32" or "21-22" when uneven
    max_abs_diff: float
    rel_diff: float
    peak_memory_mb: float | None  # CUDA: max_memory_allocated; CPU: peak RSS of the process (see peak_rss_mib)
    seconds_per_update: float


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux VmHWM) to its current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: VmHWM (since the last `reset_peak_rss`) on Linux,
    else `ru_maxrss` (the peak since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


def _gradient(model: nn.Module, batch: Batch, loss_fn: LossFn, k: int, reduction: str,
              repeats: int, amp: dict[str, Any]) -> tuple[list[torch.Tensor | None], float, float | None]:
    capture = _GradientCapture([p for p in model.parameters() if p.requires_grad])
    acc = GradientAccumulator(model, capture, micro_batches=k, reduction=reduction, **amp)
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        acc.step(batch, loss_fn)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return capture.grads, min(seconds), peak


def check_equivalence(model: nn.Module, batch: Batch, loss_fn: LossFn, counts: Sequence[int],
                      reduction: str = "sum", repeats: int = 2, amp: dict[str, Any] | None = None) -> list[CheckRow]:
    """Gradient for each micro-batch count in `counts` compared with the one-batch gradient (under
    `amp`, GradientAccumulator's autocast / scaler arguments, as training runs them)."""
    n = batch_size(batch)
    amp = amp or {}
    reference, ref_time, ref_peak = _gradient(model, batch, loss_fn, 1, reduction, repeats, amp)
    scale = max((float(g.abs().max()) for g in reference if g is not None), default=0.0) or 1.0
    rows = [CheckRow(1, str(n), 0.0, 0.0, ref_peak, ref_time)]
    for k in sorted({min(c, n) for c in counts if c > 1}):
        grads, seconds, peak = _gradient(model, batch, loss_fn, k, reduction, repeats, amp)
        diff = max((float((g - r).abs().max()) for g, r in zip(grads, reference)
                    if g is not None and r is not None), default=0.0)
        sizes = sorted({batch_size(piece) for piece in split_batch(batch, k)})
        size_text = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        rows.append(CheckRow(k, size_text, diff, diff / scale, peak, seconds))
    return rows


def equivalence_risks(model: nn.Module) -> list[str]:
    """What in this model makes micro-batches differ from one large batch."""
    risks = []
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        risks.append(f"BatchNorm layers ({', '.join(batch_norms[:3])}): statistics per micro-batch")
    rates = sorted({m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0})
    if rates:
        risks.append(f"dropout (p {', '.join(map(str, rates))}): masks are drawn per micro-batch, so training "
                     f"is equivalent in distribution, not bit for bit (this check runs with dropout off)")
    return risks


def dropout_off(model: nn.Module) -> nn.Module:
    """Set every dropout rate of `model` to 0 (the gradients compared must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def run_check(cfg: Config, dtype: torch.dtype = torch.float32) -> tuple[list[CheckRow], list[str]]:
    """On the configured model and one real batch, dropout off, compare the gradient of
    GRAD_ACCU_STEPS, 2, 4 and 8 micro-batches with the one-batch gradient (model and batch in
    `dtype`); also say what in the model makes training differ from one large batch."""
    rt = setup_runtime(cfg)
    questions = load_questions(cfg, cfg.TRAIN_SPLIT, need_answers=True)
    vocab = questions.vocab
    dataset = make_dataset(cfg, questions, vocab)
    if len(dataset) < cfg.BATCH_SIZE:
        raise ConfigError(f"BATCH_SIZE {cfg.BATCH_SIZE} is larger than the training set ({len(dataset)} questions)")
    batch = to_device(dataset[epoch_batches(len(dataset), cfg, 0, rt)[0]], rt.device)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix)).to(rt.device, dtype)
    risks = equivalence_risks(model)
    counts = [2, 4, 8] + ([cfg.GRAD_ACCU_STEPS] if isinstance(cfg.GRAD_ACCU_STEPS, int) else [])
    amp = mixed_precision(cfg, rt.device) if dtype == torch.float32 else {}  # float64 judges the model, not AMP
    rows = check_equivalence(dropout_off(model), batch, make_loss_fn(cfg), counts, cfg.LOSS_REDUCTION, amp=amp)
    return rows, risks


def format_table(rows: Sequence[CheckRow]) -> str:
    """The table `accuvqa check` prints."""
    head = f"{'micro-batches':>13}  {'micro-batch':>11}  {'max abs diff':>12}  {'rel diff':>9}  " \
           f"{'peak MiB':>8}  {'s/update':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_memory_mb:8.1f}" if r.peak_memory_mb is not None else f"{'n/a':>8}"
        lines.append(f"{r.micro_batches:>13}  {r.micro_batch_size:>11}  {r.max_abs_diff:>12.3e}  "
                     f"{r.rel_diff:>9.2e}  {peak}  {r.seconds_per_update:>8.3f}")
    return "\n".join(lines)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa check`: print the table and a verdict; exit 1 when not equivalent."""
    rows, risks = run_check(cfg)
    precision = "float32" if cfg.AMP == "off" else f"{cfg.AMP} autocast (AMP {cfg.AMP}, float32 weights and gradients)"
    print(f"gradient of one batch of {cfg.BATCH_SIZE} ({cfg.LOSS_REDUCTION} loss, dropout off) "
          f"vs the same batch in micro-batches, {precision}:")
    print(format_table(rows))
    cuda = cfg.DEVICE.startswith("cuda") or (cfg.DEVICE == "auto" and torch.cuda.is_available())
    print("peak MiB: " + ("torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (VmHWM, reset before each row where Linux allows; else "
                               "ru_maxrss, the peak since the start)") + " over that row's updates")
    for risk in risks:
        print(f"note: {risk}")
    worst = max(r.rel_diff for r in rows)
    if cfg.AMP != "off":  # what an AMP run computes, judged by its format's rounding
        tolerance = TOLERANCE_AMP[cfg.AMP]
        if worst > tolerance:
            print(f"verdict: NOT equivalent under AMP {cfg.AMP}: relative difference {worst:.2e} > {tolerance:.1e} "
                  f"(four units of {cfg.AMP}'s rounding)")
            return 1
        print(f"verdict: equivalent under AMP {cfg.AMP}: every relative difference <= {worst:.2e} (tolerance "
              f"{tolerance:.1e}: four units of {cfg.AMP}'s rounding)")
        return 0
    if worst > TOLERANCE:
        # a model whose float32 gradient is itself that sensitive to rounding (MFB's signed square
        # root near 0) is judged in float64, where rounding no longer hides what accumulation does
        rows64, _ = run_check(cfg, torch.float64)
        worst64 = max(r.rel_diff for r in rows64)
        print(f"float32 differs by {worst:.2e} > {TOLERANCE:.0e}; the same in float64:")
        print(format_table(rows64))
        if worst64 > TOLERANCE_FLOAT64:
            print(f"verdict: NOT equivalent: relative difference {worst:.2e} > {TOLERANCE:.0e} in float32, "
                  f"{worst64:.2e} > {TOLERANCE_FLOAT64:.0e} in float64")
            return 1
        print(f"verdict: equivalent in float64: every relative difference <= {worst64:.2e} (tolerance "
              f"{TOLERANCE_FLOAT64:.0e}); the float32 differences are this model's float32 rounding")
        return 0
    print(f"verdict: equivalent: every relative difference <= {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0
