"""Your own images and questions (DATASET folder): photos + metadata.jsonl (or Parquet) -> extract/prepare ->
train -> test -> a photo answered through the extractor the checkpoint records, exactly as its extracted features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from accuvqa.config import load_config
from accuvqa.data.folder import FolderLayout, image_key
from accuvqa.errors import DataError
from accuvqa.metrics import vqa_accuracy
from conftest import cli_overrides, own_data_keys, run_cli, save_random_resnet50, write_photo_folder


def _answers(output: str) -> list[tuple[str, str]]:
    """predict's `score  answer` lines."""
    return [tuple(line.split("  ", 1)) for line in output.splitlines() if "  " in line and line[:1].isdigit()]


def test_prepare_extracts_every_readable_photo_and_names_the_corrupt_one(own_data_trained):
    out = own_data_trained["prepare"].stdout
    assert "broken.jpg" in out and "unreadable" in out
    features = Path(own_data_trained["keys"]["FEATURE_PATH"])
    for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
        names = {name for name, _, _ in own_data_trained["photos"][split]} - {"broken.jpg"}
        assert {str(p.relative_to(features / folder))[:-4] for p in (features / folder).rglob("*.npz")} == names
    assert json.loads((features / "train/unreadable.json").read_text()) == ["broken.jpg"]
    spec = json.loads((features / "train/extractor.json").read_text())
    assert (spec["backbone"], spec["layer"], spec["resize"], spec["feat_size"]) == ("resnet50", "c5", "square:64", 2048)
    with np.load(features / "test/test_01.png.npz") as npz:  # a 2x2 grid of 2048-d cells, boxes over the photo
        assert npz["x"].shape == (2048, 4) and npz["bbox"].shape == (4, 4)
        assert npz["bbox"][:, 2].max() == npz["image_w"] and npz["bbox"][:, 3].max() == npz["image_h"]


def test_the_corrupt_photos_questions_are_left_out_and_the_rest_are_read(own_data_trained):
    cfg = load_config(None, own_data_trained["keys"])
    records = FolderLayout(cfg).load_split("train", need_answers=True)
    photos = own_data_trained["photos"]["train"]
    assert len(records) == len(photos) - 1  # the corrupt photo's one question
    assert [r.question for r in records] == [q for name, q, _ in photos if name != "broken.jpg"]
    assert records[0].image_id == image_key("train", photos[0][0]) and records[0].folder == "train"
    assert records[0].answers == tuple(photos[0][2])


def test_val_scores_as_vqa_does_and_test_writes_every_answer(own_data_trained):
    root, keys = own_data_trained["root"], own_data_trained["keys"]
    r = run_cli("val", *cli_overrides({**keys, "TEST_SAVE_PRED": True}), cwd=root)
    assert r.returncode == 0, r.stderr
    predictions = json.loads((root / "results/own/result_val_pred.json").read_text())
    truth = own_data_trained["photos"]["validation"]
    assert len(predictions) == len(truth)
    expected = 100 * np.mean([vqa_accuracy(p["answer"], answers) for p, (_, _, answers) in zip(predictions, truth)])
    line = [json.loads(x) for x in (root / "results/own/metrics.jsonl").read_text().splitlines()][-1]
    assert line["split"] == "val" and line["accuracy"] == pytest.approx(expected, abs=1e-9)
    r = run_cli("test", *cli_overrides(keys), cwd=root)
    assert r.returncode == 0, r.stderr
    submission = json.loads((root / "results/own/result_test.json").read_text())
    assert len(submission) == len(own_data_trained["photos"]["test"])
    assert len({s["question_id"] for s in submission}) == len(submission)


def test_a_photo_is_answered_exactly_as_its_extracted_features(own_data_trained):
    root, keys = own_data_trained["root"], own_data_trained["keys"]
    photo = root / "photos/test/cats/test_03.png"
    common = ["--question", "Is it wide?", "--top", "3", *cli_overrides(keys)]
    from_photo = run_cli("predict", "--image-file", str(photo), *common, cwd=root)
    from_npz = run_cli("predict", "--image", str(root / "features/test/cats/test_03.png.npz"), *common, cwd=root)
    assert from_photo.returncode == 0 and from_npz.returncode == 0, from_photo.stderr + from_npz.stderr
    assert len(_answers(from_photo.stdout)) == 3 and _answers(from_photo.stdout) == _answers(from_npz.stdout)
    drawn = run_cli("predict", "--image-file", str(photo), "--attention", str(root / "att.png"), *common, cwd=root)
    assert drawn.returncode == 0, drawn.stderr
    assert _answers(drawn.stdout) == _answers(from_photo.stdout) and (root / "att.png").stat().st_size > 1000


def test_the_same_features_in_python(own_data_trained):
    from accuvqa.predict import Predictor

    root = own_data_trained["root"]
    predictor = Predictor(load_config(None, own_data_trained["keys"]))
    feats, boxes, size = predictor.photo_regions(root / "photos/test/test_01.png")
    with np.load(root / "features/test/test_01.png.npz") as npz:
        assert np.array_equal(feats, npz["x"].T) and np.array_equal(boxes, npz["bbox"])
        assert size == (int(npz["image_w"]), int(npz["image_h"]))


def test_other_weights_than_the_recorded_ones_are_one_clear_error(own_data_trained, tmp_path):
    other = save_random_resnet50(tmp_path / "other.pth", seed=1)
    keys = {**own_data_trained["keys"], "BACKBONE_WEIGHTS": str(other)}
    r = run_cli("predict", "--image-file", str(own_data_trained["root"] / "photos/test/test_01.png"),
                "--question", "Is it wide?", *cli_overrides(keys), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "are not the ones the training features were extracted with" in r.stderr and "other.pth" in r.stderr


def test_a_model_of_features_of_unknown_origin_asks_for_a_features_file(tiny_trained, tmp_path):
    from accuvqa.predict import Predictor

    predictor = Predictor(tiny_trained)
    predictor.extractor_spec = None  # as for a model trained on VQA v2's downloaded features
    with pytest.raises(DataError, match="trained on features of unknown origin .* give the image's features file"):
        predictor.photo_regions(tmp_path / "photo.jpg")


def _to_parquet(photos_root: Path, out: Path) -> None:
    """The same photos and questions as Parquet files with the image bytes in a struct column (the Hub's form)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (photos_root / split / "metadata.jsonl").read_text().splitlines()]
        table = pa.table({
            "image": [{"bytes": (photos_root / split / r["file_name"]).read_bytes(), "path": r["file_name"]}
                      for r in rows],
            "question": [r["question"] for r in rows],
            "answers": [r.get("answers") or [r["answer"]] for r in rows]})
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "data" / f"{split}-00000-of-00001.parquet")


def test_the_same_from_parquet(own_data_trained, tmp_path):
    _to_parquet(own_data_trained["root"] / "photos", tmp_path / "parquet")
    keys = {**own_data_keys(tmp_path), "DATASET_PATH": str(tmp_path / "parquet"),
            "BACKBONE_WEIGHTS": own_data_trained["keys"]["BACKBONE_WEIGHTS"]}
    for command in ("prepare", "train", "test"):
        r = run_cli(command, *cli_overrides(keys), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        if command == "prepare":
            assert "broken.jpg" in r.stdout
    # the Parquet cell's bytes give the features the photo file gave
    with np.load(tmp_path / "features/test/cats/test_03.png.npz") as a, \
            np.load(own_data_trained["root"] / "features/test/cats/test_03.png.npz") as b:
        assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["bbox"], b["bbox"])
    assert len(json.loads((tmp_path / "results/own/result_test.json").read_text())) == 10
    r = run_cli("predict", "--image-file", str(own_data_trained["root"] / "photos/test/test_01.png"),
                "--question", "Is it wide?", *cli_overrides(keys), cwd=tmp_path)
    assert r.returncode == 0 and len(_answers(r.stdout)) == 5, r.stderr


def test_every_problem_of_a_metadata_file_is_named_with_its_line(tmp_path):
    write_photo_folder(tmp_path / "photos", {"train": 3})
    metadata = tmp_path / "photos/train/metadata.jsonl"
    lines = metadata.read_text().splitlines()
    lines[1] = "{not json"
    lines[2] = json.dumps({"file_name": "missing.jpg", "question": "Why?", "answer": "no"})
    lines[3] = json.dumps({"file_name": "cats/train_00.jpg", "answers": ["yes"]})
    lines[4] = json.dumps({"file_name": "cats/train_00.jpg", "question": "Huh?", "answers": "yes"})
    metadata.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, own_data_keys(tmp_path))
    with pytest.raises(DataError) as e:
        list(FolderLayout(cfg).read_items("train", check_images=True))
    message = str(e.value)
    assert message.startswith(f"the train questions of {tmp_path / 'photos'}: 4 problem(s): ")
    for line, what in ((2, "not valid JSON"), (3, "the image 'missing.jpg' is not in"), (4, "no 'question'"),
                       (5, "'answers' must be a non-empty list of strings")):
        assert f"{metadata}:{line}: {what}" in message
    r = run_cli("prepare", *cli_overrides(own_data_keys(tmp_path)), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "4 problem(s)" in r.stderr, r.stderr
    assert not (tmp_path / "features").exists()  # nothing extracted from a tree with problems


def test_a_folder_without_questions_names_the_layout(tmp_path):
    (tmp_path / "photos").mkdir()
    r = run_cli("prepare", *cli_overrides(own_data_keys(tmp_path)), cwd=tmp_path)
    assert r.returncode == 2 and "no train questions at" in r.stderr and "metadata.jsonl" in r.stderr, r.stderr
