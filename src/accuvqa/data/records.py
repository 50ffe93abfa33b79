"""Questions and annotations in the VQA v2 layout that mcan-vqa reads.

DATASET_PATH holds `v2_OpenEnded_mscoco_<folder>_questions.json` and
`v2_mscoco_<folder>_annotations.json` (folder: train2014, val2014, test2015), optionally
`VG_questions.json` / `VG_annotations.json`. The bundled easy-VQA is written in this same layout by
`accuvqa prepare`, so one reader serves both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accuvqa.config import Config
from accuvqa.errors import ConfigError, DataError

FOLDERS = {"train": "train2014", "val": "val2014", "test": "test2015"}
SPLITS = ("train", "val", "test", "vg")
VG_FOLDERS = ("train2014", "val2014")  # Visual Genome questions sit on COCO train/val images
LAYOUT_HINT = (
    "expected layout: DATASET_PATH/v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json, "
    "DATASET_PATH/v2_mscoco_{train2014,val2014}_annotations.json, "
    "FEATURE_PATH/{train2014,val2014,test2015}/COCO_<folder>_<12-digit id>.jpg.npz "
    "(see docs/vqa-v2.md)"
)


def question_file(dataset_path: str | Path, split: str) -> Path:
    """Path of a split's question JSON."""
    if split == "vg":
        return Path(dataset_path) / "VG_questions.json"
    return Path(dataset_path) / f"v2_OpenEnded_mscoco_{FOLDERS[split]}_questions.json"


def annotation_file(dataset_path: str | Path, split: str) -> Path:
    """Path of a split's annotation JSON."""
    if split == "vg":
        return Path(dataset_path) / "VG_annotations.json"
    return Path(dataset_path) / f"v2_mscoco_{FOLDERS[split]}_annotations.json"


def parse_splits(spec: str) -> list[str]:
    """'train+val+vg' -> ['train', 'val', 'vg'], checking each name."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    bad = [p for p in parts if p not in SPLITS]
    if not parts or bad:
        raise ConfigError(f"unknown split {spec!r}: use train, val, test, vg joined by '+', e.g. train+val")
    return parts


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"missing {what} file {path}; {LAYOUT_HINT}")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class QuestionRecord:
    """One question with what evaluation needs; `answers` is None where there is no annotation."""

    question_id: int
    image_id: int
    question: str
    folder: str  # feature folder of the image
    answers: tuple[str, ...] | None = None
    answer_type: str = ""
    question_type: str = ""
    multiple_choice_answer: str = ""


def load_split(dataset_path: str | Path, split: str, need_answers: bool) -> list[QuestionRecord]:
    """Questions of one split joined with their annotations (required when `need_answers`)."""
    qpath = question_file(dataset_path, split)
    questions = _read_json(qpath, f"{split} question").get("questions")
    if not isinstance(questions, list):
        raise DataError(f"{qpath}: expected a JSON object with a 'questions' list")
    apath = annotation_file(dataset_path, split)
    annotations: dict[int, dict] = {}
    if need_answers or apath.is_file():
        for ann in _read_json(apath, f"{split} annotation").get("annotations", []):
            annotations[ann["question_id"]] = ann
    folder = FOLDERS.get(split, "")
    records = []
    for q in questions:
        try:
            ann = annotations.get(q["question_id"])
            if need_answers and ann is None:
                raise DataError(f"{apath}: no annotation for question_id {q['question_id']} of {qpath}")
            records.append(QuestionRecord(
                question_id=int(q["question_id"]),
                image_id=int(q["image_id"]),
                question=str(q["question"]),
                folder=folder,
                answers=tuple(a["answer"] for a in ann["answers"]) if ann else None,
                answer_type=ann.get("answer_type", "") if ann else "",
                question_type=ann.get("question_type", "") if ann else "",
                multiple_choice_answer=ann.get("multiple_choice_answer", "") if ann else "",
            ))
        except KeyError as e:
            raise DataError(f"{qpath}: a question or its annotation lacks the key {e}") from e
    return records


def load_records(cfg: Config, split_spec: str, need_answers: bool) -> list[QuestionRecord]:
    """Questions of every split in `split_spec` ('train+val' etc.)."""
    records: list[QuestionRecord] = []
    for split in parse_splits(split_spec):
        records += load_split(cfg.DATASET_PATH, split, need_answers)
    return records
