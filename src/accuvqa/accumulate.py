"""Gradient accumulation that is exactly equivalent to one large batch.

Usable on any PyTorch model. One call to `GradientAccumulator.step` is one optimizer update over
one effective batch (a *window*):

1. gradients are zeroed once, at the start of the window;
2. the batch is split into `micro_batches` pieces (uneven sizes allowed), and for each piece
   `loss_fn(model, piece)` returns `(loss_sum, n_items)`: the loss *summed* over the piece's items
   and how many items there were; `loss_sum.backward()` adds into `.grad`;
3. after the last piece the summed gradient is divided by the window's total item count
   (`reduction="mean"`) or left as it is (`reduction="sum"`): this is the gradient of the whole
   batch's loss, whatever the split, because a sum of per-piece sums is the whole sum;
4. the accumulated gradient is clipped (if asked), the optimizer steps once, the scheduler once.

Dividing each piece's mean loss by k (the folklore rule) is only right when every piece holds the
same number of items; summing and dividing once by the true total is right always.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

Batch = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, int | torch.Tensor]"]


@dataclass
class StepResult:
    """What one update did. Tensors stay on the device: read them with float() when logging."""

    loss: torch.Tensor  # the window's loss, as the whole-batch loss would be (sum or mean)
    n_items: torch.Tensor  # items in the window (all micro-batches, all processes)
    grad_norm: torch.Tensor  # L2 norm of the accumulated gradient, before clipping
    micro_batches: int  # micro-batches used
    skipped: bool = False  # True when the update was not applied


def batch_size(batch: Batch) -> int:
    """Leading dimension shared by every tensor of `batch`; TypeError/ValueError otherwise."""
    tensors = _tensors(batch)
    if not tensors:
        raise ValueError("batch holds no tensors")
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"every tensor of a batch must share the leading (batch) dimension, got sizes "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    return sizes.pop()


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = list(batch.values()) if isinstance(batch, Mapping) else batch
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(
            "batch must be a tensor, or a tuple/list/dict of tensors sharing the leading "
            f"dimension; got {type(batch).__name__}"
        )
    return list(values)


def split_batch(batch: Batch, micro_batches: int) -> list[Batch]:
    """Split along dim 0 into `micro_batches` pieces whose sizes differ by at most one."""
    n = batch_size(batch)
    k = min(micro_batches, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(k)]
    if isinstance(batch, torch.Tensor):
        return [batch[s] for s in slices]
    if isinstance(batch, Mapping):
        return [{key: v[s] for key, v in batch.items()} for s in slices]
    return [type(batch)(v[s] for v in batch) for s in slices]


def _is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    # CUDA says "out of memory"; torch's CPU allocator "can't allocate memory" (or "not enough memory")
    return (oom_type is not None and isinstance(error, oom_type)) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in (
            "out of memory", "can't allocate memory", "not enough memory")))


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim(0)`); False where unavailable.

    On CPU, tensors live on the C heap: glibc keeps the pages of freed activations resident, so
    an update's peak RSS stacks on what the previous one left behind.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class GradientAccumulator:
    """Owns the micro-step loop of one update: split, backward, normalise, clip, step.

    `micro_batches`: in how many pieces each batch is computed (clamped to the batch size), or
    "auto": start at 1 and double on out-of-memory, redoing the window (the batch never changes).
    `reduction`: "sum" (the window's loss is the sum over its items, as MCAN's BCE) or "mean"
    (divided by the window's total item count, over all micro-batches and processes).
    `max_grad_norm`: clip the accumulated gradient to this L2 norm (None or <= 0: off).
    `scaler`: a `torch.amp.GradScaler` for fp16: every micro-step is scaled, the gradient unscaled
    once before clipping, and the update skipped (`StepResult.skipped`) on inf/NaN.
    `autocast_dtype`: run each forward under `torch.autocast` with this dtype (bf16 or fp16).
    `scheduler`: stepped once per applied update, after the optimizer.
    `trim_memory`: after every update, hand freed heap pages back to the system (CPU; see
    `release_freed_memory`).
    `skip_nonfinite`: when the window's loss or accumulated gradient is inf/NaN, apply nothing
    (`StepResult.skipped`): the weights, the optimizer's moments and the scheduler stay as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batches: int | str = 1,
        reduction: str = "sum",
        max_grad_norm: float | None = None,
        scaler: Any = None,
        autocast_dtype: torch.dtype | None = None,
        scheduler: Any = None,
        skip_nonfinite: bool = False,
        trim_memory: bool = False,
    ) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.auto = micro_batches == "auto"
        if not self.auto and (isinstance(micro_batches, bool) or not isinstance(micro_batches, int)
                              or micro_batches < 1):
            raise ValueError(f"micro_batches must be an integer >= 1 or 'auto', got {micro_batches!r}")
        self.model = model
        self.optimizer = optimizer
        self.micro_batches = 1 if self.auto else int(micro_batches)
        self.reduction = reduction
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.autocast_dtype = autocast_dtype
        self.scheduler = scheduler
        self.skip_nonfinite = skip_nonfinite
        self.trim_memory = trim_memory
        self._warned_unused = False
        batch_norms = [name for name, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            warnings.warn(
                f"the model has BatchNorm layers ({', '.join(batch_norms[:3])}"
                f"{', ...' if len(batch_norms) > 3 else ''}): their batch statistics depend on the "
                f"micro-batch size, so accumulation is not exactly equivalent to one large batch; "
                f"use LayerNorm/GroupNorm, or SyncBatchNorm statistics over the whole window", stacklevel=2)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        # DistributedDataParallel all-reduces on every backward unless told not to.
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def _autocast(self, batch: Batch) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = _tensors(batch)[0].device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _check_no_stray_gradients(self) -> None:
        stray = [p for p in self._params() if p.grad is not None]
        if stray:
            raise RuntimeError(
                f"{len(stray)} parameters already hold gradients when an update starts: a backward() "
                f"ran outside GradientAccumulator.step and would be silently mixed into or dropped from "
                f"the update; call optimizer.zero_grad(set_to_none=True) before step(), and let step() "
                f"run every backward of the window")

    def accumulate(self, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Add the summed-loss gradient of every micro-batch into `.grad` (zeroed beforehand).

        Returns (summed loss, item count, micro-batches used), local to this process.
        """
        pieces = split_batch(batch, self.micro_batches)
        loss_total = torch.zeros(())
        items_total = torch.zeros((), dtype=torch.float64)
        for i, piece in enumerate(pieces):
            with self._sync_context(last=i == len(pieces) - 1):
                with self._autocast(piece):
                    loss_sum, n_items = loss_fn(self.model, piece)
                if not isinstance(loss_sum, torch.Tensor) or loss_sum.dim() != 0:
                    shape = tuple(loss_sum.shape) if isinstance(loss_sum, torch.Tensor) else type(loss_sum).__name__
                    raise ValueError(
                        f"loss_fn must return a scalar loss summed over the micro-batch, got {shape}; "
                        f"sum it (reduction='sum') and return it with the item count")
                (self.scaler.scale(loss_sum) if self.scaler is not None else loss_sum).backward()
            if loss_total.device != loss_sum.device:
                loss_total = loss_total.to(loss_sum.device)
                items_total = items_total.to(loss_sum.device)
            loss_total = loss_total + loss_sum.detach()  # float32 at least, float64 if the loss is
            items_total = items_total + n_items
        return loss_total, items_total, len(pieces)

    def _accumulate_with_retry(self, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = batch_size(batch)
        while True:
            try:
                return self.accumulate(batch, loss_fn)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                if not (self.auto and _is_oom(error)) or self.micro_batches >= n:
                    raise
            # Free what the failed window held and redo it from zeroed gradients in smaller pieces.
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failed_size = math.ceil(n / self.micro_batches)
            self.micro_batches = min(self.micro_batches * 2, n)
            log.warning("out of memory with micro-batches of %d samples: now %d micro-batches per update",
                        failed_size, self.micro_batches)

    def step(self, batch: Batch, loss_fn: LossFn) -> StepResult:
        """One optimizer update over `batch`, computed in micro-batches."""
        self._check_no_stray_gradients()
        loss_total, items_total, used = self._accumulate_with_retry(batch, loss_fn)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP averaged the gradients over processes; the item count must be global too.
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(items_total)
            torch.distributed.all_reduce(loss_total)
        if float(items_total) <= 0:  # one host sync per update, never per micro-step
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError("the window has no items (n_items summed to 0): nothing to learn from; "
                             "check loss_fn's item count and the batch's padding")
        if self.reduction == "mean":
            # One scale of the summed gradient: world / N_global turns the DDP average into the mean.
            grad_scale = world / items_total
            loss = loss_total / items_total
        else:
            grad_scale = torch.full_like(items_total, float(world))
            loss = loss_total
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # once per update, before clipping
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        self._warn_unused(params)
        grad_norm = torch.zeros((), device=loss.device)
        if grads:
            norm_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
            # Norm of the summed gradient, times the scale: one read pass over the gradients ...
            grad_norm = torch.linalg.vector_norm(torch.stack(
                torch._foreach_norm(grads, 2, dtype=norm_dtype))) * grad_scale.to(norm_dtype)
            total_scale = grad_scale.to(norm_dtype)
            if self.max_grad_norm is not None:
                total_scale = total_scale * torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
            # ... and at most one write pass: normalisation and clipping in a single multiply.
            if self.max_grad_norm is not None or self.reduction == "mean" or world > 1:
                torch._foreach_mul_(grads, total_scale.to(grads[0].device, grads[0].dtype))
        skipped = False
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step when the gradient holds inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        elif self.skip_nonfinite and not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            skipped = True  # one more host sync per update, only when asked for
        else:
            self.optimizer.step()
        if self.scheduler is not None and not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next window
        if self.trim_memory:
            release_freed_memory()
        return StepResult(loss=loss, n_items=items_total, grad_norm=grad_norm, micro_batches=used,
                          skipped=skipped)

    def _warn_unused(self, params: list[torch.Tensor]) -> None:
        if self._warned_unused:
            return
        unused = [p for p in params if p.requires_grad and p.grad is None]
        if unused:
            self._warned_unused = True
            names = {id(p): n for n, p in self.model.named_parameters()}
            listed = ", ".join(names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in unused[:5])
            warnings.warn(
                f"{len(unused)} parameters with requires_grad got no gradient in this update "
                f"({listed}{', ...' if len(unused) > 5 else ''}): they are not used by loss_fn; "
                f"freeze them (requires_grad=False) or check the model's forward", stacklevel=3)
