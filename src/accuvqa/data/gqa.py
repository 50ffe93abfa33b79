"""GQA (DATASET gqa) in openvqa's layout, scored as openvqa's GQAEval scores it (`gqa_metrics.py`).

openvqa's tree (`openvqa/core/path_cfgs.py`), with DATASET_PATH the questions folder and FEATURE_PATH the
features folder:
```
data/gqa/raw/questions1.2/    = DATASET_PATH: {train,val,testdev}_balanced_questions.json,
                                submission_all_questions.json (each {questionId: {imageId, question, answer, ...}})
data/gqa/raw/eval/            = DATASET_PATH/../eval: <split>_choices.json (valid and plausible answers), optional
data/gqa/feats/gqa-frcn/      = FEATURE_PATH/gqa-frcn: <imageId>.npz with x (N, 2048), bbox (N, 4), width, height
data/gqa/feats/gqa-grid/      = FEATURE_PATH/gqa-grid: <imageId>.npz with x (49, 2048) (not read yet: see below)
```
Our splits, as openvqa maps its run modes (`SPLITS['gqa']`): `train` is train_balanced, `val` (the `accuvqa val`
command and the evaluation after each epoch) is testdev_balanced, `test` is submission_all (no answers: its
predictions are the file GQA's server scores). GQA's own val_balanced is not read (openvqa reads it only when
TRAIN_SPLIT is train+val, and for its dictionaries).

Ids: GQA's question and image ids are strings. A questionId of digits ("07333408") is kept exactly as the int
of "1" + its digits (reversible: the predictions file holds the original text); an imageId of digits is its
int, "n" + digits is 2**61 + the digits, anything else 60 bits of its sha256 above 2**62 (stable, disjoint).

Regions: the frcn features (one row per object, its box, the image's width and height), packed as they are.
openvqa's MCAN also appends the 49 grid features (USE_AUX_FEAT) through a second linear layer, and feeds the
boxes (normalised, with their area) through a third: our models read one region tensor and no such adapter.

Dictionaries: by default as for VQA v2 (tokens of every question file read, PAD and UNK first; answers of the
training questions, ANSWER_MIN_COUNT: the GQA presets set 0, every training answer). openvqa loads a shipped
`dicts.json` built by `utils/proc_dict_gqa.py`; `accuvqa prepare` writes the same dictionaries built by that
rule from the data (tokens of train, val, testdev and submission with PAD, UNK, CLS first; every processed
answer of train, val and testdev), or converted from openvqa's file when DATASET_PATH/dicts.json is there, to
`openvqa_dicts/{token_dict,answer_dict}.json` beside the question store, for TOKEN_DICT_PATH / ANSWER_DICT_PATH.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from accuvqa.config import Config
from accuvqa.data.build import store_home
from accuvqa.data.features import count_regions, read_regions
from accuvqa.data.questions import QuestionArrays
from accuvqa.data.records import QuestionRecord, parse_splits
from accuvqa.data.vocab import prep_answer, tokenize
from accuvqa.errors import ConfigError, DataError
from accuvqa.files import write_json_atomic
from accuvqa.gqa_metrics import gqa_scores, write_gqa_predictions

log = logging.getLogger(__name__)

# our split -> GQA's name for it (openvqa's SPLITS['gqa']: val runs on testdev) and its question file
GQA_SPLITS = {"train": "train", "val": "testdev", "test": "submission"}
QUESTION_FILES = {"train": "train_balanced_questions.json", "val": "val_balanced_questions.json",
                  "testdev": "testdev_balanced_questions.json", "submission": "submission_all_questions.json"}
FRCN, GRID = "gqa-frcn", "gqa-grid"
OPENVQA_DICTS = "dicts.json"  # openvqa's openvqa/datasets/gqa/dicts.json, copied into DATASET_PATH
DICTS_FOLDER = "openvqa_dicts"
HINT = ("expected openvqa's GQA layout: DATASET_PATH (data/gqa/raw/questions1.2) holding "
        "{train,testdev}_balanced_questions.json and submission_all_questions.json, FEATURE_PATH (data/gqa/feats) "
        "holding gqa-frcn/<imageId>.npz (x, bbox, width, height); see docs/datasets.md")
# the fields of a question that GQA's scoring reads (gqa_metrics.gqa_scores)
SCORED_FIELDS = ("question", "answer", "isBalanced", "types", "groups", "semantic")
_N_PREFIX, _HASHED = 2**61, 2**62


def question_key(qid: str) -> int:
    """The int64 id of a GQA questionId of digits: the int of "1" + the digits (`question_text` reverses it)."""
    if not (isinstance(qid, str) and qid.isdigit() and qid.isascii() and len(qid) <= 18):
        raise DataError(f"GQA questionId {qid!r} is not a string of at most 18 digits, as GQA's are")
    return int("1" + qid)


def question_text(key: int) -> str:
    """The questionId that `question_key` turned into `key`."""
    return str(key)[1:]


def image_key(image_id: str) -> int:
    """The int64 id of a GQA imageId: digits -> their int, "n" + digits -> 2**61 + their int, else hashed above 2**62."""
    if image_id.isascii() and image_id.isdigit() and (image_id == "0" or image_id[0] != "0") and len(image_id) < 18:
        return int(image_id)
    rest = image_id[1:]
    if image_id[:1] == "n" and rest.isascii() and rest.isdigit() and rest[0] != "0" and len(rest) < 18:
        return _N_PREFIX + int(rest)
    return _HASHED + int(hashlib.sha256(image_id.encode()).hexdigest()[:15], 16)


def image_text(key: int) -> str | None:
    """The imageId that `image_key` turned into `key`; None for a hashed one."""
    return None if key >= _HASHED else (f"n{key - _N_PREFIX}" if key >= _N_PREFIX else str(key))


def read_questions(path: Path, what: str) -> dict[str, dict[str, Any]]:
    """One GQA questions file: {questionId: question}; DataError naming the file."""
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist: check DATASET_PATH)"
        raise DataError(f"missing GQA {what} question file {path}{where}; {HINT}")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read GQA question file {path}: {e.strerror}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"GQA question file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(q, dict) for q in data.values()):
        raise DataError(f"{path}: expected GQA's questions, a JSON object {{questionId: {{imageId, question, "
                        f"answer, ...}}}}")
    return data


class GridPacking:
    """An image's frcn regions followed by its grid cells (`gqa-grid/<imageId>.npz`, x (49, D)), each cell's box
    a square of the image's 7 x 7 grid: what `feature_store.pack_folder` packs with GQA_GRID True."""

    plan = {"grid": True}

    def __init__(self, grid_folder: Path) -> None:
        self.grid_folder = grid_folder
        self.sources = (grid_folder,)

    def _grid_file(self, path: Path) -> Path:
        grid = self.grid_folder / path.name
        if not grid.is_file():
            raise DataError(f"missing grid features {grid} of {path} (GQA_GRID True joins them to its regions); "
                            f"{HINT}")
        return grid

    def count(self, path: Path, feat_size: int) -> int:
        return count_regions(path, feat_size) + count_regions(self._grid_file(path), feat_size)

    def read(self, path: Path, feat_size: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
        x, boxes, size = read_regions(path, feat_size)
        grid, _, _ = read_regions(self._grid_file(path), feat_size)
        side = int(round(len(grid) ** 0.5))
        if side * side != len(grid):
            raise DataError(f"{self._grid_file(path)}: {len(grid)} grid cells, not a square grid (GQA's is 7 x 7)")
        width, height = size if size is not None else (side, side)
        edges_x, edges_y = np.linspace(0, width, side + 1), np.linspace(0, height, side + 1)
        cells = np.array([[edges_x[c], edges_y[r], edges_x[c + 1], edges_y[r + 1]]
                          for r in range(side) for c in range(side)], dtype=np.float32)  # row-major, as x's rows
        regions = np.zeros((len(x), 4), dtype=np.float32) if boxes is None else boxes
        return np.concatenate([x, grid]), np.concatenate([regions, cells]), size


class GqaLayout:
    """DATASET gqa: the module docstring's layout, at DATASET_PATH and FEATURE_PATH."""

    name = "gqa"
    hint = HINT
    recursive = False

    def __init__(self, cfg: Config) -> None:
        self.dataset_path, self.feature_path = Path(cfg.DATASET_PATH), Path(cfg.FEATURE_PATH)
        self.grid = cfg.GQA_GRID
        if parse_splits(cfg.TRAIN_SPLIT) != ["train"]:  # openvqa's train+val means val_balanced; our val is testdev
            raise ConfigError(f"TRAIN_SPLIT {cfg.TRAIN_SPLIT!r}: DATASET gqa trains on train (train_balanced) only; "
                              f"its val is testdev_balanced, the split it is scored on (docs/datasets.md#gqa)")

    def choices_file(self, split: str) -> Path:
        """Where GQA's valid and plausible answers of a split are (openvqa's raw/eval/<split>_choices.json)."""
        return self.dataset_path.parent / "eval" / f"{GQA_SPLITS.get(split, split)}_choices.json"

    # --- questions
    def has_split(self, split: str) -> bool:
        return split in GQA_SPLITS and self.split_file(split).is_file()

    def split_file(self, split: str) -> Path:
        return self.dataset_path / QUESTION_FILES[GQA_SPLITS.get(split, "train")]

    def answers_file(self, split: str) -> Path:
        return self.split_file(split)

    def sources(self) -> list[Path]:
        return [self.split_file(s) for s in GQA_SPLITS] + [self.choices_file("val")]  # val alone is scored

    def load_split(self, split: str, need_answers: bool, allow_empty: bool = False) -> list[QuestionRecord]:
        if split not in GQA_SPLITS:
            raise DataError(f"GQA has no split {split!r}: its splits are train (train_balanced), val "
                            f"(testdev_balanced) and test (submission_all)")
        path = self.split_file(split)
        questions = read_questions(path, GQA_SPLITS.get(split, split))
        if not questions and not allow_empty:
            raise DataError(f"{path} holds no questions: split {split} ({GQA_SPLITS.get(split, split)}) is empty")
        records = []
        for qid, q in questions.items():
            try:
                answer = q.get("answer")
                if need_answers and not isinstance(answer, str):
                    raise DataError(f"{path}: question {qid} has no 'answer', which {split} questions need")
                structural = (q.get("types") or {}).get("structural", "")
                records.append(QuestionRecord(
                    question_id=question_key(qid), image_id=image_key(str(q["imageId"])), question=str(q["question"]),
                    folder=FRCN, answers=(answer,) * 10 if isinstance(answer, str) else None,  # ten agreeing: exact
                    answer_type=("open" if structural == "query" else "binary") if structural else "",
                    question_type=str((q.get("types") or {}).get("detailed", "")),
                    multiple_choice_answer=answer if isinstance(answer, str) else ""))
            except (KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}: question {qid} lacks {e} or has a malformed value; {HINT}") from e
        return records

    # --- features
    def feature_folders(self, split: str) -> tuple[str, ...]:
        return (FRCN,)

    def index_features(self, folder: str) -> dict[int, Path]:
        root = self.feature_path / folder
        if not root.is_dir():
            why = "" if self.feature_path.is_dir() else f" (FEATURE_PATH {self.feature_path} does not exist)"
            raise DataError(f"missing GQA feature folder {root}{why}; {HINT}")
        return {image_key(path.name[: -len(".npz")]): path for path in root.glob("*.npz") if path.is_file()}

    def feature_file(self, folder: str, image_id: int) -> Path:
        return self.feature_path / folder / f"{image_text(image_id) or '<imageId>'}.npz"

    def packing(self, folder: str) -> GridPacking | None:
        """With GQA_GRID: each image's regions are its frcn regions, then its grid cells (feature_store.pack_folder)."""
        return GridPacking(self.feature_path / GRID) if self.grid and folder == FRCN else None

    # --- scoring: openvqa's GQAEval, GQA's predictions file
    def scoring_data(self, split: str, records: list[QuestionRecord]) -> dict[str, Any] | None:
        """The val split's questions as GQAEval reads them ({questionId: the scored fields}), and its choices."""
        if split != "val":
            return None  # train is never scored, test (submission) has no answers
        questions = read_questions(self.split_file(split), GQA_SPLITS[split])
        scored = {qid: {k: q.get(k) for k in SCORED_FIELDS} for qid, q in questions.items()}
        choices = None
        if self.choices_file(split).is_file():
            try:
                every = json.loads(self.choices_file(split).read_bytes())
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read GQA choices file {self.choices_file(split)}: {e}") from e
            choices = {qid: every[qid] for qid in scored if qid in every}
        return {"questions": scored, "choices": choices}

    def score(self, questions: QuestionArrays, answers: list[str], scoring_data: Any) -> dict[str, Any]:
        if not isinstance(scoring_data, dict) or "questions" not in scoring_data:
            raise DataError("GQA scoring needs the split's questions kept in the question store (its "
                            "<split>.scoring.json); delete the question store: the next command builds it again")
        predictions = dict(zip((question_text(q) for q in questions.question_id.tolist()), answers))
        scores = gqa_scores(scoring_data["questions"], predictions, scoring_data.get("choices"))
        if scores["accuracy"] is None:
            raise DataError("no balanced GQA question to score (isBalanced is false for every question)")
        per_answer_type = {k: scores[k] for k in ("binary", "open") if scores[k] is not None}
        return {"accuracy": scores["accuracy"], "per_answer_type": per_answer_type,
                **{k: v for k, v in scores.items() if k not in ("accuracy", "binary", "open", "consistency")}}

    def write_predictions(self, out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]
                          ) -> Path | None:
        """`result_<split>_gqa.json`: `[{"questionId", "prediction"}]`, GQA's format (GQA's split name)."""
        name = f"result_{GQA_SPLITS.get(split, split)}_gqa.json"
        return write_gqa_predictions(Path(out_dir) / name,
                                     zip((question_text(q) for q in questions.question_id.tolist()), answers))


# --- openvqa's dictionaries (utils/proc_dict_gqa.py)
def openvqa_dictionaries(dataset_path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """(token_to_ix, ans_to_ix, max_token) by openvqa's rule: tokens of train, val, testdev and submission
    after PAD, UNK, CLS, in first-seen order; every processed answer of train, val and testdev."""
    read = {name: read_questions(dataset_path / file, name) if name == "train" or (dataset_path / file).is_file()
            else {} for name, file in QUESTION_FILES.items()}  # openvqa needs all four; we read those there are
    token_to_ix = {"PAD": 0, "UNK": 1, "CLS": 2}
    max_token = 0
    for question in {**read["train"], **read["val"], **read["testdev"], **read["submission"]}.values():
        words = tokenize(question["question"])
        max_token = max(max_token, len(words))
        for word in words:
            token_to_ix.setdefault(word, len(token_to_ix))
    ans_to_ix: dict[str, int] = {}
    for question in {**read["train"], **read["val"], **read["testdev"]}.values():
        ans_to_ix.setdefault(prep_answer(question["answer"]), len(ans_to_ix))
    return token_to_ix, ans_to_ix, max_token


def read_openvqa_dicts(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """(token_to_ix, ans_to_ix, max_token) from openvqa's dicts.json (`[ans_to_ix, ix_to_ans, token_to_ix, max_token]`)."""
    try:
        ans_to_ix, _, token_to_ix, max_token = json.loads(path.read_text())
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not openvqa's GQA dicts.json ([ans_to_ix, ix_to_ans, token_to_ix, "
                        f"max_token]): {e}") from e
    return token_to_ix, ans_to_ix, int(max_token)


def write_openvqa_dicts(cfg: Config) -> dict[str, Any]:
    """openvqa's dictionaries as TOKEN_DICT_PATH / ANSWER_DICT_PATH files beside the question store (from
    DATASET_PATH/dicts.json when there, else built by openvqa's rule); their paths, source and sizes."""
    dataset_path = Path(cfg.DATASET_PATH)
    source = dataset_path / OPENVQA_DICTS
    if source.is_file():
        token_to_ix, ans_to_ix, max_token = read_openvqa_dicts(source)
    else:
        token_to_ix, ans_to_ix, max_token = openvqa_dictionaries(dataset_path)
    out = store_home(cfg.STORE_PATH, dataset_path) / DICTS_FOLDER
    tokens = write_json_atomic(out / "token_dict.json", token_to_ix)
    answers = write_json_atomic(out / "answer_dict.json", [ans_to_ix, {str(i): a for a, i in ans_to_ix.items()}])
    return {"token_dict": str(tokens), "answer_dict": str(answers), "max_token": max_token,
            "tokens": len(token_to_ix), "answers": len(ans_to_ix),
            "from": str(source) if source.is_file() else "the questions (openvqa's rule)"}


# --- accuvqa prepare
def prepare_gqa(cfg: Config) -> dict[str, Any]:
    """Check the tree (question files, a frcn feature file for every question's image), write openvqa's
    dictionaries; per split: GQA's name, questions, images, and the grid files found."""
    layout = GqaLayout(cfg)
    if not layout.has_split("train"):
        layout.load_split("train", need_answers=True)  # the DataError naming the file
    features = layout.index_features(FRCN)
    grid = layout.feature_path / GRID
    grid_images = {image_key(p.name[:-4]) for p in grid.glob("*.npz")} if grid.is_dir() else set()
    splits: dict[str, Any] = {}
    for split in GQA_SPLITS:
        if not layout.has_split(split):
            continue
        records = layout.load_split(split, need_answers=split == "train")
        images = Counter(r.image_id for r in records)
        missing = [i for i in images if i not in features]
        if missing:
            raise DataError(f"no GQA features for image {image_text(missing[0]) or missing[0]} of the {split} "
                            f"questions: expected {layout.feature_file(FRCN, missing[0])}; {len(missing)} of "
                            f"{len(images)} images lack one; {HINT}")
        splits[split] = {"file": layout.split_file(split).name, "questions": len(records), "images": len(images),
                         "grid": len(set(images) & grid_images),
                         "choices": layout.choices_file(split).is_file()}
    return {"splits": splits, "dicts": write_openvqa_dicts(cfg)}
