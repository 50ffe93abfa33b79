"""Where a dataset's files are and how they read: one `Layout` per DATASET value.

The builders of the two stores (`question_store.py`, `feature_store.py`) ask a layout which splits
there are, which files a split's questions come from, how to read them into `QuestionRecord`s, which
feature folders a split's images are in and how a folder's files map to image ids. Nothing else
in accuvqa knows a dataset's file names: a new dataset is a new layout (a reader under `data/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from accuvqa.config import Config
from accuvqa.data.features import feature_file, index_features
from accuvqa.data.questions import QuestionArrays
from accuvqa.data.records import (
    FOLDERS,
    LAYOUT_HINT,
    SPLITS,
    VG_FOLDERS,
    QuestionRecord,
    annotation_file,
    load_split,
    question_file,
)
from accuvqa.data.scoring import vqa_score, vqa_submission


class Layout(Protocol):
    """A dataset's files: questions by split, features by folder."""

    name: str  # the DATASET value
    hint: str  # the expected layout, in words, for messages
    feature_path: Path

    def has_split(self, split: str) -> bool:
        """Whether the dataset has this split's questions."""

    def split_file(self, split: str) -> Path:
        """The file that holds a split's questions (named in messages)."""

    def answers_file(self, split: str) -> Path:
        """The file that holds a split's answers (named in messages)."""

    def sources(self) -> list[Path]:
        """Every file the question store is built from, present or not (their states are recorded)."""

    def load_split(self, split: str, need_answers: bool, allow_empty: bool = False) -> list[QuestionRecord]:
        """A split's questions, with their answers (required when `need_answers`); DataError naming the file."""

    def feature_folders(self, split: str) -> tuple[str, ...]:
        """The feature folders (under FEATURE_PATH) a split's images are in."""

    def index_features(self, folder: str) -> dict[int, Path]:
        """image id -> feature file, over one feature folder; DataError when the folder is missing."""

    def feature_file(self, folder: str, image_id: int) -> Path:
        """Where an image's feature file is expected (named in messages)."""

    def scoring_data(self, split: str, records: list[QuestionRecord]) -> Any:
        """What scoring a split needs beyond the question arrays (kept in the question store as
        `<split>.scoring.json`), None when nothing."""

    def score(self, questions: QuestionArrays, answers: list[str], scoring_data: Any) -> dict[str, Any]:
        """The benchmark's scores of `answers` (one per question, in order): `accuracy` (percent),
        `per_answer_type` (the breakdown a metrics line holds), and any figures of its own."""

    def write_predictions(self, out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]
                          ) -> Path | None:
        """The answers in the benchmark's own format (a submission file) in `out_dir`; None when it has none."""


class VQALayout:
    """VQA v2 as mcan-vqa reads it (`records.py`, `features.py`); easy-VQA is written in it."""

    hint = LAYOUT_HINT
    recursive = False

    def __init__(self, cfg: Config) -> None:
        self.name = cfg.DATASET
        self.dataset_path, self.feature_path = Path(cfg.DATASET_PATH), Path(cfg.FEATURE_PATH)

    def has_split(self, split: str) -> bool:
        return question_file(self.dataset_path, split).is_file()

    def split_file(self, split: str) -> Path:
        return question_file(self.dataset_path, split)

    def answers_file(self, split: str) -> Path:
        return annotation_file(self.dataset_path, split)

    def sources(self) -> list[Path]:
        return ([question_file(self.dataset_path, s) for s in SPLITS]
                + [annotation_file(self.dataset_path, s) for s in SPLITS])

    def load_split(self, split: str, need_answers: bool, allow_empty: bool = False) -> list[QuestionRecord]:
        return load_split(self.dataset_path, split, need_answers, allow_empty)

    def feature_folders(self, split: str) -> tuple[str, ...]:
        return (FOLDERS[split],) if split in FOLDERS else VG_FOLDERS

    def index_features(self, folder: str) -> dict[int, Path]:
        return index_features(self.feature_path, [folder])

    def feature_file(self, folder: str, image_id: int) -> Path:
        return feature_file(self.feature_path, folder or FOLDERS["train"], image_id)

    def scoring_data(self, split: str, records: list[QuestionRecord]) -> None:
        return None  # VQA's scoring reads the question arrays alone (the annotators' answers, the types)

    def score(self, questions: QuestionArrays, answers: list[str], scoring_data: Any) -> dict[str, Any]:
        return vqa_score(questions, answers)

    def write_predictions(self, out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]
                          ) -> Path | None:
        return vqa_submission(out_dir, split, questions, answers)


def dataset_layout(cfg: Config) -> Layout:
    """The layout of cfg's DATASET at its DATASET_PATH and FEATURE_PATH."""
    if cfg.DATASET == "folder":
        from accuvqa.data.folder import FolderLayout

        return FolderLayout(cfg)
    if cfg.DATASET in ("clevr", "clevr_shapes"):
        from accuvqa.data.clevr import ClevrLayout

        return ClevrLayout(cfg)
    if cfg.DATASET == "gqa":
        from accuvqa.data.gqa import GqaLayout

        return GqaLayout(cfg)
    return VQALayout(cfg)
