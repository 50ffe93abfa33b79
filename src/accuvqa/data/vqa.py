"""The VQA v2 layout that mcan-vqa reads, and batches of (features, tokens, soft answer scores).

DATASET_PATH holds `v2_OpenEnded_mscoco_<folder>_questions.json` and
`v2_mscoco_<folder>_annotations.json` (folder: train2014, val2014, test2015), optionally
`VG_questions.json` / `VG_annotations.json`. FEATURE_PATH holds `<folder>/COCO_<folder>_<12-digit
image id>.jpg.npz` with `x` stored (D, N) for N regions. The bundled easy-VQA is written in this
same layout by `accuvqa prepare`, so one reader serves both.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from accuvqa.config import Config
from accuvqa.data.vocab import answer_targets, encode_question
from accuvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FOLDERS = {"train": "train2014", "val": "val2014", "test": "test2015"}
SPLITS = ("train", "val", "test", "vg")
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


def feature_file(feature_path: str | Path, folder: str, image_id: int) -> Path:
    """Path of one image's region features."""
    return Path(feature_path) / folder / f"COCO_{folder}_{image_id:012d}.jpg.npz"


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
        raise DataError(f"{path} is not valid JSON: {e}") from None


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
            raise DataError(f"{qpath}: a question or its annotation lacks the key {e}") from None
    return records


def index_features(feature_path: str | Path, folders: Sequence[str]) -> dict[int, Path]:
    """image id -> feature file, over the given feature folders."""
    index: dict[int, Path] = {}
    for folder in folders:
        root = Path(feature_path) / folder
        if not root.is_dir():
            raise DataError(f"missing feature folder {root}; {LAYOUT_HINT}")
        prefix = f"COCO_{folder}_"
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and name.endswith(".jpg.npz"):
                    index[int(name[len(prefix):-len(".jpg.npz")])] = Path(entry.path)
    return index


def read_features(path: Path, feat_size: int, pad_size: int) -> np.ndarray:
    """One image's region features as (N, D) float32, cut to `pad_size` regions (not padded)."""
    try:
        with np.load(path) as npz:
            x = npz["x"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read region features {path}: {e or type(e).__name__}") from None
    if x.ndim != 2 or x.shape[0] != feat_size:
        raise DataError(
            f"{path}: 'x' has shape {x.shape}, expected ({feat_size}, N) with IMG_FEAT_SIZE {feat_size}"
        )
    return np.ascontiguousarray(x.T[:pad_size], dtype=np.float32)


class VQADataset(torch.utils.data.Dataset):
    """Questions with encoded tokens and answer targets; item i of the loader is a whole batch.

    `__getitem__` takes a list of question indices and returns a dict with `img_feat`
    (B, N, D) zero-padded to the batch's longest image (at most IMG_FEAT_PAD_SIZE), `ques_ix`
    (B, T) cut to the batch's longest question, `answer_scores` (B, A) soft scores, and `index`.
    """

    def __init__(self, cfg: Config, records: Sequence[QuestionRecord], token_to_ix: dict[str, int],
                 ans_to_ix: dict[str, int], features: dict[int, Path]) -> None:
        self.records = list(records)
        self.n_answers = len(ans_to_ix)
        self.feat_size = cfg.IMG_FEAT_SIZE
        self.pad_size = cfg.IMG_FEAT_PAD_SIZE
        self.ques_ix = np.stack([encode_question(r.question, token_to_ix, cfg.MAX_TOKEN)
                                 for r in self.records]) if self.records else np.zeros((0, cfg.MAX_TOKEN), np.int64)
        self.targets = [answer_targets(r.answers, ans_to_ix) if r.answers else [] for r in self.records]
        missing = next((r for r in self.records if r.image_id not in features), None)
        if missing is not None:
            raise DataError(
                f"no feature file for image {missing.image_id} (question {missing.question_id}); "
                f"expected {feature_file('FEATURE_PATH', missing.folder or 'train2014', missing.image_id)}"
            )
        self.image_ids = sorted({r.image_id for r in self.records})
        self.image_row = {iid: i for i, iid in enumerate(self.image_ids)}
        self.paths = [features[iid] for iid in self.image_ids]
        self.packed: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        if cfg.PRELOAD:
            self.preload()

    def preload(self) -> None:
        """Read every image's features once into one packed array (N_images, max N, D)."""
        feats = [read_features(p, self.feat_size, self.pad_size) for p in self.paths]
        n_max = max((f.shape[0] for f in feats), default=0)
        self.packed = np.zeros((len(feats), n_max, self.feat_size), dtype=np.float32)
        self.counts = np.array([f.shape[0] for f in feats], dtype=np.int64)
        for i, f in enumerate(feats):
            self.packed[i, : f.shape[0]] = f

    def __len__(self) -> int:
        return len(self.records)

    def image_features(self, rows: Sequence[int]) -> np.ndarray:
        """(B, N, D) features of the given image rows, zero-padded to the longest."""
        if self.packed is not None:
            n = int(self.counts[rows].max()) if len(rows) else 0
            return self.packed[rows, :n]
        feats = [read_features(self.paths[r], self.feat_size, self.pad_size) for r in rows]
        n = max(f.shape[0] for f in feats)
        out = np.zeros((len(feats), n, self.feat_size), dtype=np.float32)
        for i, f in enumerate(feats):
            out[i, : f.shape[0]] = f
        return out

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.array([self.image_row[self.records[i].image_id] for i in indices], dtype=np.int64)
        ques_ix = self.ques_ix[indices]
        t_max = max(int((ques_ix != 0).sum(1).max()), 1) if len(indices) else 1
        scores = np.zeros((len(indices), self.n_answers), dtype=np.float32)
        for b, i in enumerate(indices):
            for a, s in self.targets[i]:
                scores[b, a] = s
        return {
            "img_feat": torch.from_numpy(np.ascontiguousarray(self.image_features(rows))),
            "ques_ix": torch.from_numpy(np.ascontiguousarray(ques_ix[:, :t_max])),
            "answer_scores": torch.from_numpy(scores),
            "index": torch.from_numpy(indices),
        }
