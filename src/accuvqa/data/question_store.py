"""The question store: a dataset's questions, answer targets, text and dictionaries as arrays on disk.

`<TRAIN_SPLIT>.qa/` (e.g. `train+val.qa/`) beside the JSON in DATASET_PATH (or under STORE_PATH)
holds:
- `vocab.json`: the run's two dictionaries `[token_to_ix, ans_to_ix]` (built as `build_vocab` does:
  tokens of every question file present, answers of the training splits; or TOKEN_DICT_PATH /
  ANSWER_DICT_PATH);
- `<split>.npz` for each split a run of this TRAIN_SPLIT reads (its parts, then val and test when
  their question files exist): the arrays of `questions.QuestionArrays`;
- `meta.json`: the plan (format, TRAIN_SPLIT, MAX_TOKEN, the dictionary paths), the state of each
  source file, the splits and their question counts.

Built when missing or stale (`data/build.py` says when, and how it is written): by `accuvqa prepare`,
or by the first command that needs it. Commands read only this store, never the JSON.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from accuvqa.config import Config
from accuvqa.data.build import (
    Partial,
    build_progress,
    ensure_store,
    file_state,
    read_meta,
    store_home,
    why_stale,
)
from accuvqa.data.easyvqa import prepare_easyvqa
from accuvqa.data.questions import (
    STRING_TABLES,
    QuestionArrays,
    arrays_to_strings,
    concat,
    encode_records,
    strings_to_arrays,
)
from accuvqa.data.layout import Layout, dataset_layout
from accuvqa.data.records import parse_splits
from accuvqa.data.vocab import Vocab, build_vocab
from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 2
ALL_SPLITS = ("train", "val", "test", "vg")
WHAT = "question store"
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)


def store_dir(cfg: Config) -> Path:
    """`DATASET_PATH/<TRAIN_SPLIT>.qa` (under STORE_PATH when set)."""
    return store_home(cfg.STORE_PATH, cfg.DATASET_PATH) / f"{'+'.join(parse_splits(cfg.TRAIN_SPLIT))}.qa"


def store_splits(cfg: Config, layout: Layout | None = None) -> list[str]:
    """The splits a run of this TRAIN_SPLIT reads: its parts, then val and test when the dataset has them."""
    layout = layout or dataset_layout(cfg)
    splits = parse_splits(cfg.TRAIN_SPLIT)
    splits += [s for s in ("val", "test") if s not in splits]
    return [s for s in splits if layout.has_split(s)]


def _plan(cfg: Config) -> dict[str, Any]:
    plan = {"format": FORMAT, "TRAIN_SPLIT": parse_splits(cfg.TRAIN_SPLIT), "MAX_TOKEN": cfg.MAX_TOKEN,
            "TOKEN_DICT_PATH": cfg.TOKEN_DICT_PATH, "ANSWER_DICT_PATH": cfg.ANSWER_DICT_PATH}
    if cfg.ANSWER_MIN_COUNT != 8 or cfg.DATASET != "vqa":  # stores built before the key existed stay current
        plan.update(DATASET=cfg.DATASET, ANSWER_MIN_COUNT=cfg.ANSWER_MIN_COUNT)
    return plan


def _sources(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Every file the store is built from (the token dictionary reads all question files there are)."""
    files = layout.sources() + [Path(p) for p in (cfg.TOKEN_DICT_PATH, cfg.ANSWER_DICT_PATH) if p]
    return {str(path.resolve()): file_state(path) for path in files}


def question_store(cfg: Config, progress: Callable[[Sequence, str], Iterable] | None = None) -> QuestionStore:
    """The current store of cfg's TRAIN_SPLIT, built first when missing or stale (for DATASET easyvqa, after
    writing the bundled data when it is not there yet)."""
    progress = progress or build_progress(cfg.VERBOSE)
    layout = dataset_layout(cfg)

    def build(partial: Partial) -> Path:
        return _build(cfg, layout, partial, progress)

    plan = _plan(cfg)
    stale = why_stale(store_dir(cfg), plan, _sources(cfg, layout)) is not None
    if cfg.DATASET == "easyvqa" and not layout.has_split("train") and stale:
        log.info("writing the bundled easy-VQA data to %s and %s first", cfg.DATASET_PATH, cfg.FEATURE_PATH)
        prepare_easyvqa(cfg, progress=progress)
    elif cfg.DATASET == "clevr_shapes" and not layout.has_split("train") and stale:
        from accuvqa.data.clevr import write_shapes

        write_shapes(cfg, progress=progress)
    elif stale:
        for split in parse_splits(cfg.TRAIN_SPLIT):  # a wrong DATASET_PATH is named before any "building" line
            if not layout.has_split(split) and (not cfg.ANSWER_DICT_PATH or not store_splits(cfg, layout)):
                layout.load_split(split, need_answers=False)  # raises the DataError naming the file
    path = ensure_store(store_dir(cfg), plan, lambda: _sources(cfg, layout), build, WHAT)
    return QuestionStore(path, layout)


def _build(cfg: Config, layout: Layout, partial: Partial, progress: Callable[[Sequence, str], Iterable]) -> Path:
    """Read the questions once; write the dictionaries, then each split's arrays (kept when resumed)."""
    splits = store_splits(cfg, layout)
    answers_from = [] if cfg.ANSWER_DICT_PATH else parse_splits(cfg.TRAIN_SPLIT)  # the answer dictionary's splits
    records = {s: layout.load_split(s, need_answers=s in answers_from)
               for s in progress(splits, "read questions")}
    vocab_file = partial.path / "vocab.json"
    if partial.resumed and vocab_file.is_file():
        vocab = Vocab(*json.loads(vocab_file.read_text()))
    else:
        questions = None if cfg.TOKEN_DICT_PATH else [
            r.question for s in ALL_SPLITS if layout.has_split(s)
            for r in (records[s] if s in records else layout.load_split(s, need_answers=False, allow_empty=True))]
        train = [r for s in answers_from  # a missing part is named by load_split
                 for r in (records[s] if s in records else layout.load_split(s, need_answers=True))]
        vocab = build_vocab(cfg, train, questions=questions)  # a DataError (no answer kept) before any split
        write_json_atomic(vocab_file, [vocab.token_to_ix, vocab.ans_to_ix])
    for split in progress(splits, "encode questions"):
        if not (partial.resumed and (partial.path / f"{split}.npz").is_file()):
            scoring = layout.scoring_data(split, records[split])
            if scoring is not None:
                write_json_atomic(partial.path / f"{split}.scoring.json", scoring)
            write_split(partial.path / f"{split}.npz", encode_records(records[split], vocab, cfg.MAX_TOKEN, split))
    return partial.finish(splits=splits, vocab=vocab.fingerprint(), questions={s: len(r) for s, r in records.items()},
                          dataset_path=str(cfg.DATASET_PATH))


def write_split(path: Path, arrays: QuestionArrays) -> None:
    """One split's arrays in one .npz, written whole or not at all."""
    tables = {name: strings_to_arrays(getattr(arrays, name)) for name in STRING_TABLES}
    plain = {k: v for k, v in arrays.__dict__.items() if isinstance(v, np.ndarray)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **plain, **{f"{name}__blob": b for name, (b, _) in tables.items()},
             **{f"{name}__offsets": o for name, (_, o) in tables.items()})
    os.replace(tmp, path)


def read_split(path: Path, vocab: Vocab, split: str) -> QuestionArrays:
    """The arrays `write_split` wrote."""
    with np.load(path) as z:
        plain = {k: z[k] for k in z.files if "__" not in k}
        tables = {name: arrays_to_strings(z[f"{name}__blob"], z[f"{name}__offsets"]) for name in STRING_TABLES}
    return QuestionArrays(**plain, **tables, vocab=vocab, split_spec=split)


class QuestionStore:
    """A current store: its dictionaries, and each split's arrays."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path = path
        self.layout = layout  # the dataset's files, named in messages
        self.meta = read_meta(path) or {}

    @property
    def vocab(self) -> Vocab:
        """The dictionaries the arrays were encoded with."""
        try:
            token_to_ix, ans_to_ix = json.loads((self.path / "vocab.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}/vocab.json cannot be read ({e}); delete {self.path}: the next command "
                            f"builds it again") from e
        return Vocab(token_to_ix, ans_to_ix)

    @property
    def splits(self) -> list[str]:
        """The splits the store holds."""
        return list(self.meta.get("splits", []))

    def scoring_data(self, split: str) -> Any:
        """What the dataset's scoring of `split` needs beyond its arrays (`Layout.scoring_data`), None when nothing."""
        path = self.path / f"{split}.scoring.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path} cannot be read ({e}); delete {self.path}: the next command builds it again") from e

    def annotated(self, split: str) -> bool:
        """Whether the store holds `split` with every question annotated."""
        if split not in self.splits:
            return False
        path = self.path / f"{split}.npz"
        try:
            with np.load(path) as z:
                return bool(len(z["annotated"])) and bool(z["annotated"].all())
        except _UNREADABLE as e:
            raise DataError(f"question arrays {path} cannot be read ({e}); delete {self.path}: the next command "
                            f"builds it again") from e

    def questions(self, split_spec: str, need_answers: bool) -> QuestionArrays:
        """The arrays of the splits in `split_spec`; DataError for a split it does not hold (its JSON is missing)."""
        parts, vocab = [], self.vocab
        for split in parse_splits(split_spec):
            if split not in self.splits:
                raise DataError(f"missing {split} question file {self.layout.split_file(split)} (the "
                                f"{WHAT} {self.path} holds {', '.join(self.splits)}); {self.layout.hint}")
            path = self.path / f"{split}.npz"
            try:
                part = read_split(path, vocab, split)
            except _UNREADABLE as e:
                raise DataError(f"question arrays {path} cannot be read ({e}); delete {self.path}: the next command "
                                f"builds it again") from e
            if need_answers and not part.annotated.all():
                qid = int(part.question_id[np.argmin(part.annotated)])
                raise DataError(f"{self.layout.answers_file(split)}: no annotation for question_id {qid}")
            parts.append(part)
        return concat(parts, split_spec)
