"""Training: set-up, data, model, optimizer, then epochs of exact-accumulation updates on MCAN's schedule.

Reads top-down: `train(cfg)` builds everything, then loops over epochs; each update is one
`GradientAccumulator.step` (split, forward/backward per micro-batch, normalise once, clip, step);
after each epoch it saves a checkpoint and evaluates.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from accuvqa.accumulate import GradientAccumulator
from accuvqa.checkpoint import (checkpoint_path, guard_new_run, latest_checkpoint, load_checkpoint,
                                last_good_checkpoint, resolve_checkpoint, save_run_checkpoint,
                                step_checkpoint_path)
from accuvqa.config import Config
from accuvqa.data.loader import (batch_loader, epoch_batches, load_questions, make_dataset, run_vocab, sample_regions,
                                 validation_set)
from accuvqa.data.dataset import VQADataset
from accuvqa.data.word_vectors import load_pretrained_embedding
from accuvqa.errors import CheckpointError, ConfigError, DataError, Stopped
from accuvqa.evaluate import evaluate_split, record_metrics
from accuvqa.launch import without_option
from accuvqa.models import build_model
from accuvqa.recipe import lr_at, lr_base_at, make_loss_fn, make_optimizer
from accuvqa.resume import Position, RunningLoss, checkpoint_state, restore_run
from accuvqa.runlog import RunLog, append_log, print_table, progress
from accuvqa.runtime import (GroupStop, Runtime, StopRequest, failure_drill, mixed_precision, native_bf16_flags,
                             rank_failures, setup_runtime, to_device, unwrap)

log = logging.getLogger(__name__)


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
        resume_path = resolve_checkpoint(cfg, "checkpoint to resume")
        try:
            resume = load_checkpoint(resume_path)
        except CheckpointError as e:
            good = last_good_checkpoint(resume_path)
            raise CheckpointError(f"{e}; the last good checkpoint of the run is "
                                  + (f"{good}: resume from it with --CKPT_PATH {good}" if good else "none")) from e

    # data
    train_records = load_questions(cfg, cfg.TRAIN_SPLIT, need_answers=True)  # from the question store
    vocab = run_vocab(cfg, resume, resume_path)  # the checkpoint's dictionaries, else the question store's
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
                 resume_path, pos.epoch, pos.step, pos.batches_done)
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
            bf16 = native_bf16_flags() if rt.device.type == "cpu" and cfg.AMP == "off" else []
            if bf16:  # a hint, never a switch
                log.info("this CPU computes bf16 natively (%s): --AMP bf16 may train faster; it changes the numerics "
                         "(docs/hardware.md)", ", ".join(bf16))
        for epoch in range(pos.epoch, cfg.MAX_EPOCH):
            batches = epoch_batches(len(train_set), cfg, epoch, rt, regions)
            bar = progress(total=len(batches), initial=pos.batches_done, desc=f"epoch {epoch + 1}/{cfg.MAX_EPOCH}",
                           every=cfg.LOG_EVERY_STEPS, disable=not (rt.is_main and cfg.VERBOSE))
            epoch_start = time.perf_counter()
            running = RunningLoss(pos, cfg.LOSS_REDUCTION, rt.device)
            already = done = pos.batches_done  # batches of this epoch done before a mid-epoch resume
            for done, batch in enumerate(batch_loader(train_set, batches[already:], cfg), start=already + 1):
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
                    running.add(result.loss, result.n_items)
                if done % cfg.LOG_EVERY_STEPS == 0 or done == len(batches):  # reading the loss syncs: not every update
                    bar.set_postfix(runlog.training(
                        pos.step, epoch, running.mean(), lr, float(result.grad_norm),
                        (done - already) * cfg.BATCH_SIZE / (time.perf_counter() - epoch_start)))
                bar.update(1)
                stopping = stop.requested(rt)
                if done < len(batches) and (stopping or (cfg.CKPT_EVERY_STEPS and pos.step % cfg.CKPT_EVERY_STEPS == 0)):
                    path = _save(cfg, rt, step_checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, pos.step),
                                 model, accumulator, train_set, running.at(pos, done), epoch)
                    runlog.note(f"update {pos.step} (epoch {epoch + 1}): saved {path}")
                    if stopping:
                        bar.close()
                        _stop(stop, path, pos.step, epoch)
            if done < len(batches):  # the loader ended early: the group's stop signal ended its workers
                path = _save(cfg, rt, step_checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, pos.step),
                             model, accumulator, train_set, running.at(pos, done), epoch)
                bar.close()
                _stop(stop, path, pos.step, epoch)
            bar.close()

            # checkpoint and evaluation
            seconds = time.perf_counter() - epoch_start
            epoch_train = {"train_loss": running.mean(), "lr": lr}
            msg = (f"epoch {epoch + 1}: train loss {epoch_train['train_loss']:.4f}, {seconds:.1f} s, "
                   f"{(len(batches) - already) * cfg.BATCH_SIZE / seconds:.0f} samples/s")
            pos = pos.next_epoch()
            path = _save(cfg, rt, checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, epoch + 1),
                         model, accumulator, train_set, pos, epoch)
            if rt.is_main and eval_set is None:
                record_metrics(cfg, "train", epoch + 1, pos.step, None, None, epoch_train)
            if eval_set is not None:  # every process predicts its share; the first scores and logs
                try:
                    last_eval = evaluate_split(cfg, unwrap(model), eval_set, vocab, rt.device, "val", epoch + 1,
                                               pos.step, rt, epoch_train)
                except GroupStop:  # stopped during the evaluation: the epoch's checkpoint is saved
                    _stop(stop, path, pos.step, epoch)
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
          train_set: VQADataset, pos: Position, epoch: int) -> Path:
    """Save a resumable checkpoint on the first process (with the training set's dictionaries and feature
    extractor); the others wait for it."""
    if rt.is_main:
        save_run_checkpoint(cfg, path, checkpoint_state(cfg, unwrap(model), accumulator, train_set.questions.vocab,
                                                        pos, lr_base_at(cfg, epoch), train_set.extractor))
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
    kept = without_option(sys.argv[1:], "--RESUME")  # the same command line, less any RESUME already on it
    command = " ".join(shlex.quote(a) for a in ["accuvqa", *kept])
    raise Stopped(f"{signal.Signals(stop.signum).name} at update {step} (epoch {epoch + 1}); saved {path}; "
                  f"continue with: {command} --RESUME True", stop.signum)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa train`: train, then print a summary (under torchrun, on the first process only)."""
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
