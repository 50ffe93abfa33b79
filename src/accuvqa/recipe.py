"""The training recipe, what `train` and `check` share: MCAN's learning-rate schedule (warm-up, then
decays), the loss (LOSS_FUNC, LOSS_REDUCTION) and the optimizer (OPT, OPT_PARAMS)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from accuvqa.config import Config
from accuvqa.models import model_inputs


def lr_base_at(cfg: Config, epoch: int) -> float:
    """LR_BASE after MCAN's decays: times LR_DECAY_R for each listed 0-based epoch <= `epoch`."""
    return cfg.LR_BASE * cfg.LR_DECAY_R ** sum(1 for e in cfg.LR_DECAY_LIST if epoch >= e)


def lr_at(cfg: Config, update: int, epoch: int, updates_per_epoch: float) -> float:
    """MCAN's learning rate for the `update`-th update (from 1) during 0-based `epoch`.

    Warm-up, as openvqa's WarmupOptimizer counts it with W = WARMUP_EPOCH: LR_BASE x k/(W+1) while `update`
    is at most int(updates_per_epoch x (W+1) x 0.25k), for k = 1, 2, 3; then LR_BASE. W = 3 is mcan-vqa's fixed
    1/4, 2/4, 3/4 over the first three epochs; W = 0 is no warm-up (openvqa's formula would step to 2 and 3
    times LR_BASE there, as it would to 1.5 times at W = 1, so the factor is capped at 1). LR_BASE is
    multiplied by LR_DECAY_R from each 0-based epoch listed in LR_DECAY_LIST on.
    """
    base = lr_base_at(cfg, epoch)
    warmup = cfg.WARMUP_EPOCH
    for k in (1, 2, 3):
        if update <= int(updates_per_epoch * (warmup + 1) * (0.25 * k)):
            return base * min(k / (warmup + 1), 1.0)
    return base


def make_loss_fn(cfg: Config) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]:
    """The LOSS_FUNC loss, summed over the batch; items counted for `mean`. bce (MCAN): BCE-with-logits
    on the soft answer scores; kld (openvqa's MFB/MFH): KL divergence of the log-softmax of the
    logits from the soft scores normalised to sum 1 per question."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(*model_inputs(cfg, batch))
        target = batch["answer_scores"]
        if cfg.LOSS_FUNC == "kld":
            # a question with no answer in the dictionary keeps an all-zero target: it adds nothing
            answer_dist = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)
            loss_sum = F.kl_div(F.log_softmax(logits, dim=1), answer_dist, reduction="sum")
        else:
            loss_sum = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        # sum: the loss is a sum over samples and answers; mean: over every (sample, answer) item.
        return loss_sum, (target.numel() if cfg.LOSS_REDUCTION == "mean" else target.shape[0])

    return loss_fn


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.<OPT> with OPT_PARAMS; OPT_BETAS / OPT_EPS for optimizers that take betas / eps.

    The fused implementation (one kernel per parameter for the whole update) is used where OPT has one
    and every parameter is a floating tensor on the CPU or a CUDA device, unless OPT_PARAMS names
    `fused` or `foreach`; otherwise the foreach one. Both compute the same update up to rounding
    (tests/test_optimizer.py); the fused one is faster (docs/benchmarks.md, "Levers")."""
    opt = getattr(torch.optim, cfg.OPT)
    accepted = inspect.signature(opt).parameters
    user = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.OPT_PARAMS.items()}
    params: dict[str, Any] = {"betas": cfg.OPT_BETAS, "eps": cfg.OPT_EPS}
    if "fused" in accepted and not {"fused", "foreach"} & user.keys() and _fusable(model):
        params["fused"] = True
    else:
        params["foreach"] = True
    params = {k: v for k, v in params.items() if k in accepted}
    params.update(user)
    return opt(model.parameters(), lr=cfg.LR_BASE, **params)


def _fusable(model: torch.nn.Module) -> bool:
    """Every parameter a floating tensor on the CPU or a CUDA device (what torch's fused optimizers take)."""
    params = list(model.parameters())
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
