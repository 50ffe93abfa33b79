"""Questions and answers as compact arrays: encoded once by `accuvqa prepare`, read by every run.

Reading VQA v2's question and annotation JSON into one Python object per question costs seconds
and gigabytes at its size (and every loader worker touches those objects, so each copies them);
the arrays cost tens of megabytes, load in milliseconds and are shared by the workers as they are.

`accuvqa prepare` writes `DATASET_PATH/<TRAIN_SPLIT>.qa/` (e.g. `train+val.qa/`) holding:
- `vocab.json`: the run's two dictionaries `[token_to_ix, ans_to_ix]` (built as `build_vocab` does);
- `<split>.npz` for each split a run of this TRAIN_SPLIT reads (its parts, val and test when their
  question files exist): see `QuestionArrays` for the arrays;
- `meta.json`: format, the splits, the dictionaries' fingerprint, and a fingerprint of the source
  files (question and annotation JSON, TOKEN_DICT_PATH, ANSWER_DICT_PATH: names, sizes,
  modification times) and of the keys that change the arrays (TRAIN_SPLIT, MAX_TOKEN, the two
  dictionary paths). A store whose fingerprint differs is stale: a run names it and reads the JSON.

It is written into `<TRAIN_SPLIT>.qa.partial/` and renamed into place when complete; an
interrupted `prepare` keeps the splits it finished. Batches, targets and evaluation results from
the arrays equal those from the JSON bit for bit (tests/test_qa_store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from accuvqa.config import Config
from accuvqa.data.records import FOLDERS, QuestionRecord, annotation_file, load_split, parse_splits, question_file
from accuvqa.data.vocab import Vocab, answer_targets, tokenize
from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 1
ALL_SPLITS = ("train", "val", "test", "vg")


def _strings_to_arrays(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A list of strings as (UTF-8 bytes, offsets): no per-string object until decoded."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _arrays_to_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _table(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct values in first-seen order, and each value's index among them."""
    index: dict[str, int] = {}
    ix = np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int32)
    return list(index), ix


@dataclass
class QuestionArrays:
    """The questions of one or more splits, one row each, as arrays (N questions, T = MAX_TOKEN).

    `question_id`, `image_id` (N,) int64; `folder` (N,) uint8 index into `folders` (the feature folder,
    '' for Visual Genome); `ques_ix` (N, T) int32 token ids, 0-padded; `n_tokens` (N,) int32 tokens
    before the cut to T; the soft answer targets as CSR rows: question i's answer indices
    `target_answer[target_offsets[i]:target_offsets[i+1]]` (int32) with scores `target_score`
    (float32); `annotated` (N,) bool; `answer_type` / `question_type` (N,) int32 indices into
    `answer_types` / `question_types`. The annotators' raw answers (evaluation needs them) are read
    only by `gt_answers()`: from `records` (the JSON path) or the split files' `gt_*` arrays.
    """

    question_id: np.ndarray
    image_id: np.ndarray
    folder: np.ndarray
    folders: list[str]
    ques_ix: np.ndarray
    n_tokens: np.ndarray
    target_offsets: np.ndarray
    target_answer: np.ndarray
    target_score: np.ndarray
    annotated: np.ndarray
    answer_type: np.ndarray
    answer_types: list[str]
    question_type: np.ndarray
    question_types: list[str]
    vocab: Vocab  # the dictionaries the tokens and targets were encoded with
    split_spec: str = ""
    records: Sequence[QuestionRecord] | None = None  # the JSON path keeps its records for gt_answers
    sources: list[Path] = field(default_factory=list)  # the store's split files, for gt_answers

    def __len__(self) -> int:
        return len(self.question_id)

    def targets(self, indices: np.ndarray, n_answers: int) -> np.ndarray:
        """(B, n_answers) float32 soft scores of the questions at `indices`."""
        starts, lengths = self.target_offsets[indices], np.diff(self.target_offsets)[indices]
        rows = np.repeat(np.arange(len(indices)), lengths)
        flat = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        scores = np.zeros((len(indices), n_answers), dtype=np.float32)
        scores[rows, self.target_answer[flat]] = self.target_score[flat]
        return scores

    def gt_answers(self) -> list[tuple[str, ...] | None]:
        """Each question's annotators' raw answers (None where it has no annotation)."""
        if self.records is not None:
            return [r.answers for r in self.records]
        out: list[tuple[str, ...] | None] = []
        for path in self.sources:
            with np.load(path) as z:
                strings = _arrays_to_strings(z["gt_strings"], z["gt_string_offsets"])
                offsets, ix, annotated = z["gt_offsets"].tolist(), z["gt_answer"].tolist(), z["annotated"].tolist()
            out += [tuple(strings[j] for j in ix[offsets[i]: offsets[i + 1]]) if annotated[i] else None
                    for i in range(len(annotated))]
        return out

    def scoring_table(self) -> dict[int, dict[str, Any]]:
        """{question id: {answers, answer_type, question_type}} as `metrics.evaluate` takes it."""
        gt = self.gt_answers()
        answer_types = [self.answer_types[i] for i in self.answer_type.tolist()]
        question_types = [self.question_types[i] for i in self.question_type.tolist()]
        return {qid: {"answers": list(a), "answer_type": at, "question_type": qt}
                for qid, a, at, qt in zip(self.question_id.tolist(), gt, answer_types, question_types)}

    def split_names(self) -> str:
        """'train+val' etc.: the splits these questions come from, by their feature folders."""
        split_of = {folder: split for split, folder in FOLDERS.items()}
        used = np.unique(self.folder).tolist()
        return "+".join(split_of.get(self.folders[f], "vg") for f in used)


def encode_records(records: Sequence[QuestionRecord], vocab: Vocab, max_token: int,
                   split_spec: str = "") -> QuestionArrays:
    """The arrays of `records` (the JSON path does this at start; `prepare` stores the result)."""
    n = len(records)
    token_to_ix, ans_to_ix = vocab.token_to_ix, vocab.ans_to_ix
    ques_ix = np.zeros((n, max_token), dtype=np.int32)
    n_tokens = np.zeros(n, dtype=np.int32)
    counts = np.zeros(n, dtype=np.int64)
    answers: list[int] = []
    scores: list[float] = []
    for i, r in enumerate(records):
        words = tokenize(r.question)
        n_tokens[i] = len(words)
        ques_ix[i, : min(len(words), max_token)] = [token_to_ix.get(w, 1) for w in words[:max_token]]
        if r.answers:
            for a, s in answer_targets(r.answers, ans_to_ix):
                answers.append(a)
                scores.append(s)
                counts[i] += 1
    target_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=target_offsets[1:])
    folders, folder = _table([r.folder for r in records])
    answer_types, answer_type = _table([r.answer_type for r in records])
    question_types, question_type = _table([r.question_type for r in records])
    return QuestionArrays(
        question_id=np.array([r.question_id for r in records], dtype=np.int64),
        image_id=np.array([r.image_id for r in records], dtype=np.int64),
        folder=folder.astype(np.uint8), folders=folders, ques_ix=ques_ix, n_tokens=n_tokens,
        target_offsets=target_offsets, target_answer=np.array(answers, dtype=np.int32),
        target_score=np.array(scores, dtype=np.float32),
        annotated=np.array([r.answers is not None for r in records], dtype=bool),
        answer_type=answer_type, answer_types=answer_types, question_type=question_type,
        question_types=question_types, vocab=vocab, split_spec=split_spec,
        records=records)


def concat(parts: Sequence[QuestionArrays], split_spec: str) -> QuestionArrays:
    """The questions of several splits, in order (their string tables merged)."""
    if len(parts) == 1:
        return QuestionArrays(**{**parts[0].__dict__, "split_spec": split_spec})

    def merged(name: str) -> tuple[list[str], np.ndarray]:
        table: dict[str, int] = {}
        ix = [np.array([table.setdefault(s, len(table)) for s in getattr(p, name + "s")], dtype=np.int32)
              [getattr(p, name)] for p in parts]
        return list(table), np.concatenate(ix)

    folders, folder = merged("folder")
    answer_types, answer_type = merged("answer_type")
    question_types, question_type = merged("question_type")
    offsets = [parts[0].target_offsets[:1]] + [p.target_offsets[1:] + sum(int(q.target_offsets[-1]) for q in
                                                                        parts[:k]) for k, p in enumerate(parts)]
    return QuestionArrays(
        question_id=np.concatenate([p.question_id for p in parts]),
        image_id=np.concatenate([p.image_id for p in parts]),
        folder=folder.astype(np.uint8), folders=folders,
        ques_ix=np.concatenate([p.ques_ix for p in parts]), n_tokens=np.concatenate([p.n_tokens for p in parts]),
        target_offsets=np.concatenate(offsets), target_answer=np.concatenate([p.target_answer for p in parts]),
        target_score=np.concatenate([p.target_score for p in parts]),
        annotated=np.concatenate([p.annotated for p in parts]), answer_type=answer_type,
        answer_types=answer_types, question_type=question_type, question_types=question_types,
        vocab=parts[0].vocab, split_spec=split_spec,
        records=None if any(p.records is None for p in parts) else [r for p in parts for r in p.records],
        sources=[s for p in parts for s in p.sources])


# ----------------------------------------------------------------------------- the store on disk

def store_dir(cfg: Config) -> Path:
    """`DATASET_PATH/<TRAIN_SPLIT>.qa`."""
    return Path(cfg.DATASET_PATH) / f"{'+'.join(parse_splits(cfg.TRAIN_SPLIT))}.qa"


def store_splits(cfg: Config) -> list[str]:
    """The splits a run of this TRAIN_SPLIT reads: its parts, then val and test when their question files exist."""
    splits = parse_splits(cfg.TRAIN_SPLIT)
    return splits + [s for s in ("val", "test") if s not in splits and question_file(cfg.DATASET_PATH, s).is_file()]


def source_fingerprint(cfg: Config) -> str:
    """Hash of the source files' names, sizes and modification times and of the keys that change the arrays."""
    files = [question_file(cfg.DATASET_PATH, s) for s in ALL_SPLITS]  # the token dictionary reads them all
    files += [annotation_file(cfg.DATASET_PATH, s) for s in ALL_SPLITS]
    files += [Path(p) for p in (cfg.TOKEN_DICT_PATH, cfg.ANSWER_DICT_PATH) if p]
    digest = hashlib.sha256(json.dumps({
        "format": FORMAT, "TRAIN_SPLIT": parse_splits(cfg.TRAIN_SPLIT), "MAX_TOKEN": cfg.MAX_TOKEN,
        "TOKEN_DICT_PATH": cfg.TOKEN_DICT_PATH, "ANSWER_DICT_PATH": cfg.ANSWER_DICT_PATH}).encode())
    for path in files:
        try:
            st = path.stat()
            digest.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.resolve()}\0absent\n".encode())
    return digest.hexdigest()[:32]


def _save_split(path: Path, arrays: QuestionArrays, records: Sequence[QuestionRecord]) -> None:
    """One split's arrays, with its annotators' raw answers as indices into a table of distinct strings."""
    gt_counts = np.array([len(r.answers) if r.answers else 0 for r in records], dtype=np.int64)
    gt_offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(gt_counts, out=gt_offsets[1:])
    gt_strings, gt_answer = _table([a for r in records if r.answers for a in r.answers])
    blob, blob_offsets = _strings_to_arrays(gt_strings)
    tables = {name: _strings_to_arrays(getattr(arrays, name)) for name in ("folders", "answer_types", "question_types")}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, question_id=arrays.question_id, image_id=arrays.image_id, folder=arrays.folder,
             ques_ix=arrays.ques_ix, n_tokens=arrays.n_tokens, target_offsets=arrays.target_offsets,
             target_answer=arrays.target_answer, target_score=arrays.target_score, annotated=arrays.annotated,
             answer_type=arrays.answer_type, question_type=arrays.question_type,
             gt_offsets=gt_offsets, gt_answer=gt_answer, gt_strings=blob, gt_string_offsets=blob_offsets,
             **{f"{name}_blob": b for name, (b, _) in tables.items()},
             **{f"{name}_offsets": o for name, (_, o) in tables.items()})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_split(path: Path, vocab: Vocab, split: str) -> QuestionArrays:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("gt_") and not k.endswith(("_blob", "_offsets"))
                  or k == "target_offsets"}
        tables = {name: _arrays_to_strings(z[f"{name}_blob"], z[f"{name}_offsets"])
                  for name in ("folders", "answer_types", "question_types")}
    return QuestionArrays(**arrays, **tables, vocab=vocab, split_spec=split, sources=[path])


def prepare_qa_store(cfg: Config) -> tuple[Path, dict[str, int]]:
    """Write the store for cfg's TRAIN_SPLIT (left as it is when current); return it and the questions per split."""
    from accuvqa.data.vocab import build_vocab

    final = store_dir(cfg)
    fingerprint = source_fingerprint(cfg)
    current = QAStore.open(cfg, quiet=True)
    if current is not None:
        return final, current.meta["questions"]
    splits = store_splits(cfg)
    partial = final.with_name(final.name + ".partial")
    plan = {"format": FORMAT, "fingerprint": fingerprint, "splits": splits}
    try:
        resumed = json.loads((partial / "plan.json").read_text()) == plan
    except (OSError, ValueError):
        resumed = False
    records = {s: load_split(cfg.DATASET_PATH, s, need_answers=s != "test") for s in splits}
    if resumed:
        token_to_ix, ans_to_ix = json.loads((partial / "vocab.json").read_text())
        vocab = Vocab(token_to_ix, ans_to_ix)
    else:
        questions = None if cfg.TOKEN_DICT_PATH else [
            r.question for s in ALL_SPLITS if question_file(cfg.DATASET_PATH, s).is_file()
            for r in (records[s] if s in records else load_split(cfg.DATASET_PATH, s, need_answers=False,
                                                                 allow_empty=True))]
        train = [r for s in parse_splits(cfg.TRAIN_SPLIT) for r in records[s]]
        vocab = build_vocab(cfg, train, questions=questions)  # a DataError (no answer kept) before any file
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_json_atomic(partial / "vocab.json", [vocab.token_to_ix, vocab.ans_to_ix])
        write_json_atomic(partial / "plan.json", plan)  # last: a partial folder with a plan has its vocab
    for split in splits:
        if not (resumed and (partial / f"{split}.npz").is_file()):
            _save_split(partial / f"{split}.npz", encode_records(records[split], vocab, cfg.MAX_TOKEN), records[split])
    counts = {s: len(r) for s, r in records.items()}
    write_json_atomic(partial / "meta.json", {**plan, "vocab": vocab.fingerprint(), "questions": counts,
                                              "MAX_TOKEN": cfg.MAX_TOKEN})
    (partial / "plan.json").unlink()
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final, counts


class QAStore:
    """A current store: its dictionaries, and each split's arrays."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta

    @classmethod
    def open(cls, cfg: Config, quiet: bool = False) -> QAStore | None:
        """The store of cfg's TRAIN_SPLIT when there and current; None otherwise (a stale one is named in a warning)."""
        path = store_dir(cfg)
        if not path.is_dir():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            why = ("" if meta.get("format") == FORMAT and meta.get("fingerprint") == source_fingerprint(cfg)
                   else "its question, annotation or dictionary files or MAX_TOKEN changed since it was written")
        except (OSError, ValueError, AttributeError) as e:
            meta, why = {}, f"its meta.json cannot be read ({e})"
        if why and not quiet:
            log.warning("the question arrays in %s are stale (%s): reading the JSON instead; run accuvqa prepare",
                        path, why)
        return None if why else cls(path, meta)

    @property
    def vocab(self) -> Vocab:
        """The dictionaries the arrays were encoded with."""
        try:
            token_to_ix, ans_to_ix = json.loads((self.path / "vocab.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}/vocab.json cannot be read ({e}); delete {self.path} or run accuvqa prepare "
                            f"again") from e
        return Vocab(token_to_ix, ans_to_ix)

    def questions(self, split_spec: str, need_answers: bool) -> QuestionArrays | None:
        """The arrays of the splits in `split_spec`; None when the store does not hold one of them."""
        splits = parse_splits(split_spec)
        if any(s not in self.meta.get("splits", []) for s in splits):
            return None
        parts, vocab = [], self.vocab
        for split in splits:
            path = self.path / f"{split}.npz"
            try:
                part = _load_split(path, vocab, split)
            except (OSError, ValueError, KeyError) as e:
                raise DataError(f"question arrays {path} cannot be read ({e}); delete {self.path} or run accuvqa "
                                f"prepare again") from e
            if need_answers and not part.annotated.all():
                qid = int(part.question_id[np.argmin(part.annotated)])
                raise DataError(f"{annotation_file(self.path.parent, split)}: no annotation for question_id "
                                f"{qid}")
            parts.append(part)
        return concat(parts, split_spec)

