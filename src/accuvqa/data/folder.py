"""Your own images and questions (DATASET folder), in Hugging Face's `imagefolder` convention or as Parquet.

DATASET_PATH holds one folder per split, `train/`, `validation/` (or `val/`) and `test/`, each with its
images (subfolders allowed) and a `metadata.jsonl` whose lines read
`{"file_name": "cat.jpg", "question": "What is it?", "answers": ["cat", "cat", "kitten"]}`:
`answers` the annotators' answers, scored as VQA scores them, or `answer` one answer (counted as ten
annotators agreeing, so scoring is exact match); `question_id`, `answer_type`, `question_type` optional.
Or the same data as Parquet files with the image bytes in a column (the form VQA sets take on the
Hugging Face Hub): `<split>-*.parquet` or `<split>/*.parquet`, at DATASET_PATH or under `data/`, with
columns `image` (a struct of `bytes` and `path`, or bytes), `question`, and `answers` or `answer`.

Features: `FEATURE_PATH/<split>/<file name>.npz`, one per image, as `accuvqa extract` writes them
(`accuvqa prepare` runs it for the images that have none; features of your own, in the same place,
are read as they are). An image the extractor could not read is listed in
`FEATURE_PATH/<split>/unreadable.json`; its questions are left out, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from accuvqa.config import Config
from accuvqa.data.questions import QuestionArrays
from accuvqa.data.records import QuestionRecord
from accuvqa.data.scoring import vqa_score, vqa_submission
from accuvqa.errors import DataError

log = logging.getLogger(__name__)

# our split -> the folder names Hugging Face's convention accepts for it, first preferred
SPLIT_FOLDERS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
UNREADABLE_FILE = "unreadable.json"
METADATA = "metadata.jsonl"
HINT = ("expected layout: DATASET_PATH/{train,validation,test}/metadata.jsonl (lines of file_name, question, "
        "answers or answer) beside the images, or DATASET_PATH/[data/]{train,validation,test}-*.parquet "
        "(columns image, question, answers or answer); see docs/own-data.md")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
MAX_PROBLEMS = 10  # problems named in one message


def image_key(split: str, name: str) -> int:
    """The image id of `name` in a split: 60 bits of the sha256 of `<split>/<name>` (stable, never reused)."""
    return int(hashlib.sha256(f"{split}/{name}".encode()).hexdigest()[:15], 16)


def answer_type(answer: str) -> str:
    """VQA's answer types from the most common answer: yes/no, number, other."""
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


@dataclass(frozen=True)
class Item:
    """One question of a split, as read: where it was (file and line or row), its image, its fields."""

    where: str  # "metadata.jsonl:12" or "train-00000.parquet row 12"
    image: str  # the image's name in the split (a relative path, or a Parquet image's path or hash)
    question: str
    answers: tuple[str, ...] | None
    question_id: int | None
    answer_type: str
    question_type: str


class Problems:
    """Problems found while reading, each with its line; raised together as one DataError."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.found.append(f"{where}: {what}")

    def raise_any(self, what: str) -> None:
        if self.found:
            more = len(self.found) - MAX_PROBLEMS
            raise DataError(f"{what}: {len(self.found)} problem(s): " + "; ".join(self.found[:MAX_PROBLEMS])
                            + (f"; and {more} more" if more > 0 else ""))


def _fields(row: dict[str, Any], where: str, problems: Problems) -> tuple[str, tuple[str, ...] | None] | None:
    """(question, answers) of one row, or None with its problems noted."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        problems.add(where, "no 'question' (a non-empty string)")
        return None
    answers: Any = row.get("answers")
    if answers is None and row.get("answer") is not None:
        answer = row["answer"]
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            problems.add(where, f"'answer' must be a string, got {type(answer).__name__}")
            return None
        return question, (str(answer),) * 10  # one answer: ten annotators agreeing (exact match when scored)
    if answers is None:
        return question, None
    if not isinstance(answers, list) or not answers:
        problems.add(where, "'answers' must be a non-empty list of strings (the annotators' answers)")
        return None
    out = []
    for a in answers:
        a = a.get("answer") if isinstance(a, dict) else a  # the Hub's VQA sets: [{"answer": ..., ...}]
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            problems.add(where, f"'answers' holds {a!r}, not a string")
            return None
        out.append(str(a))
    return question, tuple(out)


def _optional_int(row: dict[str, Any], key: str, where: str, problems: Problems) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(where, f"'{key}' must be an integer, got {value!r}")
        return None
    return value


def _item(row: Any, where: str, image: str, problems: Problems) -> Item | None:
    if not isinstance(row, dict):
        problems.add(where, f"expected a JSON object, got {type(row).__name__}")
        return None
    qa = _fields(row, where, problems)
    qid = _optional_int(row, "question_id", where, problems)
    if qa is None:
        return None
    return Item(where, image, qa[0], qa[1], qid, str(row.get("answer_type") or ""), str(row.get("question_type") or ""))


def read_metadata(path: Path, check_images: bool, problems: Problems) -> list[Item]:
    """The questions of one `metadata.jsonl`, each problem noted with its line."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.add(where, f"not valid JSON ({e})")
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        if isinstance(row, dict) and (not isinstance(name, str) or not name.strip()):
            problems.add(where, "no 'file_name' (the image's path relative to the split's folder)")
            continue
        if isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts):
            problems.add(where, f"file_name {name!r} must be a path inside {path.parent}")
            continue
        if check_images and isinstance(name, str) and not (path.parent / name).is_file():
            problems.add(where, f"the image {name!r} is not in {path.parent}")
            continue
        item = _item(row, where, str(name), problems)
        if item is not None:
            items.append(item)
    if not items and not problems.found:
        problems.add(str(path), "holds no questions")
    return items


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("Parquet files need pyarrow: pip install 'accuvqa[parquet]'") from e
    return pq


def _parquet_image(cell: Any, where: str, problems: Problems) -> tuple[str, bytes] | None:
    """(name, encoded bytes) of one Parquet image cell: the Hub's {bytes, path} struct, or bytes."""
    data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if not isinstance(data, (bytes, bytearray)) or not data:
        problems.add(where, "the 'image' column holds no image bytes")
        return None
    name = path if isinstance(path, str) and path.strip() and ".." not in Path(path).parts else (
        hashlib.sha256(data).hexdigest()[:16] + ".jpg")  # no path: named for its contents, so shared images count once
    return name.lstrip("/"), bytes(data)


def iter_parquet(files: list[Path], problems: Problems, with_bytes: bool
                 ) -> Iterator[tuple[Item, bytes | None]]:
    """Each row of the Parquet files as (Item, the image's bytes when `with_bytes`), problems noted by row."""
    pq = _parquet()
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own types for a file that is not Parquet
            raise DataError(f"cannot read {path} as Parquet: {e}") from e
        columns = parquet.schema_arrow.names
        missing = [c for c in ("image", "question") if c not in columns]
        if missing or not {"answers", "answer"} & set(columns) and "test" not in path.name:
            need = missing or ["answers or answer"]
            raise DataError(f"{path} has no column {', '.join(need)} (it has {', '.join(columns)}); {HINT}")
        row_number = 0
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                where = f"{path} row {row_number}"
                row_number += 1
                image = _parquet_image(row.get("image"), where, problems)
                if image is None:
                    continue
                item = _item(row, where, image[0], problems)
                if item is not None:
                    yield item, (image[1] if with_bytes else None)


class FolderLayout:
    """DATASET folder: the module docstring's layout, at DATASET_PATH and FEATURE_PATH."""

    name = "folder"
    hint = HINT
    recursive = True  # feature files keep the images' subfolders

    def __init__(self, cfg: Config) -> None:
        self.dataset_path, self.feature_path = Path(cfg.DATASET_PATH), Path(cfg.FEATURE_PATH)

    # --- questions
    def metadata_file(self, split: str) -> Path | None:
        """The split's `metadata.jsonl`, None when it has none."""
        for folder in SPLIT_FOLDERS.get(split, ()):
            if (self.dataset_path / folder / METADATA).is_file():
                return self.dataset_path / folder / METADATA
        return None

    def parquet_files(self, split: str) -> list[Path]:
        """The split's Parquet files, in name order."""
        found: list[Path] = []
        for root in (self.dataset_path, self.dataset_path / "data"):
            for folder in SPLIT_FOLDERS.get(split, ()):
                found += sorted(root.glob(f"{folder}-*.parquet")) + sorted(root.glob(f"{folder}.parquet"))
                found += sorted((root / folder).glob("*.parquet"))
        return list(dict.fromkeys(found))

    def has_split(self, split: str) -> bool:
        return self.metadata_file(split) is not None or bool(self.parquet_files(split))

    def split_file(self, split: str) -> Path:
        files = self.parquet_files(split)
        return self.metadata_file(split) or (files[0] if files else
                                             self.dataset_path / SPLIT_FOLDERS.get(split, (split,))[0] / METADATA)

    def answers_file(self, split: str) -> Path:
        return self.split_file(split)

    def sources(self) -> list[Path]:
        files = []
        for split in SPLIT_FOLDERS:
            files += [self.dataset_path / folder / METADATA for folder in SPLIT_FOLDERS[split]]
            files += self.parquet_files(split) + [self.feature_path / split / UNREADABLE_FILE]
        return files

    def read_items(self, split: str, check_images: bool = False, with_bytes: bool = False
                   ) -> Iterator[tuple[Item, bytes | None]]:
        """A split's questions as read, problems raised together at the end as one DataError."""
        problems = Problems()
        metadata = self.metadata_file(split)
        if metadata is not None:
            for item in read_metadata(metadata, check_images, problems):
                yield item, None
        elif self.parquet_files(split):
            yield from iter_parquet(self.parquet_files(split), problems, with_bytes)
        else:
            raise DataError(f"no {split} questions at {self.dataset_path}: {HINT}")
        problems.raise_any(f"the {split} questions of {self.dataset_path}")

    def image_source(self, split: str, name: str) -> Path:
        """Where the image of a metadata.jsonl line is."""
        metadata = self.metadata_file(split)
        return (metadata.parent if metadata is not None else self.dataset_path / split) / name

    def unreadable(self, split: str) -> set[str]:
        """The split's images that extraction could not read (their questions are left out)."""
        try:
            names = json.loads((self.feature_path / split / UNREADABLE_FILE).read_text())
        except (OSError, ValueError):
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def load_split(self, split: str, need_answers: bool, allow_empty: bool = False) -> list[QuestionRecord]:
        items = [item for item, _ in self.read_items(split)]
        unreadable = self.unreadable(split)
        kept = [item for item in items if item.image not in unreadable]
        if len(kept) < len(items):
            log.warning("%d %s question(s) on %d image(s) that could not be read are left out (listed in %s)",
                        len(items) - len(kept), split, len({i.image for i in items} & unreadable),
                        self.feature_path / split / UNREADABLE_FILE)
        if need_answers:
            missing = next((item for item in kept if item.answers is None), None)
            if missing is not None:
                raise DataError(f"{missing.where}: no 'answers' or 'answer', which {split} questions need")
        records = []
        for n, item in enumerate(kept):
            common = Counter(item.answers).most_common(1)[0][0] if item.answers else ""
            records.append(QuestionRecord(
                question_id=item.question_id if item.question_id is not None else _SPLIT_CODE[split] * 10**9 + n,
                image_id=image_key(split, item.image), question=item.question, folder=split, answers=item.answers,
                answer_type=item.answer_type or (answer_type(common) if item.answers else ""),
                question_type=item.question_type, multiple_choice_answer=common))
        ids = Counter(r.question_id for r in records)
        twice = next((q for q, c in ids.items() if c > 1), None)
        if twice is not None:
            raise DataError(f"the {split} questions of {self.dataset_path} give question_id {twice} to "
                            f"{ids[twice]} questions; give each its own, or leave question_id out")
        if not records and not allow_empty:
            raise DataError(f"{self.split_file(split)} holds no usable {split} questions")
        return records

    # --- features
    def feature_folders(self, split: str) -> tuple[str, ...]:
        return (split,)

    def index_features(self, folder: str) -> dict[int, Path]:
        root = self.feature_path / folder
        if not root.is_dir():
            raise DataError(f"missing feature folder {root}: `accuvqa prepare` extracts the features of the "
                            f"{folder} images into it (it needs BACKBONE_WEIGHTS); {HINT}")
        return {image_key(folder, str(path.relative_to(root))[: -len(".npz")]): path
                for path in root.rglob("*.npz") if path.is_file()}

    def feature_file(self, folder: str, image_id: int) -> Path:
        return self.feature_path / folder / "<image file name>.npz"

    # --- scoring: as VQA scores (the annotators' answers), the test answers in VQA's submission format
    def scoring_data(self, split: str, records: list[QuestionRecord]) -> None:
        return None

    def score(self, questions: QuestionArrays, answers: list[str], scoring_data: Any) -> dict[str, Any]:
        return vqa_score(questions, answers)

    def write_predictions(self, out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]
                          ) -> Path | None:
        return vqa_submission(out_dir, split, questions, answers)


def image_sources(layout: FolderLayout, split: str) -> tuple[list[Any], Callable[[str], Path]]:
    """The split's distinct images as `extract.ImageSource`s (read from files, or from Parquet cells), with
    the feature file each gets."""
    from accuvqa.extract import ImageSource

    sources: dict[str, Any] = {}
    for item, data in layout.read_items(split, check_images=True, with_bytes=True):
        if item.image in sources:
            continue
        if data is not None:
            sources[item.image] = ImageSource(item.image, (lambda blob=data: blob))
        else:
            path = layout.image_source(split, item.image)
            sources[item.image] = ImageSource(item.image, path.read_bytes)
    return list(sources.values()), (lambda name: layout.feature_path / split / f"{name}.npz")


def prepare_folder(cfg: Config) -> dict[str, dict[str, Any]]:
    """Check every split's questions (every problem named with its line), extract the features of the images
    that have none (`accuvqa extract`'s extractor, BACKBONE_*), list the unreadable ones; counts per split."""
    from accuvqa.extract import Extractor, extract
    from accuvqa.files import write_json_atomic

    layout = FolderLayout(cfg)
    splits = [s for s in SPLIT_FOLDERS if layout.has_split(s)]
    if "train" not in splits:
        raise DataError(f"no train questions at {cfg.DATASET_PATH}: {HINT}")
    extractor = None
    summary: dict[str, dict[str, Any]] = {}
    for split in splits:
        sources, feature_file = image_sources(layout, split)
        unreadable = layout.unreadable(split)
        todo = {s.name for s in sources if not feature_file(s.name).is_file()}
        extracted = 0
        if todo and not (todo <= unreadable and not cfg.BACKBONE_WEIGHTS):  # only known-bad ones, no weights: skip
            extractor = extractor or Extractor.from_config(cfg)
            done = extract(sources, layout.feature_path / split, extractor, cfg.EXTRACT_BATCH_SIZE, cfg.VERBOSE)
            extracted, unreadable = done.done, {name for name, _ in done.bad}
            for name, why in done.bad:
                log.warning("%s image %s cannot be read (%s): its questions are left out", split, name, why)
            write_json_atomic(layout.feature_path / split / UNREADABLE_FILE, sorted(unreadable))
        summary[split] = {"images": len(sources), "extracted now": extracted, "unreadable": sorted(unreadable)}
    return summary
