"""Every ported openvqa model through every command: train, val, test, predict (features file and image), check."""

import json
from pathlib import Path

import pytest

from accuvqa.checkpoint import load_checkpoint
from accuvqa.data.features import feature_file
from accuvqa.models import model_spec
from conftest import ROOT, cli_overrides, run_cli
from test_cli import accuracy_of_saved_predictions

# tiny sizes on top of each model's easy-VQA preset, and a parameter only that model has
TINY = {
    "mfb": ({"HIDDEN_SIZE": 16, "MFB_O": 16, "LSTM_OUT_SIZE": 16}, "backbone.mfb.proj_i.weight"),
    "mfh": ({"HIDDEN_SIZE": 16, "MFB_O": 16, "LSTM_OUT_SIZE": 16}, "backbone.mfh2.proj_i.weight"),
    "butd": ({"HIDDEN_SIZE": 16, "FLAT_OUT_SIZE": 24}, "classifer.3.weight_v"),
    "ban": ({"GLIMPSE": 2, "HIDDEN_SIZE": 32, "FLAT_OUT_SIZE": 64}, "backbone.BiAtt.logits.h_mat_v"),
    "mmnasnet": ({"ARCH": "{enc: [SA, FFN], dec: [GA, RSA, FFN]}", "HIDDEN_SIZE": 32, "REL_HBASE": 8,
                  "MULTI_HEAD": 4, "FLAT_MLP_SIZE": 32, "FLAT_OUT_SIZE": 64},
                 "backbone.dec_list.1.mhatt.linear_r.weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(TINY))
def test_every_command_runs_the_model(model, easyvqa_slice, tmp_path):
    sizes, own_param = TINY[model]
    common = ["--config", str(ROOT / f"configs/easyvqa_{model}.yml"), "--DATASET_PATH", easyvqa_slice["DATASET_PATH"],
              "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"], "--CKPTS_PATH", "ck", "--RESULT_PATH", "res",
              "--VERSION", "e2e", "--WORD_EMBED_SIZE", "16", "--VERBOSE", "False", "--NUM_THREADS", "1",
              *cli_overrides(sizes)]
    r = run_cli("train", *common, "--MAX_EPOCH", "1", "--GRAD_ACCU_STEPS", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "BATCH_SIZE 64 = 22 x 3 x 1" in r.stdout
    state = load_checkpoint(tmp_path / "ck/ckpt_e2e/epoch1.pkl")
    assert own_param in state["state_dict"] and model_spec(model).answer_param in state["state_dict"]
    assert state["config"]["MODEL_USE"] == model
    (line,) = [json.loads(x) for x in (tmp_path / "res/e2e/metrics.jsonl").read_text().splitlines()]
    assert line["split"] == "val"

    r = run_cli("val", *common, "--CKPT_EPOCH", "1", "--TEST_SAVE_PRED", "True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"accuracy           {line['accuracy']:.2f}%" in r.stdout  # same model, same split
    # the logged accuracy is the official formula over val's saved answers, counted by hand (tests/test_cli.py)
    by_hand = accuracy_of_saved_predictions(json.loads((tmp_path / "res/e2e/result_val_pred.json").read_text()),
                                            Path(easyvqa_slice["DATASET_PATH"], "v2_mscoco_val2014_annotations.json"))
    assert line["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-9)
    assert line["per_answer_type"] == pytest.approx(by_hand["per_answer_type"], abs=1e-9)

    r = run_cli("test", *common, "--CKPT_EPOCH", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    submission = json.loads((tmp_path / "res/e2e/result_test.json").read_text())
    questions = json.loads(Path(easyvqa_slice["DATASET_PATH"], "v2_OpenEnded_mscoco_test2015_questions.json").read_text())
    assert [s["question_id"] for s in submission] == [q["question_id"] for q in questions["questions"]]

    import easy_vqa
    answers = []  # test image 0 given as its prepared features and as the picture itself: the same answers
    for image in (feature_file(easyvqa_slice["FEATURE_PATH"], "test2015", 0), easy_vqa.get_test_image_paths()[0]):
        r = run_cli("predict", *common, "--CKPT_EPOCH", "1", "--image", str(image),
                    "--question", "What color is the shape?", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        answers.append(r.stdout.strip().splitlines())
        scores = [float(row.split(maxsplit=1)[0]) for row in answers[-1]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert answers[0] == answers[1]

    r = run_cli("check", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: equivalent" in r.stdout
