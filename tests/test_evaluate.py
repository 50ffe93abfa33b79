"""Evaluation: `val` / `test` on a checkpoint, the metrics line, and the saved predictions."""

import json

import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.records import load_split
from accuvqa.evaluate import run_eval
from accuvqa.metrics import vqa_accuracy
from accuvqa.train import train
from conftest import ROOT, TINY


@pytest.fixture(scope="module")
def trained(easyvqa_slice, tmp_path_factory):
    """A tiny MCAN trained for one epoch on the easy-VQA slice (no evaluation during training)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        **TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "CKPTS_PATH": str(root / "ck"), "RESULT_PATH": str(root / "res"), "MAX_EPOCH": 1, "VERSION": "ev",
        "EVAL_EVERY_EPOCH": False})
    train(cfg)
    return cfg.replace(CKPT_EPOCH=1)


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
    line = json.loads(open(f"{trained.RESULT_PATH}/ev/metrics.jsonl").read().splitlines()[-1])
    assert (line["split"], line["epoch"], line["step"]) == ("val", 1, None)
    assert line["accuracy"] == pytest.approx(official, abs=1e-9)


def test_val_without_test_save_pred_writes_no_prediction_file(trained, tmp_path):
    summary = run_eval(trained.replace(RESULT_PATH=str(tmp_path)), "val")
    assert "predictions" not in summary and not (tmp_path / "ev" / "result_val_pred.json").exists()
    assert (tmp_path / "ev" / "metrics.jsonl").is_file()


def test_test_split_writes_the_submission_in_question_order(trained):
    summary = run_eval(trained, "test")
    submission = json.loads(open(summary["submission"]).read())
    records = load_split(trained.DATASET_PATH, "test", need_answers=False)
    assert [s["question_id"] for s in submission] == [r.question_id for r in records]
    model_answers = set(torch.load(f"{trained.CKPTS_PATH}/ckpt_ev/epoch1.pkl", weights_only=True)["ans_to_ix"])
    assert {s["answer"] for s in submission} <= model_answers
