"""Questions and annotations in the VQA v2 layout that mcan-vqa reads.

DATASET_PATH holds `v2_OpenEnded_mscoco_<folder>_questions.json` and
`v2_mscoco_<folder>_annotations.json` (folder: train2014, val2014, test2015), optionally
`VG_questions.json` / `VG_annotations.json`. The bundled easy-VQA is written in this same layout by
`accuvqa prepare`, so one reader serves both.
"""

from __future__ import annotations

import difflib
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
        name = repr(bad[0]) + (f" in {spec!r}" if spec.strip() != bad[0] else "") if bad else repr(spec)
        close = difflib.get_close_matches(bad[0], SPLITS, n=1) if bad else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown split {name}{hint}: use train, val, test, vg joined by '+', e.g. train+val")
    return parts


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        folder = path.parent
        why = (f" (the folder {folder} does not exist: check DATASET_PATH, or run `accuvqa prepare` "
               f"for the bundled easy-VQA)" if not folder.is_dir() else "")
        raise DataError(f"missing {what} file {path}{why}; {LAYOUT_HINT}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read {what} file {path}: {e.strerror}") from e
    if not data.strip():
        raise DataError(f"{what} file {path} is empty; expected the JSON of VQA v2 (an interrupted download?)")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {path} is not valid JSON: {e}") from e


def _json_list(data: Any, path: Path, key: str) -> list:
    """`data[key]` when `data` is a JSON object holding a list of objects there; a DataError otherwise."""
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        got = "" if isinstance(data, dict) else f", got a JSON {type(data).__name__}"
        raise DataError(f"{path}: expected a JSON object with a {key!r} list of objects{got}")
    return items


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


def load_split(dataset_path: str | Path, split: str, need_answers: bool,
               allow_empty: bool = False) -> list[QuestionRecord]:
    """Questions of one split joined with their annotations (required when `need_answers`).

    A split without questions is a DataError unless `allow_empty` (the token dictionary reads
    every question file there is, used or not).
    """
    qpath = question_file(dataset_path, split)
    questions = _json_list(_read_json(qpath, f"{split} question"), qpath, "questions")
    if not questions and not allow_empty:
        raise DataError(f"{qpath} holds no questions (its 'questions' list is empty): split {split} is empty")
    apath = annotation_file(dataset_path, split)
    annotations: dict[int, dict] = {}
    if need_answers or apath.is_file():
        try:
            for ann in _json_list(_read_json(apath, f"{split} annotation"), apath, "annotations"):
                annotations[ann["question_id"]] = ann
        except (KeyError, TypeError) as e:
            raise DataError(f"{apath}: an annotation lacks a usable 'question_id' ({e})") from e
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
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{qpath}: question {q.get('question_id', '?')} or its annotation lacks the key {e} "
                            f"or has a malformed value") from e
    return records


def load_records(cfg: Config, split_spec: str, need_answers: bool) -> list[QuestionRecord]:
    """Questions of every split in `split_spec` ('train+val' etc.)."""
    records: list[QuestionRecord] = []
    for split in parse_splits(split_spec):
        records += load_split(cfg.DATASET_PATH, split, need_answers)
    return records
