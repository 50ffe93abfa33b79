"""The `accuvqa` command end to end: sub-commands in a subprocess, one-line errors with exit code 2."""

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from accuvqa.checkpoint import load_checkpoint
from accuvqa.cli import COMMANDS
from accuvqa.config import list_presets
from accuvqa.data.features import feature_file
from accuvqa.models import list_models
from conftest import ROOT, TINY, cli_overrides, run_cli

PLAIN = re.compile(r"[a-z0-9]+( [a-z0-9]+)*")  # answers VQA's normalisation leaves as they are


def accuracy_by_hand(answer: str, annotators: list[str]) -> float:
    """One question's official VQA accuracy, counted by hand for plain answers: the mean, over the ten sets of
    nine annotators, of min(1, annotators in the set who gave `answer` / 3)."""
    assert PLAIN.fullmatch(answer) and all(PLAIN.fullmatch(a) for a in annotators), (answer, annotators)
    sets = [annotators[:i] + annotators[i + 1:] for i in range(len(annotators))]
    return sum(min(1.0, s.count(answer) / 3) for s in sets) / len(sets)


def accuracy_of_saved_predictions(predictions: list[dict], annotation_file: Path) -> dict:
    """{"accuracy", "per_answer_type"} in percent, from `result_val_pred.json`'s answers and the annotations."""
    annotations = {a["question_id"]: a for a in json.loads(annotation_file.read_text())["annotations"]}
    assert sorted(p["question_id"] for p in predictions) == sorted(annotations)  # every val question, once
    by_type = defaultdict(list)
    for p in predictions:
        a = annotations[p["question_id"]]
        by_type[a["answer_type"]].append(accuracy_by_hand(p["answer"], [x["answer"] for x in a["answers"]]))
    every = [acc for accs in by_type.values() for acc in accs]
    return {"accuracy": 100 * sum(every) / len(every),
            "per_answer_type": {t: 100 * sum(accs) / len(accs) for t, accs in by_type.items()}}


@pytest.mark.slow
def test_cli_trains_evaluates_tests_and_predicts_on_a_slice(easyvqa_slice, tmp_path):
    common = ["--config", str(ROOT / "configs/easyvqa.yml"), "--DATASET_PATH", easyvqa_slice["DATASET_PATH"],
              "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"], "--CKPTS_PATH", "ck", "--RESULT_PATH", "res",
              "--VERSION", "e2e", *cli_overrides(TINY)]
    r = run_cli("train", *common, "--MAX_EPOCH", "2", "--GRAD_ACCU_STEPS", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "effective batch" in r.stdout and "BATCH_SIZE 64 = 22 x 3 x 1" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "res/e2e/metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["split"]) for x in lines] == [(1, "val"), (2, "val")]
    assert set(lines[0]) >= {"epoch", "step", "split", "accuracy", "per_answer_type", "loss"}
    assert set(lines[1]["per_answer_type"]) == {"yes/no", "other"}

    state = load_checkpoint(tmp_path / "ck/ckpt_e2e/epoch2.pkl")
    assert {"state_dict", "optimizer", "lr_base", "config", "step", "vocab_fingerprint"} <= set(state)
    assert "backbone.enc_list.0.mhatt.linear_q.weight" in state["state_dict"]

    r = run_cli("val", *common, "--CKPT_EPOCH", "2", "--TEST_SAVE_PRED", "True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"accuracy           {lines[1]['accuracy']:.2f}%" in r.stdout  # same model, same split
    # the accuracy train logged is the official formula over val's saved answers, counted here by hand
    predictions = json.loads((tmp_path / "res/e2e/result_val_pred.json").read_text())
    by_hand = accuracy_of_saved_predictions(
        predictions, Path(easyvqa_slice["DATASET_PATH"], "v2_mscoco_val2014_annotations.json"))
    assert lines[1]["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-9)
    assert lines[1]["per_answer_type"] == pytest.approx(by_hand["per_answer_type"], abs=1e-9)

    r = run_cli("test", *common, "--CKPT_EPOCH", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    submission = json.loads((tmp_path / "res/e2e/result_test.json").read_text())
    questions = json.loads(Path(easyvqa_slice["DATASET_PATH"], "v2_OpenEnded_mscoco_test2015_questions.json").read_text())
    assert [s["question_id"] for s in submission] == [q["question_id"] for q in questions["questions"]]
    assert all(isinstance(s["answer"], str) for s in submission)

    # predict answers a val question as val did: the saved answer is the model's answer to that question
    question = json.loads(Path(easyvqa_slice["DATASET_PATH"], "v2_OpenEnded_mscoco_val2014_questions.json")
                          .read_text())["questions"][0]
    saved = next(p for p in predictions if p["question_id"] == question["question_id"])
    image = feature_file(easyvqa_slice["FEATURE_PATH"], "val2014", question["image_id"])  # a file, not a store
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", str(image), "--question", question["question"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split(maxsplit=1) for line in r.stdout.strip().splitlines()]
    assert len(rows) == 5 and rows[0][1] == saved["answer"], (rows, saved)
    # printed to 4 decimals (5e-5), from a batch of one instead of val's batches (float32 padding: 1e-7)
    assert abs(float(rows[0][0]) - saved["score"]) <= 5e-5 + 1e-6
    assert [float(s) for s, _ in rows] == sorted((float(s) for s, _ in rows), reverse=True)

    import easy_vqa
    png = easy_vqa.get_test_image_paths()[0]
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", png, "--question", "Is there a circle?",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 5
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", "nope.png", "--question", "?", cwd=tmp_path)
    assert r.returncode == 2 and "image nope.png does not exist" in r.stderr

    # a second run under the same name never overwrites the first one's checkpoints
    before = (tmp_path / "ck/ckpt_e2e/epoch2.pkl").read_bytes()
    r = run_cli("train", *common, cwd=tmp_path)
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "ck/ckpt_e2e/epoch2.pkl").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["train", "--HIDEN_SIZE", "4"], "did you mean HIDDEN_SIZE"),
    (["train", "--BATCH_SIZE", "many"], "BATCH_SIZE: expected int, got 'many'"),
    (["train", "--HIDDEN_SIZE", "30", "--MULTI_HEAD", "8"], "must be divisible by MULTI_HEAD"),
    (["train", "--BATCH_SIZE", "4", "--GRAD_ACCU_STEPS", "5"], "larger than the per-process batch"),
    (["val", "--DATASET_PATH", "nowhere", "--CKPT_PATH", "missing.pkl"], "checkpoint missing.pkl does not exist"),
    (["train", "--DATASET_PATH", "nowhere"], "missing train question file nowhere/v2_OpenEnded_mscoco_train2014"),
    (["train", "--MODEL_USE", "nosuch"],
     "MODEL_USE 'nosuch' is not a registered model; registered: " + ", ".join(list_models())),
    (["train", "--OPT", "Nope"], "OPT 'Nope' (from --OPT) is not a torch.optim optimizer"),
    (["train", "--config", "nosuch"], "no config preset 'nosuch': a file path or one of " + ", ".join(list_presets())),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    # the error is one line, the last; before it only log lines (e.g. which key named the checkpoint to load)
    *logged, last = r.stderr.strip().splitlines()
    assert last.startswith("accuvqa: error: ") and message in last, r.stderr
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line) for line in logged), r.stderr


def test_cli_yaml_syntax_error_names_line(tmp_path):
    (tmp_path / "bad.yml").write_text("LAYER: 2\nHIDDEN_SIZE: [1\n")
    r = run_cli("train", "--config", "bad.yml", cwd=tmp_path)
    assert r.returncode == 2 and "YAML syntax error in bad.yml line" in r.stderr


def test_a_corrupt_checkpoint_is_named_not_a_traceback(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04 not a checkpoint")
    r = run_cli("val", "--CKPT_PATH", "bad.pkl", cwd=tmp_path)
    assert r.returncode == 2 and "cannot load checkpoint bad.pkl" in r.stderr and "Traceback" not in r.stderr


def test_accuvqa_debug_prints_the_traceback_with_its_cause(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04 not a checkpoint")
    r = run_cli("val", "--CKPT_PATH", "bad.pkl", cwd=tmp_path, env={"ACCUVQA_DEBUG": "1"})
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "The above exception was the direct cause" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("accuvqa: error: cannot load checkpoint bad.pkl")


def test_every_command_of_the_table_has_help(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS)
    for name in COMMANDS:
        r = run_cli(name, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "--config" in r.stdout, name


def test_a_preset_name_loads_the_packaged_preset(tmp_path):
    # cwd has no configs/ folder: `--config small` can only come from the package
    r = run_cli("train", "--config", "small", "--DATASET_PATH", "nowhere", cwd=tmp_path)
    assert r.returncode == 2 and "missing train question file nowhere/" in r.stderr
