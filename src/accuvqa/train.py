"""Training: set-up, data, model, optimizer, then epochs of exact-accumulation updates on MCAN's schedule.

Reads top-down: `train(cfg)` builds everything, then loops over epochs; each update is one
`GradientAccumulator.step` (split, forward/backward per micro-batch, normalise once, clip, step);
after each epoch it saves a checkpoint and evaluates.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from accuvqa.accumulate import GradientAccumulator
from accuvqa.checkpoint import (Position, checkpoint_path, checkpoint_state, guard_new_run,
                                latest_checkpoint, load_checkpoint, resolve_checkpoint, restore_run,
                                save_run_checkpoint, step_checkpoint_path)
from accuvqa.config import Config
from accuvqa.data.loader import (batch_loader, epoch_batches, load_questions, make_dataset, sample_regions,
                                 validation_set)
from accuvqa.data.vocab import Vocab, build_vocab, checkpoint_vocab
from accuvqa.data.word_vectors import load_pretrained_embedding
from accuvqa.errors import ConfigError, DataError, Stopped
from accuvqa.evaluate import evaluate_split, record_metrics
from accuvqa.models import build_model, model_inputs
from accuvqa.runlog import RunLog, append_log, progress
from accuvqa.runtime import (Runtime, StopRequest, failure_drill, mixed_precision, rank_failures, setup_runtime,
                             to_device, unwrap)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- schedule and loss

def lr_base_at(cfg: Config, epoch: int) -> float:
    """LR_BASE after MCAN's decays: times LR_DECAY_R for each listed 0-based epoch <= `epoch`."""
    return cfg.LR_BASE * cfg.LR_DECAY_R ** sum(1 for e in cfg.LR_DECAY_LIST if epoch >= e)


def lr_at(cfg: Config, update: int, epoch: int, updates_per_epoch: float) -> float:
    """MCAN's learning rate for the `update`-th update (from 1) during 0-based `epoch`.

    Warm-up: LR_BASE x 1/4, 2/4, 3/4 over the first three epochs' worth of updates, then LR_BASE;
    LR_BASE is multiplied by LR_DECAY_R from each 0-based epoch listed in LR_DECAY_LIST on.
    """
    base = lr_base_at(cfg, epoch)
    for k in (1, 2, 3):
        if update <= int(updates_per_epoch * k):
            return base * k / 4
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


def effective_batch_text(batch_size: int, micro_batches: int, world_size: int) -> str:
    """'BATCH_SIZE 64 = 32 x 2 x 1', noting uneven micro-batches."""
    micro = math.ceil(batch_size / world_size / micro_batches)
    text = f"BATCH_SIZE {batch_size} = {micro} x {micro_batches} x {world_size}"
    if batch_size % (world_size * micro_batches):
        text += " (uneven micro-batches, exact)"
    return text


# ----------------------------------------------------------------------------- the run

def train(cfg: Config) -> dict[str, Any]:
    """Train to MAX_EPOCH epochs; checkpoint and evaluate after each (and every CKPT_EVERY_STEPS updates);
    with RESUME, continue a run exactly where its checkpoint left it. Return a summary."""
    # set-up
    rt = setup_runtime(cfg)
    if rt.is_main:
        guard_new_run(cfg)
    resume, resume_path = None, None
    if cfg.RESUME:
        resume_path = resolve_checkpoint(cfg, newest=True)
        resume = load_checkpoint(resume_path)

    # data
    train_records = load_questions(cfg, cfg.TRAIN_SPLIT, need_answers=True)  # prepare's arrays, or the JSON
    vocab = (checkpoint_vocab(cfg, resume, resume_path) if resume and "token_to_ix" in resume
             else build_vocab(cfg, train_records))
    train_set = make_dataset(cfg, train_records, vocab)
    eval_set = validation_set(cfg, vocab) if cfg.EVAL_EVERY_EPOCH else None
    n_batches = len(train_set) // cfg.BATCH_SIZE
    if n_batches == 0:
        raise ConfigError(f"BATCH_SIZE {cfg.BATCH_SIZE} is larger than the training set ({len(train_set)} questions)")

    # model, optimizer, and where the run stands
    pretrained_emb = load_pretrained_embedding(cfg, vocab.token_to_ix) if cfg.USE_GLOVE and resume is None else None
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix), pretrained_emb).to(rt.device)
    accumulator = GradientAccumulator(
        model, make_optimizer(cfg, model), micro_batches=cfg.GRAD_ACCU_STEPS, reduction=cfg.LOSS_REDUCTION,
        max_grad_norm=cfg.GRAD_NORM_CLIP if cfg.GRAD_NORM_CLIP > 0 else None, skip_nonfinite=True,
        **mixed_precision(cfg, rt.device))
    pos = Position()
    if resume is not None:
        pos = restore_run(cfg, resume, resume_path, model, accumulator, len(train_set))
        log.info("resuming from %s: %d epochs and %d updates done, %d batches into the next epoch",
                 resume_path, pos.epoch, pos.step, pos.batch)
    if rt.world_size > 1:
        accumulator.model = model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    loss_fn = make_loss_fn(cfg)
    regions = sample_regions(train_set)  # for BUCKET_WINDOW

    # the loop; config.yml, log.txt and TensorBoard events beside the metrics (first process only)
    updates_per_epoch = len(train_set) / cfg.BATCH_SIZE  # mcan-vqa's warm-up counts data_size / batch
    started, first_step, last_eval = time.perf_counter(), pos.step, None
    with StopRequest() as stop, RunLog(cfg, rt.is_main, pos.step) as runlog:
        if rt.is_main:
            log.info("train: %d questions, %d images; %d updates/epoch; %s (micro-batch x GRAD_ACCU_STEPS x "
                     "processes); %s, %.2fM parameters; device %s", len(train_set), len(train_set.image_ids), n_batches,
                     effective_batch_text(cfg.BATCH_SIZE, accumulator.micro_batches, rt.world_size), cfg.MODEL_USE,
                     sum(p.numel() for p in model.parameters()) / 1e6, rt.device)
        for epoch in range(pos.epoch, cfg.MAX_EPOCH):
            batches = epoch_batches(len(train_set), cfg, epoch, rt, regions)
            bar = progress(total=len(batches), initial=pos.batch, desc=f"epoch {epoch + 1}/{cfg.MAX_EPOCH}",
                           every=cfg.LOG_EVERY_STEPS, disable=not (rt.is_main and cfg.VERBOSE))
            epoch_start = time.perf_counter()
            # running sums stay on the device: reading them (a host sync) happens only when logging
            loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=rt.device)
            item_sum = torch.tensor(pos.item_sum, dtype=torch.float64, device=rt.device)
            for done, batch in enumerate(batch_loader(train_set, batches[pos.batch:], cfg), start=pos.batch + 1):
                pos.step += 1
                lr = lr_at(cfg, pos.step, epoch, updates_per_epoch)
                for group in accumulator.optimizer.param_groups:
                    group["lr"] = lr
                failure_drill(rt, pos.step)  # ACCUVQA_FAIL_AT: a rehearsed crash of one process
                result = accumulator.step(to_device(batch, rt.device), loss_fn)
                if result.skipped:  # its loss is inf/NaN: kept out of the running mean
                    pos.bad_updates = _count_bad_update(cfg, pos, epoch, accumulator)
                else:
                    pos.bad_updates = 0
                    loss_sum += result.loss.detach() * (1 if cfg.LOSS_REDUCTION == "sum" else result.n_items)
                    item_sum += result.n_items
                if done % cfg.LOG_EVERY_STEPS == 0 or done == len(batches):  # reading the loss syncs: not every update
                    bar.set_postfix(runlog.training(
                        pos.step, epoch, float(loss_sum) / max(float(item_sum), 1.0), lr, float(result.grad_norm),
                        (done - pos.batch) * cfg.BATCH_SIZE / (time.perf_counter() - epoch_start)))
                bar.update(1)
                stopping = stop.requested(rt)
                if done < len(batches) and (stopping or (cfg.CKPT_EVERY_STEPS and pos.step % cfg.CKPT_EVERY_STEPS == 0)):
                    mid = Position(epoch, pos.step, done, float(loss_sum), float(item_sum), pos.bad_updates)
                    path = _save(cfg, rt, step_checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, pos.step),
                                 model, accumulator, vocab, mid, epoch)
                    runlog.note(f"update {pos.step} (epoch {epoch + 1}): saved {path}")
                    if stopping:
                        bar.close()
                        _stop(stop, path, pos.step, epoch)
            bar.close()

            # checkpoint and evaluation
            seconds = time.perf_counter() - epoch_start
            epoch_train = {"train_loss": float(loss_sum) / max(float(item_sum), 1.0), "lr": lr}
            msg = (f"epoch {epoch + 1}: train loss {epoch_train['train_loss']:.4f}, {seconds:.1f} s, "
                   f"{(len(batches) - pos.batch) * cfg.BATCH_SIZE / seconds:.0f} samples/s")
            pos = Position(epoch + 1, pos.step, 0, 0.0, 0.0, pos.bad_updates)
            path = _save(cfg, rt, checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, epoch + 1),
                         model, accumulator, vocab, pos, epoch)
            if rt.is_main and eval_set is None:
                record_metrics(cfg, "train", epoch + 1, pos.step, None, None, epoch_train)
            if eval_set is not None:  # every process predicts its share; the first scores and logs
                last_eval = evaluate_split(cfg, unwrap(model), eval_set, vocab, rt.device, "val", epoch + 1, pos.step,
                                           rt, epoch_train)
            if rt.is_main and last_eval is not None:
                runlog.evaluation(last_eval)
                msg += f"; val accuracy {last_eval['accuracy']:.2f}% (" + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(last_eval["per_answer_type"].items())) + ")"
            if rt.is_main:
                log.info("%s; saved %s", msg, path)
            if stop.requested(rt):
                _stop(stop, path, pos.step, epoch)

    wall = time.perf_counter() - started
    return {"version": cfg.run_version, "epochs": cfg.MAX_EPOCH, "updates": pos.step,
            "updates_run": pos.step - first_step, "wall_time_s": wall,
            "samples_per_s": (pos.step - first_step) * cfg.BATCH_SIZE / wall if wall > 0 else 0.0,
            "effective_batch": effective_batch_text(cfg.BATCH_SIZE, accumulator.micro_batches, rt.world_size),
            "val_accuracy": last_eval["accuracy"] if last_eval else None,
            "checkpoint": str(checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, cfg.MAX_EPOCH))}


def _save(cfg: Config, rt: Runtime, path: Path, model: torch.nn.Module, accumulator: GradientAccumulator,
          vocab: Vocab, pos: Position, epoch: int) -> Path:
    """Save a resumable checkpoint on the first process; the others wait for it."""
    if rt.is_main:
        save_run_checkpoint(cfg, path, checkpoint_state(cfg, model, accumulator, vocab, pos, lr_base_at(cfg, epoch)))
    if rt.world_size > 1:
        torch.distributed.barrier()
    return path


def _count_bad_update(cfg: Config, pos: Position, epoch: int, accumulator: GradientAccumulator) -> int:
    """Log a skipped update; DataError after MAX_BAD_UPDATES in a row (fp16 overflow skips are the scaler's)."""
    if accumulator.scaler is not None:
        log.warning("update %d skipped: fp16 gradient overflow (the loss scale is lowered)", pos.step)
        return pos.bad_updates
    bad = pos.bad_updates + 1
    log.warning("update %d (epoch %d) skipped: non-finite loss or gradient (%d in a row)", pos.step, epoch + 1, bad)
    if bad >= cfg.MAX_BAD_UPDATES:
        last = latest_checkpoint(cfg.CKPTS_PATH, cfg.run_version)
        raise DataError(f"{bad} updates in a row had a non-finite loss or gradient, the last at update {pos.step} "
                        f"(epoch {epoch + 1}; MAX_BAD_UPDATES {cfg.MAX_BAD_UPDATES}); lower LR_BASE, set "
                        f"GRAD_NORM_CLIP or check the data; the last good checkpoint is {last or 'none'}")
    return bad


def _stop(stop: StopRequest, path: Path, step: int, epoch: int) -> None:
    """End the run on a signal, saying where it was saved and how to go on."""
    args, kept = sys.argv[1:], []
    while args:  # the same command line, less any RESUME already on it
        arg, args = args[0], args[1:]
        if arg == "--RESUME":
            args = args[1:]
        elif not arg.startswith("--RESUME="):
            kept.append(arg)
    command = " ".join(shlex.quote(a) for a in ["accuvqa", *kept])
    raise Stopped(f"{signal.Signals(stop.signum).name} at update {step} (epoch {epoch + 1}); saved {path}; "
                  f"continue with: {command} --RESUME True", stop.signum)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa train`: train, then print a summary (under torchrun, on the first process only)."""
    from accuvqa.cli import print_table

    with rank_failures(lambda: latest_checkpoint(cfg.CKPTS_PATH, cfg.run_version)):
        s = train(cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    append_log(cfg, print_table(f"training done: run {s['version']}", {
        "val accuracy": f"{s['val_accuracy']:.2f}%" if s["val_accuracy"] is not None else "not evaluated",
        "wall time": f"{s['wall_time_s']:.1f} s",
        "samples/s": f"{s['samples_per_s']:.0f}",
        "updates": f"{s['updates']} ({s['updates_run']} in this run)",
        "effective batch": s["effective_batch"],
        "checkpoint": s["checkpoint"],
    }))
    return 0
