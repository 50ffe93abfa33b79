"""Evaluation: predict a split, score it with the official VQA accuracy, log metrics; `val` and `test`.

Under torchrun every process predicts a share of the split's batches (the same batches as one
process, so the same numbers bit for bit); the first process gathers them, scores, and writes the
files once.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from accuvqa.checkpoint import load_trained
from accuvqa.config import Config
from accuvqa.data.dataset import VQADataset
from accuvqa.data.layout import dataset_layout
from accuvqa.data.loader import batch_loader, eval_batches, load_questions, make_dataset
from accuvqa.data.question_store import question_store
from accuvqa.data.questions import QuestionArrays
from accuvqa.data.records import QuestionRecord
from accuvqa.data.scoring import vqa_score
from accuvqa.data.vocab import Vocab
from accuvqa.files import append_jsonl, write_json_atomic
from accuvqa.metrics import evaluate as vqa_evaluate
from accuvqa.models import model_inputs
from accuvqa.runlog import append_log, print_table, progress, run_dir
from accuvqa.runtime import GroupStop, Runtime, gather, rank_failures, setup_runtime, shard, to_device


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: VQADataset, cfg: Config, device: torch.device,
                    desc: str = "eval", rt: Runtime | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Top answer index and its score for every question, and the mean summed-BCE loss per sample.

    With `rt` of several processes, each predicts every world_size-th batch and all of them get
    the whole split's result (a collective: every process must call it).
    """
    model.eval()
    batches = eval_batches(len(dataset), cfg.BATCH_SIZE)
    mine = shard(batches, rt) if rt is not None else batches
    done = []  # (question indices, top answer index, its score, summed loss) per batch
    for batch in progress(batch_loader(dataset, mine, cfg), total=len(mine), desc=desc, leave=False,
                          every=cfg.LOG_EVERY_STEPS, disable=not cfg.VERBOSE or (rt is not None and not rt.is_main)):
        inputs = to_device(batch, device)
        logits = model(*model_inputs(cfg, inputs)).float()
        loss = F.binary_cross_entropy_with_logits(logits, inputs["answer_scores"], reduction="sum")
        score, ix = torch.sigmoid(logits).max(dim=1)
        done.append((batch["index"].numpy(), ix.cpu().numpy(), score.cpu().numpy(), float(loss.double())))
    model.train()
    if len(done) < len(mine):  # the loader ended early: the group's stop signal ended its workers
        raise GroupStop(f"{desc}: stopped after {len(done)} of {len(mine)} batches")
    if rt is not None and rt.world_size > 1:
        shares = gather(done, rt)  # shares[r][i] is batch r + i * world_size
        done = [shares[b % rt.world_size][b // rt.world_size] for b in range(len(batches))]
    top_ix = np.zeros(len(dataset), dtype=np.int64)
    top_score = np.zeros(len(dataset), dtype=np.float32)
    for index, ix, score, _ in done:
        top_ix[index], top_score[index] = ix, score
    # summed in batch order, as one process sums: the same float64 total whatever the process count
    loss_total = sum((loss for *_, loss in done), start=0.0)
    return top_ix, top_score, loss_total / max(len(dataset), 1)


def score_predictions(records: Sequence[QuestionRecord] | QuestionArrays, answers: Sequence[str]) -> dict[str, Any]:
    """Official VQA accuracy (percent) overall, per answer type and per question type."""
    if isinstance(records, QuestionArrays):
        return vqa_score(records, list(answers))
    predictions = {r.question_id: a for r, a in zip(records, answers)}
    questions = {r.question_id: {"answers": list(r.answers), "answer_type": r.answer_type,
                                 "question_type": r.question_type} for r in records}
    return vqa_evaluate(predictions, questions)


def score_split(cfg: Config, split: str, questions: QuestionArrays, answers: list[str]) -> dict[str, Any]:
    """The scores of `answers` on `split` as the dataset's benchmark computes them (VQA accuracy, GQA's or
    CLEVR's figures): `accuracy`, `per_answer_type`, and the benchmark's own figures."""
    return dataset_layout(cfg).score(questions, answers, question_store(cfg).scoring_data(split))


def record_metrics(cfg: Config, split: str, epoch: int, step: int | None, result: dict[str, Any] | None,
                   loss: float | None, train: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Build the metrics line of one evaluation and append it to <RESULT_PATH>/<VERSION>/metrics.jsonl.

    `train`: the epoch's training figures ({"train_loss", "lr"}) joined to the line; without an
    evaluation (`result` None) the line holds them alone.
    """
    line: dict[str, Any] = {"epoch": epoch, "step": step, "split": split}
    if result is not None:
        line.update({"accuracy": result["accuracy"], "per_answer_type": result["per_answer_type"], "loss": loss,
                     **{k: v for k, v in result.items() if k not in ("accuracy", "per_answer_type", "n")}})
    line.update(train or {})
    append_jsonl(run_dir(cfg) / "metrics.jsonl", line)
    return line


def evaluate_split(cfg: Config, model: torch.nn.Module, dataset: VQADataset, vocab: Vocab,
                   device: torch.device, split: str, epoch: int, step: int,
                   rt: Runtime | None = None, train: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """Evaluate on a split with annotations, log a metrics line (with `train` figures); None when it has no answers.

    With `rt` of several processes: every process must call it; each predicts its share, and the
    first one scores, logs and returns the line (the others return None).
    """
    top_ix, _, loss = predict_dataset(model, dataset, cfg, device, desc=f"eval {split}", rt=rt)
    if not dataset.questions.annotated.all() or (rt is not None and not rt.is_main):
        return None
    ix_to_ans = vocab.ix_to_ans
    result = score_split(cfg, split, dataset.questions, [ix_to_ans[i] for i in top_ix])
    return record_metrics(cfg, split, epoch, step, result, loss, train)


def run_eval(cfg: Config, split: str) -> dict[str, Any]:
    """`val` or `test`: evaluate a checkpoint; write predictions; return accuracy when answers exist.

    Under torchrun the processes share the predicting; the first writes the files and the metrics
    line, and only its summary holds their names and the accuracy.
    """
    rt = setup_runtime(cfg)
    model, vocab, path, epoch = load_trained(cfg, rt.device)
    dataset = make_dataset(cfg, load_questions(cfg, split, need_answers=split == "val"), vocab)
    records = dataset.questions
    top_ix, top_score, loss = predict_dataset(model, dataset, cfg, rt.device, desc=f"eval {split}", rt=rt)
    summary: dict[str, Any] = {"checkpoint": str(path), "split": split, "questions": len(records)}
    if not rt.is_main:
        return summary
    ix_to_ans = vocab.ix_to_ans
    answers = [ix_to_ans[i] for i in top_ix]
    out_dir = run_dir(cfg)
    submission = dataset_layout(cfg).write_predictions(out_dir, split, records, answers)
    if submission is not None:  # the benchmark's own format, for any other tool to score
        summary["submission"] = str(submission)
    if split == "val" and cfg.TEST_SAVE_PRED:
        preds = [{"question_id": q, "answer": a, "score": float(s)}
                 for q, a, s in zip(records.question_id.tolist(), answers, top_score)]
        summary["predictions"] = str(write_json_atomic(out_dir / "result_val_pred.json", preds))
    if len(records) and records.annotated.all():  # the test split of VQA v2 has no annotations
        result = score_split(cfg, split, records, answers)
        record_metrics(cfg, split, epoch, None, result, loss)
        summary.update(accuracy=result["accuracy"], per_answer_type=result["per_answer_type"])
    return summary


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa val` / `accuvqa test`: print the evaluation's table."""
    with rank_failures():
        s = run_eval(cfg, args.command)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    rows: dict[str, Any] = {"checkpoint": s["checkpoint"], "questions": s["questions"]}
    if "accuracy" in s:
        rows["accuracy"] = f"{s['accuracy']:.2f}%"
        rows.update({f"  {k}": f"{v:.2f}%" for k, v in sorted(s["per_answer_type"].items())})
    for key in ("submission", "predictions"):
        if key in s:
            rows[key] = s[key]
    append_log(cfg, print_table(f"{args.command} ({cfg.DATASET}, split {args.command})", rows))
    return 0
