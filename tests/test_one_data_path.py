"""One data path: commands read only the prepared stores, which they build themselves when missing.

Three copies of one generated VQA v2-layout tree (same seed, same bytes) are run through the CLI:
- `prepared`: `accuvqa prepare`, then every question/annotation JSON and every per-image `.npz`
  moved away, then train, val, test;
- `in_place`: `accuvqa prepare`, then train, val, test with the sources in place;
- `fresh`: train, val, test with no prepare (the first command builds the stores).
All three must end with bit-identical weights and the same metrics lines and test answers.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, cli_overrides, run_cli, write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size
KEYS = {**TINY, "VERBOSE": True, "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "MAX_TOKEN": 6, "BATCH_SIZE": 10, "MAX_EPOCH": 2,
        "GRAD_ACCU_STEPS": 2, "SEED": 3, "VERSION": "run"}


def _run_all(root: Path, prepare: bool, move_sources_away: bool) -> dict:
    layout = write_vqa_layout(root, images_per_split=10, seed=7)
    args = cli_overrides({**KEYS, "DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                          "CKPTS_PATH": root / "ckpts", "RESULT_PATH": root / "results"})
    if prepare:
        done = run_cli("prepare", *args, cwd=root)
        assert done.returncode == 0, done.stderr
    if move_sources_away:
        aside = root / "aside"
        aside.mkdir()
        for path in Path(layout["DATASET_PATH"]).glob("*.json"):
            shutil.move(path, aside / path.name)
        for folder in ("train2014", "val2014", "test2015"):
            shutil.move(Path(layout["FEATURE_PATH"]) / folder, aside / folder)
        assert not list(Path(layout["DATASET_PATH"]).glob("*.json"))
        assert not list(Path(layout["FEATURE_PATH"]).rglob("*.jpg.npz"))
    logs = {}
    for command in ("train", "val", "test"):
        done = run_cli(command, *args, cwd=root)
        assert done.returncode == 0, done.stderr
        logs[command] = done.stderr
    state = torch.load(root / "ckpts" / "ckpt_run" / "epoch2.pkl", weights_only=True)
    metrics = [json.loads(line) for line in (root / "results" / "run" / "metrics.jsonl").read_text().splitlines()]
    answers = json.loads((root / "results" / "run" / "result_test.json").read_text())
    return {"weights": state["state_dict"], "metrics": metrics, "answers": answers, "logs": logs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {name: _run_all(tmp_path_factory.mktemp(name), prepare, away)
            for name, prepare, away in (("prepared", True, True), ("in_place", True, False), ("fresh", False, False))}


def _assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key  # bit for bit
    assert a["metrics"] == b["metrics"]
    assert a["answers"] == b["answers"]


def test_with_the_json_and_npz_moved_away_a_prepared_tree_trains_and_scores_as_with_them_in_place(runs):
    prepared, in_place = runs["prepared"], runs["in_place"]
    # what is compared is real: two epochs of val lines (train + val command), weights that moved
    assert [m["split"] for m in prepared["metrics"]] == ["val", "val", "val"]
    assert len(prepared["answers"]) == 50
    _assert_same(prepared, in_place)
    assert "building" not in prepared["logs"]["train"]  # prepare built everything: nothing built again


def test_train_on_a_fresh_tree_builds_the_stores_itself_and_ends_as_prepare_then_train(runs):
    fresh, in_place = runs["fresh"], runs["in_place"]
    _assert_same(fresh, in_place)
    log = fresh["logs"]["train"]
    assert "building the question store" in log and "building the packed feature store" in log
    assert "building" not in fresh["logs"]["val"]  # built once, then current


def test_the_runs_learned_something_the_comparison_would_see(runs, tmp_path):
    # a control: another SEED changes the weights, so equal weights above are not an accident of the set-up
    layout = write_vqa_layout(tmp_path, images_per_split=10, seed=7)
    args = cli_overrides({**KEYS, "SEED": 4, "DATASET_PATH": layout["DATASET_PATH"],
                          "FEATURE_PATH": layout["FEATURE_PATH"], "CKPTS_PATH": tmp_path / "ckpts",
                          "RESULT_PATH": tmp_path / "results"})
    done = run_cli("train", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    other = torch.load(tmp_path / "ckpts" / "ckpt_run" / "epoch2.pkl", weights_only=True)["state_dict"]
    assert any(not torch.equal(other[k], runs["in_place"]["weights"][k]) for k in other)
