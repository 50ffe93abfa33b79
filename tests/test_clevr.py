"""DATASET clevr: openvqa's CLEVR layout (tests/clevr_tree.py writes a tiny one) through every command, scored as
openvqa's CLEVR evaluation scores it, its dictionaries built as openvqa builds them, features extracted from the
images when only they are there, a bad tree one clear line."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from accuvqa.backbone import build_backbone
from accuvqa.clevr_metrics import FAMILIES, clevr_scores, read_clevr_predictions
from accuvqa.config import load_config
from accuvqa.data.clevr import ClevrLayout, prepare_clevr, question_id
from accuvqa.data.question_store import question_store
from accuvqa.errors import DataError
from accuvqa.recipe import make_loss_fn
from clevr_tree import write_clevr_tree
from conftest import ROOT, TINY, cli_overrides, run_cli

PRESET = ROOT / "configs/clevr/mcan_small.yml"
SMALL = {"IMG_FEAT_SIZE": 8, "IMG_FEAT_PAD_SIZE": 4, "BATCH_SIZE": 8, "GRAD_ACCU_STEPS": 2, "MAX_EPOCH": 1,
         "LOG_EVERY_STEPS": 1}
# another registered model, at tiny sizes, on the preset's data and training keys (MCAN's own keys left out)
MFB = {"MODEL_USE": "mfb", "HIDDEN_SIZE": 16, "MFB_O": 16, "LSTM_OUT_SIZE": 16, "WORD_EMBED_SIZE": 16,
       "NUM_THREADS": 2, "VERBOSE": False}
MCAN_KEYS = ("MODEL_USE", "LAYER", "HIDDEN_SIZE", "FF_SIZE", "MULTI_HEAD", "DROPOUT_R", "FLAT_MLP_SIZE",
             "FLAT_GLIMPSES", "FLAT_OUT_SIZE")


def _common(tree: dict, model: dict, folder: Path) -> list[str]:
    config = PRESET
    if model.get("MODEL_USE", "mcan") != "mcan":
        keys = {k: v for k, v in yaml.safe_load(PRESET.read_text()).items() if k not in MCAN_KEYS}
        config = folder / "clevr_other_model.yml"
        config.write_text(yaml.safe_dump(keys))
    return ["--config", str(config), "--DATASET_PATH", tree["DATASET_PATH"], "--FEATURE_PATH", tree["FEATURE_PATH"],
            "--CKPTS_PATH", "ck", "--RESULT_PATH", "res", "--VERSION", "c", *cli_overrides({**SMALL, **model})]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_hand(questions: list[dict], predictions: list[str]) -> dict:
    """Exact-match accuracy overall, per family and per last program function, counted here."""
    def accuracy(chosen):
        return 100.0 * sum(predictions[i] == questions[i]["answer"] for i in chosen) / len(chosen)
    last = [q["program"][-1]["function"] for q in questions]
    families = {f: [i for i, fn in enumerate(last) if fn in functions] for f, functions in FAMILIES.items()}
    return {"accuracy": accuracy(range(len(questions))),
            "per_answer_type": {f: accuracy(ix) for f, ix in families.items() if ix},
            "per_question_type": {fn: accuracy([i for i, x in enumerate(last) if x == fn]) for fn in set(last)}}


@pytest.mark.parametrize("model", [TINY, MFB], ids=["mcan", "mfb"])
def test_every_command_on_openvqas_clevr_layout(model, tmp_path, monkeypatch):
    tree = write_clevr_tree(tmp_path / "clevr")
    common = _common(tree, model, tmp_path)
    mcan = model is TINY
    if mcan:  # prepare: the tree checked, the stores built, a summary
        r = run_cli("prepare", *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "train" in r.stdout and "20 questions (20 answered), 4 images, 4 feature files, 0 extracted now" in r.stdout
        assert "20 questions (0 answered)" in r.stdout  # test: CLEVR's test questions have no answers

    r = run_cli("train", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = _metrics(tmp_path / "res/c/metrics.jsonl")
    assert line["split"] == "val" and set(line["per_answer_type"]) <= set(FAMILIES)

    r = run_cli("val", *common, "--CKPT_EPOCH", "1", "--TEST_SAVE_PRED", "True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    val_line = _metrics(tmp_path / "res/c/metrics.jsonl")[-1]
    assert f"accuracy           {val_line['accuracy']:.2f}%" in r.stdout
    # the predictions file: one answer a line, in the questions file's order, as openvqa writes it
    questions = tree["questions"]["val"]
    lines = (tmp_path / "res/c/result_val_clevr.txt").read_text().split("\n")
    assert lines[-1] == "" and len(lines) == len(questions) + 1
    saved = {p["question_id"]: p["answer"] for p in json.loads((tmp_path / "res/c/result_val_pred.json").read_text())}
    predictions = [saved[question_id("val", q["question_index"])] for q in questions]
    assert read_clevr_predictions(tmp_path / "res/c/result_val_clevr.txt") == predictions == lines[:-1]
    # the metrics line: openvqa's scoring (clevr_metrics) of those predictions, and a count by hand
    scores, hand = clevr_scores(questions, predictions), _by_hand(questions, predictions)
    assert val_line["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-9)
    assert val_line["accuracy"] == pytest.approx(hand["accuracy"], abs=1e-9)
    assert val_line["per_answer_type"] == pytest.approx(
        {f: row["accuracy"] for f, row in scores["per_family"].items() if row["questions"]}, abs=1e-9)
    assert val_line["per_answer_type"] == pytest.approx(hand["per_answer_type"], abs=1e-9)
    assert val_line["per_question_type"] == pytest.approx(hand["per_question_type"], abs=1e-9)
    if not mcan:
        return

    r = run_cli("test", *common, "--CKPT_EPOCH", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    answers = read_clevr_predictions(tmp_path / "res/c/result_test_clevr.txt")
    vocab = json.loads(next((tmp_path / "clevr/raw").glob("*.qa/vocab.json")).read_text())
    assert len(answers) == len(tree["questions"]["test"]) and set(answers) <= set(vocab[1])

    r = run_cli("predict", *common, "--CKPT_EPOCH", "1", "--image", str(tmp_path / "clevr/feats/val/0.npz"),
                "--question", "How many red things are there?", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scores_out = [float(row.split(maxsplit=1)[0]) for row in r.stdout.strip().splitlines()]
    assert len(scores_out) == 5 and scores_out == sorted(scores_out, reverse=True)
    # serve's page (in this process): the same answers for the uploaded features file, and a dataset image answered
    from accuvqa.cli import parse_overrides
    from accuvqa.serve import Page

    monkeypatch.chdir(tmp_path)  # the run's relative CKPTS_PATH
    page = Page(load_config(common[1], parse_overrides([*common[2:], "--CKPT_EPOCH", "1"])))
    reply = page.ask(None, str(tmp_path / "clevr/feats/val/0.npz"), None, "How many red things are there?")
    picked = page.ask(None, None, page.images[0].name, page.images[0].questions[0])
    assert [f"{score:.4f}  {answer}" for answer, score in reply.answers.items()] == r.stdout.strip().splitlines()
    assert len(picked.answers) == 5 and picked.message.startswith(f"Answered from {page.images[0].name}")

    r = run_cli("check", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: equivalent" in r.stdout


def _openvqa_dicts(tree: dict) -> tuple[dict, dict]:
    """token_to_ix and ans_to_ix as openvqa's clevr_loader.py builds them (its `tokenize` and `ans_stat`)."""
    token_to_ix = {"PAD": 0, "UNK": 1, "CLS": 2}
    for split in ("train", "val", "test"):
        for q in tree["questions"][split]:
            words = re.sub(r"([.,'!?\"()*#:;])", "", q["question"].lower()).replace("-", " ").replace("/", " ").split()
            for word in words:
                token_to_ix.setdefault(word, len(token_to_ix))
    ans_to_ix: dict[str, int] = {}
    for q in tree["questions"]["train"] + tree["questions"]["val"]:
        ans_to_ix.setdefault(q["answer"], len(ans_to_ix))
    return token_to_ix, ans_to_ix


def test_dictionaries_are_openvqas_and_the_store_keeps_the_scoring_data(tmp_path):
    tree = write_clevr_tree(tmp_path / "clevr")
    cfg = load_config(PRESET, {"DATASET_PATH": tree["DATASET_PATH"], "FEATURE_PATH": tree["FEATURE_PATH"],
                               "VERBOSE": False})
    store = question_store(cfg)
    tokens, answers = _openvqa_dicts(tree)
    assert store.vocab.ans_to_ix == answers
    # the same tokens in the same order; openvqa reserves id 2 for CLS, which our dictionary does not have
    assert list(store.vocab.token_to_ix) == [t for t in tokens if t != "CLS"]
    val = store.questions("val", need_answers=True)
    assert val.question_id.tolist() == [question_id("val", q["question_index"]) for q in tree["questions"]["val"]]
    scoring = store.scoring_data("val")
    assert [scoring[str(qid)] for qid in val.question_id.tolist()] == [
        [q["answer"], q["program"][-1]["function"]] for q in tree["questions"]["val"]]
    # train and val images share indices: their ids differ, so train+val reads each image's own features
    train = store.questions("train", need_answers=True)
    assert not set(train.image_id.tolist()) & set(val.image_id.tolist())
    layout = ClevrLayout(cfg)
    assert layout.feature_file("val", int(val.image_id[0])) == Path(tree["FEATURE_PATH"], "val/0.npz")


def test_the_presets_kld_is_openvqas_cross_entropy_on_clevrs_one_hot_targets():
    cfg = load_config(PRESET, {"IMG_FEAT_SIZE": 8, **TINY})
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4, 1, 1, 2])
    batch = {"img_feat": torch.zeros(6, 1, 8), "ques_ix": torch.ones(6, 1, dtype=torch.long),
             "answer_scores": F.one_hot(labels, 5).double()}

    class Fixed(torch.nn.Module):  # a model whose logits are given
        def forward(self, *inputs):
            return logits

    loss, n = make_loss_fn(cfg)(Fixed(), batch)
    assert n == 6 and loss.item() == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-12)


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory) -> Path:
    """A torchvision-keyed resnet50 state dict of seeded random weights (no pretrained weights here)."""
    spec = importlib.util.spec_from_file_location("tv_ref", ROOT / "tests/data/make_torchvision_reference.py")
    tv_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tv_ref)
    shapes = tv_ref.shapes_of(build_backbone("resnet50").state_dict())
    state = {k: v.float() if v.is_floating_point() else v for k, v in tv_ref.seeded_state_dict(shapes, 3).items()}
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path


def test_prepare_extracts_the_features_of_a_tree_of_images(tmp_path, resnet50_weights):
    from PIL import Image

    from accuvqa.extract import Extractor

    tree = write_clevr_tree(tmp_path / "clevr", images_per_split=3, features=False, images=True)
    extract_keys = {"BACKBONE": "resnet50", "BACKBONE_LAYER": "c4", "EXTRACT_RESIZE": "square:64",
                    "BACKBONE_WEIGHTS": str(resnet50_weights), "IMG_FEAT_SIZE": 1024, "IMG_FEAT_PAD_SIZE": 16}
    r = run_cli("prepare", "--config", str(PRESET), "--DATASET_PATH", tree["DATASET_PATH"],
                "--FEATURE_PATH", tree["FEATURE_PATH"], *cli_overrides({**extract_keys, **TINY}), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("3 images, 3 feature files, 3 extracted now") == 3
    # each image's features in openvqa's file name, equal to the extractor's on that very image
    cfg = load_config(PRESET, {**extract_keys, "DATASET_PATH": tree["DATASET_PATH"], "FEATURE_PATH": tree["FEATURE_PATH"],
                               "DEVICE": "cpu", "NUM_THREADS": 2, "VERBOSE": False})
    extractor = Extractor.from_config(cfg)
    for split in ("train", "test"):
        images = [Image.open(Path(tree["DATASET_PATH"], "images", split, f"CLEVR_{split}_{i:06d}.png")) for i in range(3)]
        for index, expected in enumerate(extractor.features(images)):
            with np.load(Path(tree["FEATURE_PATH"], split, f"{index}.npz")) as npz:
                x = npz["x"]
            assert x.shape == (1024, 16)  # 64 / 16 = 4 x 4 cells of layer3
            assert np.abs(x - expected["x"]).max() <= 2e-5 * np.abs(expected["x"]).max()  # float32, batched alike
    assert (Path(tree["FEATURE_PATH"]) / "train.packed/meta.json").is_file()
    # prepared again: nothing to extract
    assert [v["extracted now"] for v in prepare_clevr(cfg).values()] == [0, 0, 0]


def _cfg(tree: dict, **keys) -> object:
    return load_config(PRESET, {"DATASET_PATH": tree["DATASET_PATH"], "FEATURE_PATH": tree["FEATURE_PATH"],
                                "IMG_FEAT_SIZE": 8, "VERBOSE": False, **keys})


def test_a_bad_tree_is_one_clear_line(tmp_path):
    tree = write_clevr_tree(tmp_path / "clevr", images_per_split=2)
    val_file = Path(tree["DATASET_PATH"], "questions/CLEVR_val_questions.json")
    data = json.loads(val_file.read_text())
    del data["questions"][3]["image_index"]
    val_file.write_text(json.dumps(data))
    r = run_cli("prepare", "--config", str(PRESET), "--DATASET_PATH", tree["DATASET_PATH"],
                "--FEATURE_PATH", tree["FEATURE_PATH"], "--IMG_FEAT_SIZE", "8", "--VERBOSE", "False", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{val_file}: question 3 (question_index 3): no 'image_index'" in r.stderr

    data["questions"][3]["image_index"] = 0
    data["questions"][1]["program"] = "count"
    val_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"question 1 .*'program' must be a list of steps with a 'function' each"):
        prepare_clevr(_cfg(tree))
    val_file.write_text("{\"questions\": ")
    with pytest.raises(DataError, match=f"{re.escape(str(val_file))} is not valid JSON"):
        prepare_clevr(_cfg(tree))
    with pytest.raises(DataError, match=r"missing train question file .*CLEVR_train_questions.json.*does not exist"):
        prepare_clevr(_cfg(tree, DATASET_PATH=str(tmp_path / "nowhere")))

    other = write_clevr_tree(tmp_path / "other", images_per_split=2)
    Path(other["FEATURE_PATH"], "train/1.npz").unlink()  # a question's image without features, and no image file
    with pytest.raises(DataError, match=r"no features for 1 train image.*train/1\.npz.*CLEVR_train_000001\.png"):
        prepare_clevr(_cfg(other))
    for path in Path(other["FEATURE_PATH"], "val").iterdir():
        path.unlink()
    Path(other["FEATURE_PATH"], "val").rmdir()
    Path(other["FEATURE_PATH"], "train/1.npz").write_bytes(Path(other["FEATURE_PATH"], "train/0.npz").read_bytes())
    with pytest.raises(DataError, match=r"missing feature folder .*val: extract them with openvqa's"):
        prepare_clevr(_cfg(other))
