"""`accuvqa prepare --DATASET vqa`: a VQA v2 tree is checked and counted, and a gap is named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accuvqa.cli import main
from accuvqa.config import load_config
from accuvqa.data.validate import validate_vqa_tree
from accuvqa.errors import DataError
from conftest import write_vqa_layout

FOLDERS = {"train": "train2014", "val": "val2014", "test": "test2015"}


def cfg_for(layout: dict, **more):
    return load_config(overrides={"DATASET": "vqa", "DATASET_PATH": layout["DATASET_PATH"],
                                  "FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": 12, **more})


def counts_from_files(layout: dict, split: str) -> dict:
    """Counts read straight from the generated JSON and folders."""
    folder = FOLDERS[split]
    root = Path(layout["DATASET_PATH"])
    questions = json.loads((root / f"v2_OpenEnded_mscoco_{folder}_questions.json").read_text())["questions"]
    ann_path = root / f"v2_mscoco_{folder}_annotations.json"
    annotations = json.loads(ann_path.read_text())["annotations"] if ann_path.exists() else None
    files = sorted(Path(layout["FEATURE_PATH"], folder).glob("*.npz"))
    first_image = questions[0]["image_id"]
    first_file = Path(layout["FEATURE_PATH"], folder, f"COCO_{folder}_{first_image:012d}.jpg.npz")
    return {"questions": len(questions), "annotations": None if annotations is None else len(annotations),
            "images": len({q["image_id"] for q in questions}), "feature_files": len(files),
            "first_regions": np.load(first_file)["x"].shape[1]}


def test_good_tree_counts_match_the_files(vqa_layout):
    summary = validate_vqa_tree(cfg_for(vqa_layout))
    assert list(summary["splits"]) == ["train", "val", "test"]  # val and test: their files are present
    for split, got in summary["splits"].items():
        expected = counts_from_files(vqa_layout, split)
        assert got["questions"] == expected["questions"] == vqa_layout["counts"][split]
        assert got["annotations"] == expected["annotations"]
        assert got["images"] == expected["images"] and got["feature_files"] == expected["feature_files"]
        assert got["sampled_regions"][0] == expected["first_regions"]
    assert summary["notes"] == []


def test_regions_beyond_the_pad_size_are_noted(vqa_layout):
    summary = validate_vqa_tree(cfg_for(vqa_layout, IMG_FEAT_PAD_SIZE=2))  # images have 3 to 9 regions
    assert summary["notes"] and all("beyond IMG_FEAT_PAD_SIZE 2 are cut" in n for n in summary["notes"])


def test_missing_feature_file_is_named_with_the_count(vqa_layout):
    questions = json.loads(Path(vqa_layout["DATASET_PATH"], "v2_OpenEnded_mscoco_val2014_questions.json")
                           .read_text())["questions"]
    image_id = questions[-1]["image_id"]
    gone = Path(vqa_layout["FEATURE_PATH"], "val2014", f"COCO_val2014_{image_id:012d}.jpg.npz")
    gone.unlink()
    with pytest.raises(DataError) as e:
        validate_vqa_tree(cfg_for(vqa_layout))
    assert f"1 of the 6 val images have no feature file, the first {gone}" in str(e.value)


def test_missing_annotation_file_is_named(vqa_layout):
    path = Path(vqa_layout["DATASET_PATH"], "v2_mscoco_train2014_annotations.json")
    path.unlink()
    with pytest.raises(DataError, match=f"missing train annotation file {path}"):
        validate_vqa_tree(cfg_for(vqa_layout))


def test_split_asked_for_but_absent_is_named(vqa_layout):
    with pytest.raises(DataError, match="missing vg question file .*VG_questions.json"):
        validate_vqa_tree(cfg_for(vqa_layout, TRAIN_SPLIT="train+val+vg"))


def test_feature_of_the_wrong_size_is_refused(vqa_layout):
    with pytest.raises(DataError, match=r"neither side is IMG_FEAT_SIZE 2048; if these are 12-d features of \d+ regions, set IMG_FEAT_SIZE 12"):
        validate_vqa_tree(cfg_for(vqa_layout, IMG_FEAT_SIZE=2048))


def run_prepare(layout: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "accuvqa.cli", "prepare", "--DATASET", "vqa",
                           "--DATASET_PATH", layout["DATASET_PATH"], "--FEATURE_PATH", layout["FEATURE_PATH"],
                           "--IMG_FEAT_SIZE", "12"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_prepare_prints_the_counts(tmp_path):
    layout = write_vqa_layout(tmp_path / "data", images_per_split=10)  # answers seen 10 times: a dictionary
    r = run_prepare(layout, tmp_path)
    assert r.returncode == 0, r.stderr
    train = counts_from_files(layout, "train")
    assert f"{train['questions']} questions, {train['annotations']} annotated, {train['images']} images" in r.stdout
    assert "complete" in r.stdout and "test" in r.stdout
    assert "prepared stores" in r.stdout and str(Path(layout["DATASET_PATH"]) / "train.qa") in r.stdout


def test_cli_prepare_of_a_tree_no_run_can_train_on_is_one_line_and_exit_code_2(vqa_layout, tmp_path):
    # 6 images: every answer is seen 6 times, under mcan-vqa's threshold (more than 8): the stores every
    # command reads cannot be built, and prepare says so (it used to leave a note and let runs read the JSON)
    r = run_prepare(vqa_layout, tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("accuvqa: error:")]
    assert errors == ["accuvqa: error: the answer dictionary is empty: no training answer is seen more than ANSWER_MIN_COUNT 8 times (lower it for a small dataset)"]
    assert "Traceback" not in r.stderr


def test_cli_prepare_names_a_gap_in_one_line_with_exit_code_2(vqa_layout, capsys):
    gone = next(Path(vqa_layout["FEATURE_PATH"], "train2014").glob("*.npz"))
    gone.unlink()
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--DATASET", "vqa", "--DATASET_PATH", vqa_layout["DATASET_PATH"],
              "--FEATURE_PATH", vqa_layout["FEATURE_PATH"], "--IMG_FEAT_SIZE", "12", "--VERBOSE", "False"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(gone) in err and len(err.strip().splitlines()) == 1
