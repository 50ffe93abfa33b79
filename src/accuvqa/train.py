"""Training and evaluation: epochs of exact-accumulation updates, MCAN's schedule, checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from accuvqa.accumulate import GradientAccumulator
from accuvqa.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, write_json_atomic
from accuvqa.config import Config, check_batch_split
from accuvqa.data.vocab import build_answer_dict, build_token_dict, load_answer_dict
from accuvqa.data.word_vectors import load_pretrained_embedding
from accuvqa.data.vqa import (FOLDERS, QuestionRecord, VQADataset, annotation_file, index_features,
                              load_split, parse_splits, question_file)
from accuvqa.errors import CheckpointError, ConfigError, DataError
from accuvqa.metrics import evaluate as vqa_evaluate
from accuvqa.models import build_model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up

@dataclass
class Runtime:
    """Where this process runs: device and its place among data-parallel processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and writes files."""
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, set threads and seeds, and join the process group under torchrun."""
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.DEVICE == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.DEVICE)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE {cfg.DEVICE!r}: no CUDA device is available; use DEVICE cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    check_batch_split(cfg, world_size)
    torch.manual_seed(cfg.SEED)
    np.random.seed(cfg.SEED % 2**32)
    return Runtime(device=device, rank=rank, world_size=world_size)


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


def epoch_batches(n_samples: int, cfg: Config, epoch: int, rt: Runtime) -> list[np.ndarray]:
    """This process's share of each effective batch of one epoch, full batches only.

    The order is one permutation fixed by (SEED, epoch): it does not depend on the number of
    processes or on GRAD_ACCU_STEPS, so neither changes what is learned.
    """
    gen = torch.Generator().manual_seed(cfg.SEED * 1_000_003 + epoch)
    order = torch.randperm(n_samples, generator=gen).numpy()
    share = cfg.BATCH_SIZE // rt.world_size
    n_batches = n_samples // cfg.BATCH_SIZE
    return [order[b * cfg.BATCH_SIZE + rt.rank * share: b * cfg.BATCH_SIZE + (rt.rank + 1) * share]
            for b in range(n_batches)]


def mixed_precision(cfg: Config, device: torch.device) -> dict[str, Any]:
    """GradientAccumulator arguments for AMP: autocast dtype, and a GradScaler for fp16."""
    if cfg.AMP == "off":
        return {}
    if cfg.AMP == "fp16":
        if device.type != "cuda":
            raise ConfigError("AMP fp16 needs a CUDA device (gradient scaling); on CPU use AMP bf16 or off")
        return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler("cuda")}
    return {"autocast_dtype": torch.bfloat16}


def effective_batch_text(batch_size: int, micro_batches: int, world_size: int) -> str:
    """'BATCH_SIZE 64 = 32 x 2 x 1', noting uneven micro-batches."""
    micro = math.ceil(batch_size / world_size / micro_batches)
    text = f"BATCH_SIZE {batch_size} = {micro} x {micro_batches} x {world_size}"
    if batch_size % (world_size * micro_batches):
        text += " (uneven micro-batches, exact)"
    return text


def make_loss_fn(reduction: str):
    """MCAN's loss: BCE-with-logits on soft answer scores, summed; items counted for `mean`."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["img_feat"], batch["ques_ix"])
        target = batch["answer_scores"]
        loss_sum = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        # sum: the loss is a sum over samples and answers; mean: over every (sample, answer) item.
        return loss_sum, (target.numel() if reduction == "mean" else target.shape[0])

    return loss_fn


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's model inputs and targets moved to `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


# ----------------------------------------------------------------------------- data

@dataclass
class Vocab:
    """Token and answer dictionaries of a run."""

    token_to_ix: dict[str, int]
    ans_to_ix: dict[str, int]

    @property
    def ix_to_ans(self) -> list[str]:
        """Answer string of each class index."""
        out = [""] * len(self.ans_to_ix)
        for a, i in self.ans_to_ix.items():
            out[i] = a
        return out

    def fingerprint(self) -> str:
        """Short hash of both dictionaries: checkpoints and data must agree on it."""
        blob = json.dumps([self.token_to_ix, self.ans_to_ix], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def build_vocab(cfg: Config, train_records: list[QuestionRecord]) -> Vocab:
    """Token dictionary over every question file present (mcan-vqa's rule), answers from training.

    TOKEN_DICT_PATH / ANSWER_DICT_PATH pin either dictionary to a file instead.
    """
    if cfg.TOKEN_DICT_PATH:
        try:
            token_to_ix = json.loads(Path(cfg.TOKEN_DICT_PATH).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read TOKEN_DICT_PATH {cfg.TOKEN_DICT_PATH}: {e}") from None
    else:
        questions: list[str] = []
        # mcan-vqa reads all four question files whatever TRAIN_SPLIT is, so an original checkpoint
        # trained on train+val+vg fits a val/test run configured with TRAIN_SPLIT train.
        for split in ("train", "val", "test", "vg"):
            if question_file(cfg.DATASET_PATH, split).is_file():
                questions += [r.question for r in load_split(cfg.DATASET_PATH, split, need_answers=False)]
        token_to_ix = build_token_dict(questions)
    if cfg.ANSWER_DICT_PATH:
        ans_to_ix, _ = load_answer_dict(cfg.ANSWER_DICT_PATH)
    else:
        ans_to_ix, _ = build_answer_dict(r.multiple_choice_answer for r in train_records)
    if not ans_to_ix:
        raise DataError("the answer dictionary is empty: no training answer is seen more than 8 times")
    return Vocab(token_to_ix, ans_to_ix)


def load_records(cfg: Config, split_spec: str, need_answers: bool) -> list[QuestionRecord]:
    """Questions of every split in `split_spec` ('train+val' etc.)."""
    records: list[QuestionRecord] = []
    for split in parse_splits(split_spec):
        records += load_split(cfg.DATASET_PATH, split, need_answers)
    return records


def make_dataset(cfg: Config, records: list[QuestionRecord], vocab: Vocab) -> VQADataset:
    """A dataset over `records` whose features come from the folders those splits use."""
    folders = sorted({r.folder for r in records if r.folder} or {"train2014", "val2014"})
    if any(not r.folder for r in records):  # Visual Genome questions sit on COCO train/val images
        folders = sorted(set(folders) | {"train2014", "val2014"})
    return VQADataset(cfg, records, vocab.token_to_ix, vocab.ans_to_ix, index_features(cfg.FEATURE_PATH, folders))


def batch_loader(dataset: VQADataset, batches: list[np.ndarray], cfg: Config) -> Iterator[dict]:
    """Iterate over collated batches, with worker processes when NUM_WORKERS > 0."""
    if cfg.NUM_WORKERS == 0:
        return (dataset[b] for b in batches)
    return iter(torch.utils.data.DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=cfg.NUM_WORKERS,
        pin_memory=cfg.PIN_MEM, persistent_workers=False))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: VQADataset, cfg: Config, device: torch.device,
                    desc: str = "eval") -> tuple[np.ndarray, np.ndarray, float]:
    """Top answer index and its score for every question, and the mean summed-BCE loss per sample."""
    model.eval()
    order = np.arange(len(dataset))
    chunks = [order[i: i + cfg.BATCH_SIZE] for i in range(0, len(order), cfg.BATCH_SIZE)]
    top_ix = np.zeros(len(dataset), dtype=np.int64)
    top_score = np.zeros(len(dataset), dtype=np.float32)
    loss_total = torch.zeros((), dtype=torch.float64)
    for batch in tqdm(batch_loader(dataset, chunks, cfg), total=len(chunks), desc=desc, leave=False,
                      disable=not cfg.VERBOSE, file=sys.stderr):
        index = batch["index"].numpy()
        inputs = to_device(batch, device)
        logits = model(inputs["img_feat"], inputs["ques_ix"]).float()
        loss_total += F.binary_cross_entropy_with_logits(
            logits, inputs["answer_scores"], reduction="sum").double().cpu()
        score, ix = torch.sigmoid(logits).max(dim=1)
        top_ix[index] = ix.cpu().numpy()
        top_score[index] = score.cpu().numpy()
    model.train()
    return top_ix, top_score, float(loss_total) / max(len(dataset), 1)


def score_predictions(records: list[QuestionRecord], answers: list[str]) -> dict[str, Any]:
    """Official VQA accuracy (percent) overall, per answer type and per question type."""
    predictions = {r.question_id: a for r, a in zip(records, answers)}
    questions = {r.question_id: {"answers": list(r.answers), "answer_type": r.answer_type,
                                 "question_type": r.question_type} for r in records}
    return vqa_evaluate(predictions, questions)


def append_metrics(cfg: Config, line: dict[str, Any]) -> Path:
    """Append one JSON line to <RESULT_PATH>/<VERSION>/metrics.jsonl."""
    path = Path(cfg.RESULT_PATH) / cfg.run_version / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def evaluate_split(cfg: Config, model: torch.nn.Module, dataset: VQADataset, vocab: Vocab,
                   device: torch.device, split: str, epoch: int, step: int) -> dict[str, Any] | None:
    """Evaluate on a split with annotations, log a metrics line; None when it has no answers."""
    top_ix, _, loss = predict_dataset(model, dataset, cfg, device, desc=f"eval {split}")
    if any(r.answers is None for r in dataset.records):
        return None
    ix_to_ans = vocab.ix_to_ans
    result = score_predictions(dataset.records, [ix_to_ans[i] for i in top_ix])
    line = {"epoch": epoch, "step": step, "split": split, "accuracy": result["accuracy"],
            "per_answer_type": result["per_answer_type"], "loss": loss,
            "per_question_type": result["per_question_type"]}
    append_metrics(cfg, line)
    return line


# ----------------------------------------------------------------------------- training

def _run_dir_guard(cfg: Config) -> None:
    run_dir = Path(cfg.CKPTS_PATH) / f"ckpt_{cfg.run_version}"
    if not cfg.RESUME and run_dir.is_dir() and any(run_dir.glob("epoch*.pkl")):
        raise ConfigError(
            f"{run_dir} already holds checkpoints of a run named {cfg.run_version!r}; a new run never "
            f"overwrites them: pick another --VERSION, or continue it with --RESUME True --CKPT_EPOCH N"
        )


def checkpoint_state(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     vocab: Vocab, epoch: int, step: int) -> dict[str, Any]:
    """What a checkpoint holds: mcan-vqa's keys plus what an exact resume needs."""
    return {
        "state_dict": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_base": lr_base_at(cfg, epoch - 1),  # mcan-vqa: the base of the epoch just finished
        "config": cfg.to_dict(),
        "epoch": epoch,  # epochs completed
        "step": step,  # updates completed
        "rng_torch": torch.get_rng_state(),
        "token_to_ix": vocab.token_to_ix,
        "ans_to_ix": vocab.ans_to_ix,
        "vocab_fingerprint": vocab.fingerprint(),
    }


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train(cfg: Config) -> dict[str, Any]:
    """Train for MAX_EPOCH epochs; checkpoint and evaluate after each; return a summary."""
    rt = setup_runtime(cfg)
    if rt.is_main:
        _run_dir_guard(cfg)
    train_records = load_records(cfg, cfg.TRAIN_SPLIT, need_answers=True)
    resume_state, resume_path = _resume_state(cfg) if cfg.RESUME else (None, None)
    if resume_state is not None and "token_to_ix" in resume_state:
        vocab = Vocab(resume_state["token_to_ix"], resume_state["ans_to_ix"])
    else:
        vocab = build_vocab(cfg, train_records)
    train_set = make_dataset(cfg, train_records, vocab)
    eval_set = None
    if (cfg.EVAL_EVERY_EPOCH and "val" not in parse_splits(cfg.TRAIN_SPLIT)
            and question_file(cfg.DATASET_PATH, "val").is_file()
            and annotation_file(cfg.DATASET_PATH, "val").is_file()):
        eval_set = make_dataset(cfg, load_records(cfg, "val", need_answers=True), vocab)
    n_batches = len(train_set) // cfg.BATCH_SIZE
    if n_batches == 0:
        raise ConfigError(f"BATCH_SIZE {cfg.BATCH_SIZE} is larger than the training set ({len(train_set)} questions)")

    pretrained_emb = (load_pretrained_embedding(cfg, vocab.token_to_ix)
                      if cfg.USE_GLOVE and resume_state is None else None)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix), pretrained_emb).to(rt.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LR_BASE, betas=cfg.OPT_BETAS, eps=cfg.OPT_EPS,
                                 foreach=True)
    start_epoch, step = 0, 0
    if resume_state is not None:
        load_weights(model, resume_state, resume_path)
        _load_optimizer_state(optimizer, resume_state, resume_path)
        start_epoch = int(resume_state.get("epoch", cfg.CKPT_EPOCH))
        # An mcan-vqa checkpoint has no step count; mcan-vqa resumes its warm-up counter at
        # int(data_size / BATCH_SIZE * CKPT_EPOCH).
        step = (int(resume_state["step"]) if "step" in resume_state
                else int(len(train_set) / cfg.BATCH_SIZE * start_epoch))
        if "rng_torch" in resume_state:
            torch.set_rng_state(resume_state["rng_torch"])
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    accumulator = GradientAccumulator(
        model, optimizer, micro_batches=cfg.GRAD_ACCU_STEPS, reduction=cfg.LOSS_REDUCTION,
        max_grad_norm=cfg.GRAD_NORM_CLIP if cfg.GRAD_NORM_CLIP > 0 else None,
        **mixed_precision(cfg, rt.device))
    loss_fn = make_loss_fn(cfg.LOSS_REDUCTION)
    effective = effective_batch_text(cfg.BATCH_SIZE, accumulator.micro_batches, rt.world_size)
    if rt.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("train: %d questions, %d images; %d updates/epoch; %s (micro-batch x "
                 "GRAD_ACCU_STEPS x processes); %.2fM parameters; device %s",
                 len(train_set), len(train_set.image_ids), n_batches, effective, n_params / 1e6, rt.device)

    updates_per_epoch = len(train_set) / cfg.BATCH_SIZE  # mcan-vqa's warm-up counts data_size / batch
    started = time.perf_counter()
    samples_seen, last_eval = 0, None
    for epoch in range(start_epoch, cfg.MAX_EPOCH):
        batches = epoch_batches(len(train_set), cfg, epoch, rt)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.MAX_EPOCH}", file=sys.stderr,
                   disable=not (rt.is_main and cfg.VERBOSE), dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
        # Running sums stay on the device: reading them (a host sync) happens only when logging.
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        item_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        for batch in batch_loader(train_set, batches, cfg):
            step += 1
            lr = lr_at(cfg, step, epoch, updates_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = accumulator.step(to_device(batch, rt.device), loss_fn)
            if result.skipped:  # its loss is inf/NaN by construction: keep it out of the running mean
                log.warning("update %d skipped: fp16 gradient overflow (the loss scale is lowered)", step)
            else:
                loss_sum += result.loss.detach() * (1 if cfg.LOSS_REDUCTION == "sum" else result.n_items)
                item_sum += result.n_items
            samples_seen += cfg.BATCH_SIZE
            bar.update(1)
            if bar.n % 20 == 0 or bar.n == len(batches):
                rate = bar.n * cfg.BATCH_SIZE / (time.perf_counter() - epoch_start)
                mean_loss = float(loss_sum) / max(float(item_sum), 1.0)
                if not math.isfinite(mean_loss):
                    raise DataError(
                        f"the training loss became {mean_loss} at update {step} (epoch {epoch + 1}); "
                        f"lower LR_BASE or set GRAD_NORM_CLIP; the last good checkpoint is kept")
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
        bar.close()
        if rt.is_main:
            path = checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, epoch + 1)
            save_checkpoint(path, checkpoint_state(cfg, model, optimizer, vocab, epoch + 1, step))
            epoch_time = time.perf_counter() - epoch_start
            msg = (f"epoch {epoch + 1}: train loss {float(loss_sum) / max(float(item_sum), 1.0):.4f}, "
                   f"{epoch_time:.1f} s, {len(batches) * cfg.BATCH_SIZE / epoch_time:.0f} samples/s")
            if eval_set is not None:
                last_eval = evaluate_split(cfg, _unwrap(model), eval_set, vocab, rt.device, "val", epoch + 1, step)
                msg += f"; val accuracy {last_eval['accuracy']:.2f}% " + _types(last_eval)
            log.info("%s; saved %s", msg, path)
        if rt.world_size > 1:
            torch.distributed.barrier()
    wall = time.perf_counter() - started
    summary = {"version": cfg.run_version, "epochs": cfg.MAX_EPOCH, "updates": step,
               "wall_time_s": wall, "samples_per_s": samples_seen / wall if wall > 0 else 0.0,
               "effective_batch": effective_batch_text(cfg.BATCH_SIZE, accumulator.micro_batches, rt.world_size),
               "val_accuracy": last_eval["accuracy"] if last_eval else None,
               "checkpoint": str(checkpoint_path(cfg.CKPTS_PATH, cfg.run_version, cfg.MAX_EPOCH))}
    return summary


def _types(line: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v:.2f}" for k, v in sorted(line["per_answer_type"].items())) + ")"


def _resume_state(cfg: Config) -> tuple[dict[str, Any], Path]:
    version = cfg.CKPT_VERSION or cfg.run_version
    if cfg.CKPT_PATH:
        path = Path(cfg.CKPT_PATH)
    else:
        if cfg.CKPT_EPOCH <= 0:
            raise ConfigError("--RESUME True needs --CKPT_EPOCH N (the epoch to continue from) or --CKPT_PATH")
        path = checkpoint_path(cfg.CKPTS_PATH, version, cfg.CKPT_EPOCH)
    state = load_checkpoint(path)
    log.info("resuming from %s", path)
    return state, path


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Restore Adam's moments from a checkpoint (ours or mcan-vqa's); an empty entry starts afresh."""
    saved = state.get("optimizer")
    if not saved:
        log.warning("%s holds no optimizer state: Adam's moments start from zero", path)
        return
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model ({e}); "
                              f"resume with the config the checkpoint was trained with") from None


# ----------------------------------------------------------------------------- val / test / predict

def load_trained(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Vocab, Path, int]:
    """Model, vocabularies, path and epoch of the checkpoint named by CKPT_PATH or CKPT_VERSION/CKPT_EPOCH."""
    if cfg.CKPT_PATH:
        path = Path(cfg.CKPT_PATH)
    else:
        epoch = cfg.CKPT_EPOCH if cfg.CKPT_EPOCH > 0 else cfg.MAX_EPOCH
        path = checkpoint_path(cfg.CKPTS_PATH, cfg.CKPT_VERSION or cfg.run_version, epoch)
    state = load_checkpoint(path)
    if "token_to_ix" in state:
        vocab = Vocab(state["token_to_ix"], state["ans_to_ix"])
    else:  # an original mcan-vqa checkpoint: dictionaries come from the data, or pinned files
        vocab = build_vocab(cfg, load_records(cfg, cfg.TRAIN_SPLIT, need_answers=True)
                            if not cfg.ANSWER_DICT_PATH else [])
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix))
    load_weights(model, state, path)
    return model.to(device), vocab, path, int(state.get("epoch", cfg.CKPT_EPOCH))


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's state_dict strictly; size mismatches name the dictionary to pin.

    mcan-vqa saves the weights of a multi-GPU run as `nn.DataParallel` does, every key prefixed
    with 'module.'; that prefix is removed.
    """
    weights = state["state_dict"]
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in ("embedding.weight", "proj.weight"):
        got = weights.get(key)
        if got is not None and key in expected and tuple(got.shape) != expected[key]:
            what = "token dictionary" if key == "embedding.weight" else "answer dictionary"
            raise CheckpointError(
                f"{path}: {key} has {got.shape[0]} rows but the {what} has {expected[key][0]} entries; "
                f"pin the dictionary the checkpoint was trained with (TOKEN_DICT_PATH / ANSWER_DICT_PATH)")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise CheckpointError(f"{path} does not match the configured model: {detail}; "
                              f"check LAYER, HIDDEN_SIZE and the other model keys") from None


def run_eval(cfg: Config, split: str) -> dict[str, Any]:
    """`val` or `test`: evaluate a checkpoint; write predictions; return accuracy when answers exist."""
    rt = setup_runtime(cfg)
    model, vocab, path, epoch = load_trained(cfg, rt.device)
    has_answers = annotation_file(cfg.DATASET_PATH, split).is_file()
    records = load_split(cfg.DATASET_PATH, split, need_answers=split == "val")
    dataset = make_dataset(cfg, records, vocab)
    top_ix, top_score, loss = predict_dataset(model, dataset, cfg, rt.device, desc=f"eval {split}")
    ix_to_ans = vocab.ix_to_ans
    answers = [ix_to_ans[i] for i in top_ix]
    out_dir = Path(cfg.RESULT_PATH) / cfg.run_version
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"checkpoint": str(path), "split": split, "questions": len(records)}
    if split == "test":
        submission = [{"question_id": r.question_id, "answer": a} for r, a in zip(records, answers)]
        summary["submission"] = str(write_json_atomic(out_dir / "result_test.json", submission))
    if split == "val" and cfg.TEST_SAVE_PRED:
        preds = [{"question_id": r.question_id, "answer": a, "score": float(s)}
                 for r, a, s in zip(records, answers, top_score)]
        summary["predictions"] = str(write_json_atomic(out_dir / "result_val_pred.json", preds))
    if has_answers and all(r.answers is not None for r in records):
        result = score_predictions(records, answers)
        append_metrics(cfg, {"epoch": epoch, "step": None, "split": split,
                             "accuracy": result["accuracy"], "per_answer_type": result["per_answer_type"],
                             "loss": loss, "per_question_type": result["per_question_type"]})
        summary.update(accuracy=result["accuracy"], per_answer_type=result["per_answer_type"])
    return summary


def predict(cfg: Config, image: str, question: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Top-k answers with sigmoid scores for one image (PNG/JPEG for easyvqa, or a features .npz)."""
    from accuvqa.data.vqa import read_features
    from accuvqa.data.vocab import encode_question

    rt = setup_runtime(cfg)
    model, vocab, _, _ = load_trained(cfg, rt.device)
    image_path = Path(image)
    if not image_path.is_file():
        raise DataError(f"image {image} does not exist")
    if image_path.suffix == ".npz":
        feats = read_features(image_path, cfg.IMG_FEAT_SIZE, cfg.IMG_FEAT_PAD_SIZE)
    elif cfg.DATASET == "easyvqa":
        from PIL import Image, UnidentifiedImageError

        from accuvqa.data.easyvqa import image_features
        try:
            rgb = np.asarray(Image.open(image_path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {image}: {e}") from None
        feats = image_features(rgb)[0].T
    else:
        raise DataError(f"{image}: with DATASET vqa, give the image's region features (.npz), "
                        f"e.g. {FOLDERS['val']}/COCO_val2014_<id>.jpg.npz")
    ques_ix = encode_question(question, vocab.token_to_ix, cfg.MAX_TOKEN)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(feats))[None].float().to(rt.device),
                       torch.from_numpy(ques_ix)[None].to(rt.device))
    scores = torch.sigmoid(logits[0]).cpu()
    top = torch.topk(scores, min(top_k, scores.numel()))
    ix_to_ans = vocab.ix_to_ans
    return [(ix_to_ans[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def run_check(cfg: Config) -> tuple[list, list[str]]:
    """`check`: on the configured model and one real batch, dropout off, compare the gradient of
    GRAD_ACCU_STEPS, 2, 4 and 8 micro-batches with the one-batch gradient."""
    from accuvqa.check import check_equivalence, equivalence_risks

    rt = setup_runtime(cfg)
    records = load_records(cfg, cfg.TRAIN_SPLIT, need_answers=True)
    vocab = build_vocab(cfg, records)
    dataset = make_dataset(cfg, records, vocab)
    if len(dataset) < cfg.BATCH_SIZE:
        raise ConfigError(f"BATCH_SIZE {cfg.BATCH_SIZE} is larger than the training set ({len(dataset)} questions)")
    batch = to_device(dataset[epoch_batches(len(dataset), cfg, 0, rt)[0]], rt.device)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg.replace(DROPOUT_R=0.0), len(vocab.token_to_ix), len(vocab.ans_to_ix)).to(rt.device)
    counts = [2, 4, 8] + ([cfg.GRAD_ACCU_STEPS] if isinstance(cfg.GRAD_ACCU_STEPS, int) else [])
    rows = check_equivalence(model, batch, make_loss_fn(cfg.LOSS_REDUCTION), counts, cfg.LOSS_REDUCTION)
    return rows, equivalence_risks(model, cfg.DROPOUT_R)
