"""Bad inputs, as a new user meets them: each is exit code 2 and ONE line on stderr naming the
culprit (file, key or value), no traceback, and no checkpoint or result file that was there changes.

The CLI cases run `python -m accuvqa` in a subprocess against a run that already holds a checkpoint
(ck/ckpt_good/epoch1.pkl) and results (res/good/); the in-process tests below them check the same
guards quickly (corrupt checkpoints of many shapes, code-running pickles, what the data scan warns).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from accuvqa.checkpoint import load_checkpoint
from accuvqa.config import load_config
from accuvqa.data.dataset import VQADataset
from accuvqa.data.feature_store import open_features
from accuvqa.data.features import index_features
from accuvqa.data.loader import make_dataset
from accuvqa.data.questions import encode_records
from accuvqa.data.records import load_split
from accuvqa.data.vocab import Vocab, build_token_dict, tokenize
from accuvqa.errors import CheckpointError, DataError
from conftest import TINY, cli_overrides, run_cli, write_vqa_layout

# the tiny layout with 10 images per split: every answer of the 5 questions is seen 10 times, so the
# answer dictionary is not empty; qids 1-50 train (images 1000-1009), 51-100 val (2000-2009), 101-150 test
IMAGES = 10
DATA = {"DATASET_PATH": "vqa", "FEATURE_PATH": "feats", "IMG_FEAT_SIZE": 12, "CKPTS_PATH": "ck",
        "RESULT_PATH": "res", "BATCH_SIZE": 10, "MAX_EPOCH": 1}
BASE = cli_overrides({**TINY, **DATA})
GOOD = [*BASE, "--VERSION", "good", "--CKPT_EPOCH", "1"]  # the run that is there
NEW = [*BASE, "--VERSION", "new"]  # a new training run
VAL_NPZ = "feats/val2014/COCO_val2014_000000002001.jpg.npz"
VAL_Q = "vqa/v2_OpenEnded_mscoco_val2014_questions.json"
VOCAB = Vocab({"PAD": 0, "UNK": 1}, {"yes": 0})  # dictionaries for the in-process datasets


class RunsCode:
    """Unpickling this calls os.system: what a checkpoint from an untrusted source may hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def code_pickle(path: Path, marker: Path, how: str = "pickle") -> Path:
    """A file that runs `touch marker` when unpickled: plain pickle, or torch.save's zip format."""
    state = {"state_dict": {}, "epoch": 1, "payload": RunsCode(marker)}
    if how == "pickle":
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding the tiny layout and a run 'good' trained one epoch on it (checkpoint + metrics)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    write_vqa_layout(root, images_per_split=IMAGES)
    r = run_cli("train", *BASE, "--VERSION", "good", cwd=root)
    assert r.returncode == 0, r.stderr
    assert (root / "ck/ckpt_good/epoch1.pkl").is_file() and (root / "res/good/metrics.jsonl").is_file()
    return root


@pytest.fixture
def world(trained, tmp_path) -> Path:
    """A fresh copy of the trained folder, plus a submission file in res/good to be kept intact."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (tmp_path / "res/good/result_test.json").write_text('[{"question_id": 101, "answer": "yes"}]')
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under the checkpoint and result folders."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for folder in ("ck", "res") for p in sorted((root / folder).rglob("*")) if p.is_file()}


def original_checkpoint(w: Path) -> Path:
    """The trained checkpoint as mcan-vqa saves one: weights, optimizer, lr_base; no dictionaries."""
    state = torch.load(w / "ck/ckpt_good/epoch1.pkl", weights_only=True)
    path = w / "mcan.pkl"
    torch.save({k: state[k] for k in ("state_dict", "optimizer", "lr_base")}, path)
    return path


def stored_dicts(w: Path) -> tuple[dict, dict]:
    state = torch.load(w / "ck/ckpt_good/epoch1.pkl", weights_only=True)
    return state["token_to_ix"], state["ans_to_ix"]


def answer_file(w: Path, name: str, ans_to_ix: dict) -> str:
    (w / name).write_text(json.dumps([ans_to_ix, {str(i): a for a, i in ans_to_ix.items()}]))
    return name


def token_file(w: Path, name: str, token_to_ix: dict) -> str:
    (w / name).write_text(json.dumps(token_to_ix))
    return name


def _evil(command: str, how: str = "pickle") -> Callable[[Path], tuple[list[str], str]]:
    def case(w: Path) -> tuple[list[str], str]:
        code_pickle(w / "evil.pkl", w / "MARKER", how)
        extra = {"val": [], "test": [], "train": ["--RESUME", "True"],
                 "predict": ["--image", VAL_NPZ, "--question", "What color is the cat?"]}[command]
        return ([command, *GOOD, "--CKPT_PATH", "evil.pkl", *extra],
                "refused to load evil.pkl: it is not a plain checkpoint (it would call ")
    return case


def _then(*steps):
    """The last of its arguments: a case's set-up steps, then its (command line, message)."""
    return steps[-1]


def _write(path: Path, content: bytes | str) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _prepare(w: Path) -> None:
    """`accuvqa prepare` in the folder: its stores current."""
    r = run_cli("prepare", *BASE, cwd=w)
    assert r.returncode == 0, r.stderr


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(200, len(data) - 200, 97):  # inside the stored array, not the zip directory
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# id -> (prepare the folder, return the command line and the expected part of the one error line)
CASES: dict[str, Callable[[Path], tuple[list[str], str | tuple[str, ...]]]] = {
    # --- checkpoints
    "ckpt_random_bytes": lambda w: _then(
        _write(w / "rand.pkl", random.Random(0).randbytes(3000)),
        (["val", *GOOD, "--CKPT_PATH", "rand.pkl"], "cannot load checkpoint rand.pkl: it is corrupt or not a PyTorch "
                                                     "checkpoint")),
    "ckpt_pop_from_empty_list": lambda w: _then(  # torch.load raised IndexError with a traceback
        _write(w / "junk.pkl", b"\x80\x02."),
        (["val", *GOOD, "--CKPT_PATH", "junk.pkl"], "cannot load checkpoint junk.pkl: it is corrupt or not a PyTorch "
                                                     "checkpoint (IndexError: pop from empty list)")),
    "ckpt_truncated": lambda w: _then(
        shutil.copy(w / "ck/ckpt_good/epoch1.pkl", w / "half.pkl"), _truncate(w / "half.pkl"),
        (["val", *GOOD, "--CKPT_PATH", "half.pkl"], "cannot load checkpoint half.pkl: it is truncated")),
    "ckpt_other_layer": lambda w: (
        ["val", *GOOD, "--LAYER", "2"],
        "ck/ckpt_good/epoch1.pkl was trained with LAYER 1 but the config has LAYER 2; set --LAYER 1"),
    "ckpt_other_hidden_size": lambda w: (
        ["val", *GOOD, "--HIDDEN_SIZE", "64"],
        "ck/ckpt_good/epoch1.pkl was trained with HIDDEN_SIZE 32 but the config has HIDDEN_SIZE 64; "
        "set --HIDDEN_SIZE 32"),
    "mcan_ckpt_other_layer": lambda w: (  # no config stored: the weights that differ are named
        ["val", *GOOD, "--CKPT_PATH", original_checkpoint(w).name, "--LAYER", "2"],
        ("mcan.pkl does not match the configured model (mcan): ", " weights missing (first backbone.enc_list.1.")),
    "ckpt_epoch_missing": lambda w: (
        ["val", *BASE, "--VERSION", "good", "--CKPT_EPOCH", "3"],
        "checkpoint ck/ckpt_good/epoch3.pkl does not exist; ck/ckpt_good holds epoch1.pkl"),
    "resume_a_run_that_has_none": lambda w: (
        ["train", *BASE, "--RESUME", "True", "--VERSION", "nothere", "--CKPT_EPOCH", "1"],
        "checkpoint ck/ckpt_nothere/epoch1.pkl does not exist; there is no folder ck/ckpt_nothere"),
    "answer_dict_of_another_size": lambda w: (
        ["val", *GOOD, "--CKPT_PATH", original_checkpoint(w).name, "--ANSWER_DICT_PATH",
         answer_file(w, "small.json", dict(list(stored_dicts(w)[1].items())[:-1]))],
        "mcan.pkl: proj.weight has 5 rows but the answer dictionary has 4 entries (ANSWER_DICT_PATH small.json)"),
    "token_dict_of_another_size": lambda w: (
        ["val", *GOOD, "--CKPT_PATH", original_checkpoint(w).name, "--TOKEN_DICT_PATH",
         token_file(w, "big.json", {**stored_dicts(w)[0], "zebra": len(stored_dicts(w)[0])}),
         "--ANSWER_DICT_PATH", answer_file(w, "same.json", stored_dicts(w)[1])],
        "mcan.pkl: embedding.weight has 20 rows but the token dictionary has 21 entries (TOKEN_DICT_PATH big.json)"),
    "answer_dict_contradicts_the_checkpoint": lambda w: (  # same size: was silently ignored
        ["val", *GOOD, "--ANSWER_DICT_PATH",
         answer_file(w, "perm.json", {a: len(stored_dicts(w)[1]) - 1 - i for a, i in stored_dicts(w)[1].items()})],
        "ANSWER_DICT_PATH perm.json (5 answers) contradicts the answer dictionary stored in checkpoint "
        "ck/ckpt_good/epoch1.pkl (5 answers; 'black' is 4 in the file, 0 in the checkpoint); drop ANSWER_DICT_PATH"),
    "token_dict_contradicts_the_checkpoint": lambda w: (
        ["val", *GOOD, "--TOKEN_DICT_PATH", token_file(w, "tokens.json", build_token_dict(["what is this"]))],
        "TOKEN_DICT_PATH tokens.json (5 tokens) contradicts the token dictionary stored in checkpoint "
        "ck/ckpt_good/epoch1.pkl (20 tokens;"),
    "code_pickle_val": _evil("val"),
    "code_pickle_test": _evil("test"),
    "code_pickle_predict": _evil("predict"),
    "code_pickle_train_resume": _evil("train"),
    "code_pickle_in_torch_zip_val": _evil("val", how="zip"),
    # --- data
    "npz_truncated": lambda w: _then(
        _truncate(w / VAL_NPZ),
        (["val", *GOOD], f"cannot read region features {VAL_NPZ}: it is truncated or not an .npz file")),
    "npz_corrupt": lambda w: _then(
        _flip(w / VAL_NPZ), (["val", *GOOD], f"cannot read region features {VAL_NPZ}: it is corrupt")),
    "npz_missing": lambda w: _then(
        (w / VAL_NPZ).unlink(),
        (["val", *GOOD], f"no features for image 2001 (question 56): expected {VAL_NPZ} in its folder when the "
                         f"packed feature store was built")),
    "npz_of_another_feature_size": lambda w: _then(
        np.savez(w / VAL_NPZ, x=np.zeros((16, 5), np.float32)),
        (["val", *GOOD], f"{VAL_NPZ}: 'x' has shape (16, 5), and neither side is IMG_FEAT_SIZE 12; if these are "
                         f"16-d features of 5 regions, set IMG_FEAT_SIZE 16")),
    "img_feat_size_not_the_features": lambda w: (
        ["train", *NEW, "--IMG_FEAT_SIZE", "16"],
        ("feats/train2014/COCO_train2014_000000001000.jpg.npz: 'x' has shape (12, ",
         "and neither side is IMG_FEAT_SIZE 16; if these are 12-d features of ", "regions, set IMG_FEAT_SIZE 12")),
    "question_json_broken": lambda w: _then(
        _write(w / VAL_Q, '{"questions": ['),
        (["val", *GOOD], f"val question file {VAL_Q} is not valid JSON: Expecting value: line 1")),
    "question_json_empty_file": lambda w: _then(
        _write(w / VAL_Q, ""), (["val", *GOOD], f"val question file {VAL_Q} is empty")),
    "annotation_json_empty_file": lambda w: _then(
        _write(w / "vqa/v2_mscoco_val2014_annotations.json", ""),
        (["val", *GOOD], "val annotation file vqa/v2_mscoco_val2014_annotations.json is empty")),
    "question_json_not_an_object": lambda w: _then(
        _write(w / VAL_Q, "[]"),
        (["val", *GOOD], f"{VAL_Q}: expected a JSON object with a 'questions' list of objects, got a JSON list")),
    "split_without_questions": lambda w: _then(
        _write(w / "vqa/v2_OpenEnded_mscoco_train2014_questions.json", '{"questions": []}'),
        (["train", *NEW], "vqa/v2_OpenEnded_mscoco_train2014_questions.json holds no questions")),
    "dataset_folder_missing": lambda w: (
        ["train", *NEW, "--DATASET_PATH", "nowhere"],
        "missing train question file nowhere/v2_OpenEnded_mscoco_train2014_questions.json (the folder nowhere "
        "does not exist"),
    "feature_folder_missing": lambda w: (
        ["val", *GOOD, "--FEATURE_PATH", "nowhere"],
        "missing feature folder nowhere/val2014 (FEATURE_PATH nowhere does not exist)"),
    # --- prepared stores (made current by `prepare` first: the copied ones were built for the other folder)
    "packed_store_truncated": lambda w: _then(
        _prepare(w), _truncate(w / "feats/val2014.packed/features.npy"),
        (["val", *GOOD], ("packed feature store feats/val2014.packed", "delete it: the next command packs it again"))),
    "question_store_damaged": lambda w: _then(
        _prepare(w), _truncate(w / "vqa/train.qa/val.npz"),
        (["val", *GOOD], "question arrays vqa/train.qa/val.npz cannot be read")),
    # --- config and command line
    "unknown_dataset": lambda w: (
        ["train", *NEW, "--DATASET", "coco"], ("DATASET must be one of vqa, easyvqa, folder", "got 'coco'")),
    "unknown_split": lambda w: (
        ["train", *NEW, "--TRAIN_SPLIT", "train+vall"], "unknown split 'vall' in 'train+vall' (did you mean 'val'?)"),
    "unknown_model": lambda w: (
        ["train", *NEW, "--MODEL_USE", "mcann"], "MODEL_USE 'mcann' is not a registered model"),
    "batch_larger_than_the_data": lambda w: (
        ["train", *NEW, "--BATCH_SIZE", "1000"], "BATCH_SIZE 1000 is larger than the training set (50 questions)"),
    "predict_missing_image": lambda w: (
        ["predict", *GOOD, "--image", "nope.npz", "--question", "What color is the cat?"],
        "image nope.npz does not exist"),
    "yaml_not_a_mapping": lambda w: _then(
        _write(w / "list.yml", "- LAYER: 2\n"),
        (["train", "--config", "list.yml", *NEW], "list.yml: expected a mapping of KEY: value, got list")),
    "config_file_missing": lambda w: (
        ["train", "--config", "nosuch.yml", *NEW], "cannot read config file nosuch.yml: No such file or directory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_changes_no_file(world, case):
    args, message = CASES[case](world)
    before = snapshot(world)
    r = run_cli(*args, cwd=world)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("accuvqa: error: "), r.stderr
    assert all(part in r.stderr for part in ((message,) if isinstance(message, str) else message)), r.stderr
    assert snapshot(world) == before  # the run's checkpoint and results are untouched
    assert not (world / "ck/ckpt_new").exists() or not any((world / "ck/ckpt_new").iterdir())
    assert not (world / "MARKER").exists()  # nothing in a refused pickle ran


# ----------------------------------------------------------------------------- in-process, quick

@pytest.mark.parametrize("how", ["pickle", "zip"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = code_pickle(tmp_path / "evil.pkl", marker, how)
    # the control: an ordinary unpickling of that file does run the code
    if how == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"refused to load .*evil.pkl: it is not a plain checkpoint "
                                              r"\(it would call (posix|nt)\.system when loaded"):
        load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_truncated_checkpoints_are_one_checkpoint_error(tmp_path):
    """torch.load of a damaged file raises IndexError, OSError, KeyError, struct.error, ...: each is
    one CheckpointError naming the file."""
    rng = random.Random(0)
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "ans_to_ix": {"yes": 0}}, tmp_path / "good.pkl")
    good = (tmp_path / "good.pkl").read_bytes()
    damaged = [rng.randbytes(rng.choice([1, 10, 100, 3000])) for _ in range(60)]
    damaged += [b"\x80\x02" + rng.randbytes(rng.choice([1, 10, 100])) for _ in range(60)]
    damaged += [good[: len(good) * k // 40] for k in range(1, 40)]
    path = tmp_path / "damaged.pkl"
    for content in damaged:
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"cannot load checkpoint {path}: "):
            load_checkpoint(path)


def test_a_truncated_feature_file_is_named_when_the_dataset_is_built(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=2)
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": 12})
    records = load_split(cfg.DATASET_PATH, "val", need_answers=True)
    features = index_features(cfg.FEATURE_PATH, ["val2014"])
    bad = features[records[-1].image_id]
    _truncate(bad)
    with pytest.raises(DataError, match=f"cannot read region features {bad}: it is truncated"):
        make_dataset(cfg, records, VOCAB)  # at start (its folder is packed first), not mid-epoch


def test_what_is_cut_is_one_warning_each_for_regions_and_questions(tmp_path, caplog):
    layout = write_vqa_layout(tmp_path, images_per_split=IMAGES)
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": 12, "IMG_FEAT_PAD_SIZE": 5, "MAX_TOKEN": 3})
    records = load_split(cfg.DATASET_PATH, "train", need_answers=True)
    files = index_features(cfg.FEATURE_PATH, ["train2014"])
    # independent counts: every .npz read in full, every question tokenized
    regions = [np.load(files[i])["x"].shape[1] for i in sorted({r.image_id for r in records})]
    lengths = [len(tokenize(r.question)) for r in records]
    over = [n for n in regions if n > 5]
    long = [n for n in lengths if n > 3]
    assert over and long and len(over) < len(regions)
    features = open_features(cfg.FEATURE_PATH, ["train2014"], 12)

    with caplog.at_level(logging.WARNING):
        VQADataset(cfg, encode_records(records, VOCAB, cfg.MAX_TOKEN), features)
    assert [r.getMessage() for r in caplog.records] == [
        f"{len(over)} of {len(regions)} train images have more than IMG_FEAT_PAD_SIZE 5 regions (up to {max(over)}); "
        f"{sum(n - 5 for n in over)} regions are dropped, as mcan-vqa does",
        f"{len(long)} of {len(lengths)} train questions are longer than MAX_TOKEN 3 tokens (up to {max(long)}); "
        f"they are cut"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # nothing cut: nothing said
        VQADataset(cfg.replace(IMG_FEAT_PAD_SIZE=100, MAX_TOKEN=14), encode_records(records, VOCAB, 14), features)
    assert caplog.records == []
