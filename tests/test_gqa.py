"""DATASET gqa: a synthetic tree in openvqa's GQA layout (tests/gqa_tree.py) through the commands a GQA user types,
scored as openvqa's GQAEval scores it (gqa_metrics, itself checked against openvqa's code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, cli_overrides, run_cli
from gqa_tree import QA, write_gqa_tree

from accuvqa.cli import main
from accuvqa.config import load_config
from accuvqa.data.feature_store import PackedFeatures, store_dir
from accuvqa.data.gqa import (
    image_key,
    image_text,
    openvqa_dictionaries,
    question_key,
    question_text,
)
from accuvqa.errors import DataError
from accuvqa.gqa_metrics import gqa_scores, read_gqa_predictions

# a tiny model of each kind: MCAN (TINY) and BUTD; every answer of the tree is in the dictionary (ANSWER_MIN_COUNT 0)
MODELS = {"mcan": ("configs/gqa/mcan_small.yml", TINY),
          "butd": ("configs/gqa/butd.yml", {"HIDDEN_SIZE": 32, "FLAT_OUT_SIZE": 64, "WORD_EMBED_SIZE": 16,
                                             "NUM_THREADS": 2, "VERBOSE": False})}
RUN = {"BATCH_SIZE": 12, "GRAD_ACCU_STEPS": 2, "MAX_EPOCH": 1, "LR_BASE": 0.001, "DEVICE": "cpu"}


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> dict:
    """The tree, prepared by `accuvqa prepare` (the stores every later command reads)."""
    root = tmp_path_factory.mktemp("gqa")
    tree = write_gqa_tree(root)
    paths = {"DATASET_PATH": tree["DATASET_PATH"], "FEATURE_PATH": tree["FEATURE_PATH"],
             "IMG_FEAT_SIZE": tree["IMG_FEAT_SIZE"], "CKPTS_PATH": str(root / "ckpts"),
             "RESULT_PATH": str(root / "results")}
    prepared = run_cli("prepare", "--config", str(ROOT / MODELS["mcan"][0]),
                       *cli_overrides({**paths, **TINY}), cwd=root)
    assert prepared.returncode == 0, prepared.stderr
    return {**tree, "root": root, "paths": paths, "prepare": prepared.stdout}


def test_prepare_checks_the_tree_and_packs_the_frcn_regions_then_the_grid_cells(gqa):
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in gqa["prepare"].splitlines() if line.startswith("  ")}
    assert rows["train"] == "train_balanced_questions.json: 36 questions, 6 images with gqa-frcn features, 6 with grid features"
    assert rows["val"].startswith("testdev_balanced_questions.json: 36 questions") and rows["val"].endswith(", choices")
    assert rows["test"].startswith("submission_all_questions.json: 36 questions")
    assert rows["questions"].endswith("; train 36, val 36, test 36)")
    # the MCAN presets' GQA_GRID True (openvqa's USE_AUX_FEAT): each image's frcn regions, then its 7 x 7 grid cells
    packed = PackedFeatures(store_dir(gqa["FEATURE_PATH"], "gqa-frcn"), gqa["IMG_FEAT_SIZE"])
    for path in sorted(Path(gqa["FEATURE_PATH"], "gqa-frcn").glob("*.npz")):
        with np.load(path) as npz, np.load(Path(gqa["FEATURE_PATH"], "gqa-grid", path.name)) as grid:
            image, n, (width, height) = image_key(path.stem), len(npz["x"]), (int(npz["width"]), int(npz["height"]))
            assert packed.image_size(image) == (width, height) and packed.count(image) == n + 49
            np.testing.assert_array_equal(packed.read(image, 200), np.concatenate([npz["x"], grid["x"]]))
            boxes = packed.read_boxes(image, 200)
            np.testing.assert_array_equal(boxes[:n], npz["bbox"])
            assert boxes[n + 3 * 7 + 3] == pytest.approx([3 * width / 7, 3 * height / 7, 4 * width / 7, 4 * height / 7])
            assert boxes[n:, 2].max() == pytest.approx(width) and boxes[n:, 3].max() == pytest.approx(height)


def test_without_gqa_grid_the_store_holds_the_frcn_regions_alone(gqa, tmp_path):
    from accuvqa.data.feature_store import open_features
    from accuvqa.data.gqa import GqaLayout

    cfg = load_config(ROOT / MODELS["butd"][0], {**gqa["paths"], "STORE_PATH": str(tmp_path / "stores")})
    assert not cfg.GQA_GRID  # BUTD and BAN read the frcn regions only, as openvqa's do
    stores = open_features(cfg.FEATURE_PATH, ["gqa-frcn"], cfg.IMG_FEAT_SIZE, store_path=cfg.STORE_PATH,
                           layout=GqaLayout(cfg))
    path = sorted(Path(gqa["FEATURE_PATH"], "gqa-frcn").glob("*.npz"))[0]
    with np.load(path) as npz:
        image = image_key(path.stem)
        np.testing.assert_array_equal(stores[image].read(image, 200), npz["x"])
        np.testing.assert_array_equal(stores[image].read_boxes(image, 200), npz["bbox"])


def test_prepare_writes_openvqa_dictionaries_by_its_rule_or_from_its_dicts_json(gqa, tmp_path):
    # openvqa's utils/proc_dict_gqa.py, step by step, on the files of the tree
    from accuvqa.data.vocab import prep_answer

    read = {s: json.loads(Path(gqa["DATASET_PATH"], f).read_text()) for s, f in (
        ("train", "train_balanced_questions.json"), ("val", "val_balanced_questions.json"),
        ("testdev", "testdev_balanced_questions.json"), ("test", "submission_all_questions.json"))}
    token_to_ix, max_token = {"PAD": 0, "UNK": 1, "CLS": 2}, 0
    for q in {**read["train"], **read["val"], **read["testdev"], **read["test"]}.values():
        words = re.sub(r"([.,'!?\"()*#:;])", "", q["question"].lower()).replace("-", " ").replace("/", " ").split()
        max_token = max(max_token, len(words))
        for word in words:
            if word not in token_to_ix:
                token_to_ix[word] = len(token_to_ix)
    ans_to_ix = {}
    for q in {**read["train"], **read["val"], **read["testdev"]}.values():
        if prep_answer(q["answer"]) not in ans_to_ix:
            ans_to_ix[prep_answer(q["answer"])] = len(ans_to_ix)
    assert openvqa_dictionaries(Path(gqa["DATASET_PATH"])) == (token_to_ix, ans_to_ix, max_token)
    folder = Path(gqa["DATASET_PATH"], "openvqa_dicts")
    assert json.loads((folder / "token_dict.json").read_text()) == token_to_ix
    assert json.loads((folder / "answer_dict.json").read_text())[0] == ans_to_ix
    assert "t shirt" in ans_to_ix  # openvqa's prep_ans turns GQA's "t-shirt" into "t shirt", as ours does

    # openvqa's own dicts.json, copied into DATASET_PATH, is what prepare converts instead
    from accuvqa.data.gqa import write_openvqa_dicts

    shipped = [{"cat": 0, "dog": 1}, {"0": "cat", "1": "dog"}, {"PAD": 0, "UNK": 1, "CLS": 2, "cat": 3}, 7]
    questions = tmp_path / "questions1.2"
    questions.mkdir()
    (questions / "dicts.json").write_text(json.dumps(shipped))
    written = write_openvqa_dicts(load_config(None, {"DATASET_PATH": str(questions)}))
    assert json.loads(Path(written["token_dict"]).read_text()) == shipped[2]
    assert json.loads(Path(written["answer_dict"]).read_text()) == shipped[:2]
    assert written["max_token"] == 7


def test_ids_keep_gqa_strings_exactly_and_apart():
    for qid in ("07333408", "20968379", "0", "000000000000000001"):
        assert question_text(question_key(qid)) == qid
    assert len({question_key(q) for q in ("1", "01", "001")}) == 3
    keys = {s: image_key(s) for s in ("2354786", "n2354786", "02354786", "n0", "img-7", "2354787")}
    assert len(set(keys.values())) == len(keys) and all(0 <= k < 2**63 for k in keys.values())
    assert keys["2354786"] == 2354786 and image_text(keys["n2354786"]) == "n2354786"
    assert image_text(keys["img-7"]) is None and image_key("img-7") == keys["img-7"]  # hashed, stable
    with pytest.raises(DataError, match="questionId 'q-1' is not a string of at most 18 digits"):
        question_key("q-1")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_train_val_test_predict_check_on_the_gqa_tree(gqa, model):
    preset, sizes = MODELS[model]
    keys = {**gqa["paths"], **sizes, **RUN, "VERSION": model}
    if model == "butd":  # openvqa's dictionaries, as prepare wrote them (a question store of their own)
        folder = Path(gqa["DATASET_PATH"], "openvqa_dicts")
        keys.update(TOKEN_DICT_PATH=str(folder / "token_dict.json"), ANSWER_DICT_PATH=str(folder / "answer_dict.json"),
                    STORE_PATH=str(gqa["root"] / "stores_openvqa"))
    args = ["--config", str(ROOT / preset), *cli_overrides(keys)]
    root, results = gqa["root"], Path(gqa["paths"]["RESULT_PATH"], model)

    r = run_cli("train", *args, cwd=root)
    assert r.returncode == 0, r.stderr
    r = run_cli("val", *args, "--CKPT_EPOCH", "1", cwd=root)
    assert r.returncode == 0, r.stderr
    # val is GQA's testdev (openvqa's SPLITS): its predictions in GQA's format, every question by its exact id
    predictions = read_gqa_predictions(results / "result_testdev_gqa.json")
    testdev = gqa["questions"]["testdev"]
    assert set(predictions) == set(testdev) and any(q.startswith("0") for q in predictions)
    # the metrics line holds GQAEval's figures on those predictions, computed from the tree's own files
    line = json.loads((results / "metrics.jsonl").read_text().splitlines()[-1])
    choices = json.loads(Path(gqa["DATASET_PATH"]).parent.joinpath("eval", "testdev_choices.json").read_text())
    expected = gqa_scores(testdev, predictions, choices)
    assert line["split"] == "val" and line["accuracy"] == pytest.approx(expected["accuracy"])
    assert line["per_answer_type"] == pytest.approx({"binary": expected["binary"], "open": expected["open"]})
    for key in ("validity", "plausibility", "distribution", "questions"):
        assert line[key] == pytest.approx(expected[key]), key
    for key in ("per_structural_type", "per_semantic_type", "per_steps", "per_length"):
        assert line[key] == {str(k): v for k, v in expected[key].items()}, key
    assert f"{expected['accuracy']:.2f}%" in r.stdout

    r = run_cli("test", *args, "--CKPT_EPOCH", "1", cwd=root)
    assert r.returncode == 0, r.stderr
    rows = json.loads((results / "result_submission_gqa.json").read_text())
    assert [row["questionId"] for row in rows] == list(gqa["questions"]["submission"])  # exact strings, in order
    answers = {a for _, a, *_ in QA} | {"t shirt"}
    assert all(set(row) == {"questionId", "prediction"} and row["prediction"] in answers for row in rows)

    if model != "mcan":
        return  # predict and check read no dataset file: once is enough
    image = next(Path(gqa["FEATURE_PATH"], "gqa-frcn").glob("n*.npz"))
    r = run_cli("predict", *args, "--CKPT_EPOCH", "1", "--image", str(image), "--question", "Who is wearing the hat?",
                "--top", "3", cwd=root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split(maxsplit=1)[1] in answers for line in lines), r.stdout
    _serve_answers_like_predict(load_config(ROOT / preset, {**keys, "CKPT_EPOCH": 1}), image, lines)
    r = run_cli("check", *args, "--GRAD_ACCU_STEPS", "3", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: equivalent" in r.stdout


@pytest.mark.parametrize("broken", ["questions", "features"])
def test_a_broken_gqa_tree_is_one_clear_error_line(tmp_path, capsys, broken):
    tree = write_gqa_tree(tmp_path, images=2)
    if broken == "questions":
        Path(tree["DATASET_PATH"], "train_balanced_questions.json").unlink()
        expected = (f"missing GQA train question file {tree['DATASET_PATH']}/train_balanced_questions.json; "
                    f"expected openvqa's GQA layout")
    else:
        image = next(iter(tree["questions"]["testdev"].values()))["imageId"]
        Path(tree["FEATURE_PATH"], "gqa-frcn", f"{image}.npz").unlink()
        expected = (f"no GQA features for image {image} of the val questions: expected "
                    f"{tree['FEATURE_PATH']}/gqa-frcn/{image}.npz; 1 of 2 images lack one")
    keys = {"DATASET_PATH": tree["DATASET_PATH"], "FEATURE_PATH": tree["FEATURE_PATH"], "IMG_FEAT_SIZE": 12,
            "VERBOSE": False}
    with pytest.raises(SystemExit) as e:  # the console script's code path, in this process
        main(["prepare", "--config", str(ROOT / "configs/gqa/mcan_small.yml"), *cli_overrides(keys)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_openvqas_train_plus_val_is_refused_since_gqas_val_here_is_testdev(gqa, capsys):
    keys = {**gqa["paths"], "TRAIN_SPLIT": "train+val", "VERBOSE": False}
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(ROOT / "configs/gqa/mcan_small.yml"), *cli_overrides(keys)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "TRAIN_SPLIT 'train+val': DATASET gqa trains on train" in lines[0]


def _serve_answers_like_predict(cfg, features: Path, predicted: list[str]) -> None:
    """serve's page (in this process) answers an uploaded features file as `predict` printed, and a dataset image."""
    from accuvqa.serve import Page

    page = Page(cfg)
    reply = page.ask(None, str(features), None, "Who is wearing the hat?")
    assert [f"{score:.4f}  {answer}" for answer, score in list(reply.answers.items())[:3]] == predicted
    assert page.images and page.images[0].name.startswith("val image ")
    picked = page.ask(None, None, page.images[0].name, page.images[0].questions[0])
    assert len(picked.answers) == 5 and picked.message.startswith(f"Answered from {page.images[0].name}")
