"""CLEVR (DATASET clevr) in the layout openvqa reads it, scored as openvqa's CLEVR evaluation scores it.

DATASET_PATH is CLEVR v1.0's folder (openvqa's `data/clevr/raw`): `questions/CLEVR_{train,val,test}_questions.json`
(`{"questions": [{question, answer, program [{function, inputs, value_inputs}], image_index, image_filename,
question_family_index, question_index, split}]}`; the test file has no answer nor program), and for `accuvqa
prepare` to extract features, `images/{train,val,test}/CLEVR_<split>_<6-digit index>.png`.
FEATURE_PATH is openvqa's `data/clevr/feats`: `{train,val,test}/<image_index>.npz` with `x` (196, 1024), the
grid of a ResNet-101 cut after layer3 on 224 x 224 images (`data/clevr/clevr_extract_feat.py`; `x` is read in
either orientation). When a split's features are missing and its images are there, `accuvqa prepare` extracts
them with `accuvqa extract`'s extractor (BACKBONE resnet101, BACKBONE_LAYER c4, EXTRACT_RESIZE square:224 in
configs/clevr/mcan_small.yml).

The vocabularies are openvqa's (`openvqa/datasets/clevr/clevr_loader.py`): tokens of every question file, train
then val then test, in first-seen order, split as mcan-vqa splits (the same rule); answers as given, every one
kept (ANSWER_MIN_COUNT 0), each question's one answer its target. A split's image_index and question_index count
from 0 in each split; our ids put the split in front (see `image_id`, `question_id`), since one run may read
several splits' features (TRAIN_SPLIT train+val).
"""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

from accuvqa.clevr_metrics import FAMILIES, clevr_scores, write_clevr_predictions
from accuvqa.config import Config
from accuvqa.data.questions import QuestionArrays
from accuvqa.data.records import QuestionRecord
from accuvqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
IMAGE_BASE = 10**7  # image id = split code * IMAGE_BASE + image_index (CLEVR splits hold at most 70,000 images)
QUESTION_BASE = 10**8  # question id = split code * QUESTION_BASE + question_index (at most 699,989 questions)
HINT = ("expected openvqa's CLEVR layout: DATASET_PATH/questions/CLEVR_{train,val,test}_questions.json (CLEVR "
        "v1.0's folder, openvqa's data/clevr/raw), FEATURE_PATH/{train,val,test}/<image_index>.npz (openvqa's "
        "data/clevr/feats), or DATASET_PATH/images/{train,val,test}/*.png for `accuvqa prepare` to extract them; "
        "see docs/datasets.md")
_IMAGE_FILE = re.compile(r".*_(\d+)\.png")  # CLEVR_train_000123.png -> 123, as openvqa's extraction script reads it
_FAMILY_OF = {function: family for family, functions in FAMILIES.items() for function in functions}
NO_PROGRAM = "(no program)"  # the question type of an answered question that has no functional program


def image_id(split: str, image_index: int) -> int:
    """Our image id of a split's image_index (unique over the splits)."""
    return SPLIT_CODE[split] * IMAGE_BASE + image_index


def question_id(split: str, question_index: int) -> int:
    """Our question id of a split's question_index (unique over the splits)."""
    return SPLIT_CODE[split] * QUESTION_BASE + question_index


def _index(value: Any, limit: int) -> int | None:
    """`value` when it is a usable index below `limit`, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit else None


class ClevrLayout:
    """DATASET clevr: the module docstring's layout, at DATASET_PATH and FEATURE_PATH."""

    name = "clevr"
    hint = HINT
    recursive = False

    def __init__(self, cfg: Config) -> None:
        self.dataset_path, self.feature_path = Path(cfg.DATASET_PATH), Path(cfg.FEATURE_PATH)

    # --- questions
    def has_split(self, split: str) -> bool:
        return split in SPLITS and self.split_file(split).is_file()

    def split_file(self, split: str) -> Path:
        return self.dataset_path / "questions" / f"CLEVR_{split}_questions.json"

    def answers_file(self, split: str) -> Path:
        return self.split_file(split)

    def image_folder(self, split: str) -> Path:
        """Where a split's images are (CLEVR v1.0's `images/<split>/`)."""
        return self.dataset_path / "images" / split

    def sources(self) -> list[Path]:
        return [self.split_file(s) for s in SPLITS]

    def read_questions(self, split: str) -> list[dict[str, Any]]:
        """The `questions` list of a split's file, as it is; DataError naming the file."""
        path = self.split_file(split)
        if split not in SPLITS:
            raise DataError(f"CLEVR has no split {split!r}: its splits are train, val and test")
        if not path.is_file():
            where = "" if self.dataset_path.is_dir() else f" (DATASET_PATH {self.dataset_path} does not exist)"
            raise DataError(f"missing {split} question file {path}{where}; {HINT}")
        try:
            data = json.loads(path.read_bytes())
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}): expected CLEVR's {{\"questions\": [...]}}") from e
        questions = data.get("questions") if isinstance(data, dict) else None
        if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
            raise DataError(f"{path}: expected a JSON object with a 'questions' list of objects (CLEVR's layout)")
        return questions

    def load_split(self, split: str, need_answers: bool, allow_empty: bool = False) -> list[QuestionRecord]:
        path = self.split_file(split)
        questions = self.read_questions(split)
        if not questions and not allow_empty:
            raise DataError(f"{path} holds no questions (its 'questions' list is empty)")
        records = []
        for position, q in enumerate(questions):
            number = q.get("question_index", position)
            where = f"{path}: question {position} (question_index {number})"
            index, image = _index(number, QUESTION_BASE), _index(q.get("image_index"), IMAGE_BASE)
            text, answer, program = q.get("question"), q.get("answer"), q.get("program")
            if index is None:
                raise DataError(f"{where}: 'question_index' must be an integer from 0 to {QUESTION_BASE - 1}")
            if image is None:
                raise DataError(f"{where}: no 'image_index' (an integer from 0 to {IMAGE_BASE - 1}): CLEVR's "
                                f"questions name their image by its index in the split")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: no 'question' (a non-empty string)")
            if answer is not None and not isinstance(answer, str):
                raise DataError(f"{where}: 'answer' must be a string, got {answer!r}")
            if need_answers and answer is None:
                raise DataError(f"{where}: no 'answer', which {split} questions need")
            function = ""
            if program is not None:
                last = program[-1] if isinstance(program, list) and program else None
                function = last.get("function") if isinstance(last, dict) else None
                if not isinstance(function, str):
                    raise DataError(f"{where}: 'program' must be a list of steps with a 'function' each, got "
                                    f"{json.dumps(program)[:80]}")
            records.append(QuestionRecord(
                question_id=question_id(split, index), image_id=image_id(split, image), question=text, folder=split,
                answers=(answer,) * 10 if answer is not None else None,  # one answer: ten annotators agreeing
                answer_type=_FAMILY_OF.get(function, "") if function else "",
                question_type=function or (NO_PROGRAM if answer is not None else ""),
                multiple_choice_answer=answer or ""))
        seen: dict[int, int] = {}
        for position, record in enumerate(records):
            if record.question_id in seen:
                raise DataError(f"{path}: questions {seen[record.question_id]} and {position} share question_index "
                                f"{record.question_id % QUESTION_BASE}; give each its own, or leave it out")
            seen[record.question_id] = position
        return records

    # --- features: one folder per split, `<image_index>.npz`
    def feature_folders(self, split: str) -> tuple[str, ...]:
        return (split,)

    def index_features(self, folder: str) -> dict[int, Path]:
        root = self.feature_path / folder
        if not root.is_dir():
            images = self.image_folder(folder)
            how = (f"`accuvqa prepare` extracts them from {images} (it needs BACKBONE_WEIGHTS)" if images.is_dir()
                   else "extract them with openvqa's data/clevr/clevr_extract_feat.py, or put CLEVR's images in "
                        f"{images} for `accuvqa prepare` to extract them")
            raise DataError(f"missing feature folder {root}: {how}; {HINT}")
        if folder not in SPLIT_CODE:
            raise DataError(f"feature folder {root} is not a CLEVR split (train, val, test)")
        return {image_id(folder, int(path.stem)): path for path in root.iterdir()
                if path.suffix == ".npz" and path.stem.isdigit() and int(path.stem) < IMAGE_BASE and path.is_file()}

    def feature_file(self, folder: str, image_id: int) -> Path:
        return self.feature_path / folder / f"{image_id % IMAGE_BASE}.npz"

    # --- scoring: openvqa's (exact match, per last program function and family); one answer a line
    def scoring_data(self, split: str, records: list[QuestionRecord]) -> dict[str, list[str]] | None:
        """{question id: [answer, last program function]} of the answered questions; None when none is."""
        table = {str(r.question_id): [r.multiple_choice_answer, r.question_type] for r in records if r.answers}
        return table or None

    def score(self, questions: QuestionArrays, answers: list[str], scoring_data: Any) -> dict[str, Any]:
        if not isinstance(scoring_data, dict):
            raise DataError(f"the question store holds no CLEVR answers for these questions ({questions.split_spec}); "
                            f"delete the store (DATASET_PATH/<TRAIN_SPLIT>.qa): the next command builds it again")
        gold = []
        for qid in questions.question_id.tolist():
            answer, function = scoring_data[str(qid)]
            gold.append({"answer": answer, "program": [{"function": function}]})
        scores = clevr_scores(gold, answers)
        return {"accuracy": scores["accuracy"],
                "per_answer_type": {family: row["accuracy"] for family, row in scores["per_family"].items()
                                    if row["questions"]},
                "per_question_type": {function: row["accuracy"] for function, row in scores["per_function"].items()}}

    def write_predictions(self, out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]
                          ) -> Path | None:
        """`<out_dir>/result_<split>_clevr.txt`: one answer a line, in the questions file's order (openvqa's)."""
        return write_clevr_predictions(Path(out_dir) / f"result_{split}_clevr.txt", answers)  # the store keeps that order


def split_images(layout: ClevrLayout, split: str) -> dict[int, Path]:
    """image_index -> image file, over a split's `images/<split>/*.png` (named CLEVR_<split>_<index>.png)."""
    folder = layout.image_folder(split)
    if not folder.is_dir():
        return {}
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _IMAGE_FILE.fullmatch(path.name)
        if match is not None and path.is_file():
            found[int(match.group(1))] = path
    return found


def prepare_clevr(cfg: Config) -> dict[str, dict[str, Any]]:
    """Check every split's questions, extract the features of the images that have none (`accuvqa extract`'s
    extractor, BACKBONE_*), check that every question's image has its features; counts per split."""
    from accuvqa.extract import Extractor, ImageSource, extract

    layout = ClevrLayout(cfg)
    if not layout.has_split("train"):
        layout.read_questions("train")  # the DataError naming the missing file
    extractor = None
    summary: dict[str, dict[str, Any]] = {}
    for split in (s for s in SPLITS if layout.has_split(s)):
        records = layout.load_split(split, need_answers=False)
        needed = sorted({r.image_id % IMAGE_BASE for r in records})
        out_dir = layout.feature_path / split
        images = split_images(layout, split)
        todo = [i for i in sorted(images) if not (out_dir / f"{i}.npz").is_file()]
        if todo:
            extractor = extractor or Extractor.from_config(cfg)
            done = extract([ImageSource(str(i), partial(images[i].read_bytes)) for i in todo], out_dir, extractor,
                           cfg.EXTRACT_BATCH_SIZE, cfg.VERBOSE)
            if done.bad:
                name, why = done.bad[0]
                raise DataError(f"{len(done.bad)} {split} image(s) cannot be read, e.g. {images[int(name)]} ({why}); "
                                f"replace them and run `accuvqa prepare` again (the others' features are kept)")
        have = layout.index_features(split) if out_dir.is_dir() or needed else {}
        lacking = [i for i in needed if image_id(split, i) not in have]
        if lacking:
            raise DataError(f"no features for {len(lacking)} {split} image(s) that questions of "
                            f"{layout.split_file(split)} name, e.g. {layout.feature_file(split, lacking[0])}, and no "
                            f"image {layout.image_folder(split)}/CLEVR_{split}_{lacking[0]:06d}.png to extract them "
                            f"from; {HINT}")
        summary[split] = {"questions": len(records), "answered": sum(r.answers is not None for r in records),
                          "images": len(needed), "feature_files": len(have), "extracted now": len(todo)}
    return summary


def write_shapes(cfg: Config, progress: Any = None) -> dict[str, Any]:
    """DATASET clevr_shapes: generate the bundled reasoning set (`data/scenes.py`) at DATASET_PATH, seeded by SEED:
    SCENE_IMAGES train images, a sixth as many val and test; its object features in DATASET_PATH/feats."""
    from accuvqa.data.scenes import generate

    root = Path(cfg.DATASET_PATH)
    if Path(cfg.FEATURE_PATH).resolve() != (root / "feats").resolve():
        raise ConfigError(f"DATASET clevr_shapes writes its features to {root / 'feats'}: set FEATURE_PATH to it "
                          f"(FEATURE_PATH is {cfg.FEATURE_PATH})")
    n = cfg.SCENE_IMAGES
    sizes = {"train": n, "val": max(1, n // 6), "test": max(1, n // 6)}
    log.info("writing the bundled reasoning set to %s (%s images, seed %d)", root,
             " + ".join(str(v) for v in sizes.values()), cfg.SEED)
    return generate(root, sizes, seed=cfg.SEED, **({"progress": progress} if progress is not None else {}))
