"""Evaluation: `val` / `test` on a checkpoint, the metrics line, and the saved predictions."""

import json

import pytest
import torch

from accuvqa.data.records import load_split
from accuvqa.evaluate import run_eval
from accuvqa.metrics import vqa_accuracy


@pytest.fixture
def trained(tiny_trained):
    return tiny_trained


def test_val_saves_every_prediction_and_its_accuracy_is_the_official_one(trained):
    summary = run_eval(trained.replace(TEST_SAVE_PRED=True), "val")
    predictions = json.loads(open(summary["predictions"]).read())
    records = load_split(trained.DATASET_PATH, "val", need_answers=True)
    assert [p["question_id"] for p in predictions] == [r.question_id for r in records]
    assert all(0.0 < p["score"] <= 1.0 for p in predictions)
    # the accuracy printed and logged is the official formula over the saved answers, counted here
    by_id = {p["question_id"]: p["answer"] for p in predictions}
    official = 100 * sum(vqa_accuracy(by_id[r.question_id], r.answers) for r in records) / len(records)
    assert summary["accuracy"] == pytest.approx(official, abs=1e-9)
    line = json.loads(open(f"{trained.RESULT_PATH}/tiny/metrics.jsonl").read().splitlines()[-1])
    assert (line["split"], line["epoch"], line["step"]) == ("val", 1, None)
    assert line["accuracy"] == pytest.approx(official, abs=1e-9)


def test_val_without_test_save_pred_writes_no_prediction_file(trained, tmp_path):
    summary = run_eval(trained.replace(RESULT_PATH=str(tmp_path)), "val")
    assert "predictions" not in summary and not (tmp_path / "tiny" / "result_val_pred.json").exists()
    assert (tmp_path / "tiny" / "metrics.jsonl").is_file()


def test_test_split_writes_the_submission_in_question_order(trained):
    summary = run_eval(trained, "test")
    submission = json.loads(open(summary["submission"]).read())
    records = load_split(trained.DATASET_PATH, "test", need_answers=False)
    assert [s["question_id"] for s in submission] == [r.question_id for r in records]
    model_answers = set(torch.load(f"{trained.CKPTS_PATH}/ckpt_tiny/epoch1.pkl", weights_only=True)["ans_to_ix"])
    assert {s["answer"] for s in submission} <= model_answers
