"""A generated VQA v2-layout dataset goes through the commands a VQA v2 user types."""

import json
from pathlib import Path

import pytest

from conftest import write_vqa_layout
from conftest import ROOT, run_cli

SMALL = ["--LAYER", "1", "--HIDDEN_SIZE", "32", "--MULTI_HEAD", "4", "--FLAT_MLP_SIZE", "32",
         "--FLAT_OUT_SIZE", "64", "--WORD_EMBED_SIZE", "16", "--IMG_FEAT_SIZE", "12",
         "--IMG_FEAT_PAD_SIZE", "6", "--BATCH_SIZE", "16", "--MAX_EPOCH", "2", "--NUM_THREADS", "2"]


@pytest.mark.slow
def test_prepare_train_val_test_on_a_generated_vqa_v2_tree(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=12)  # each answer 12 times: in the dictionary
    common = ["--config", str(ROOT / "configs/small.yml"), "--DATASET", "vqa",
              "--DATASET_PATH", layout["DATASET_PATH"], "--FEATURE_PATH", layout["FEATURE_PATH"],
              "--CKPTS_PATH", "ckpts", "--RESULT_PATH", "results", "--VERSION", "gen", *SMALL]

    r = run_cli("prepare", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in r.stdout.splitlines()[1:] if line.startswith("  ")}
    assert rows["train"].startswith(f"{layout['counts']['train']} questions, {layout['counts']['train']} annotated, "
                                    f"12 images, 12 feature files")
    assert rows["test"].startswith(f"{layout['counts']['test']} questions, 12 images, 12 feature files")
    # then the stores every other command reads, beside the data
    assert "prepared stores" in r.stdout
    counts = ", ".join(f"{split} {layout['counts'][split]}" for split in ("train", "val", "test"))
    assert rows["questions"].startswith(f"{layout['DATASET_PATH']}/train.qa (") and rows["questions"].endswith(
        f"; {counts})")
    for folder in ("train2014", "val2014", "test2015"):
        assert rows[folder].startswith(f"{layout['FEATURE_PATH']}/{folder}.packed (")
        assert Path(layout["FEATURE_PATH"], f"{folder}.packed", "features.npy").is_file()

    r = run_cli("train", *common, "--GRAD_ACCU_STEPS", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr  # prepare built every store train reads
    state = json.loads(Path(tmp_path, "results/gen/metrics.jsonl").read_text().splitlines()[-1])
    assert state["split"] == "val" and state["epoch"] == 2

    # the alias form an mcan-vqa user types reaches the same evaluation
    r = run_cli("--RUN=val", "--MODEL=small", *common[2:],
                "--CKPT_V=gen", "--CKPT_E=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{state['accuracy']:.2f}%" in r.stdout

    r = run_cli("test", *common, "--CKPT_VERSION", "gen", "--CKPT_EPOCH", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    submission = json.loads(Path(tmp_path, "results/gen/result_test.json").read_text())
    questions = json.loads(Path(layout["DATASET_PATH"], "v2_OpenEnded_mscoco_test2015_questions.json").read_text())
    assert sorted(s["question_id"] for s in submission) == sorted(q["question_id"] for q in questions["questions"])
    answers = {"black", "2", "yes", "no", "laptop", "dark", "3", "computer"}
    assert all(s["answer"] in answers for s in submission)
