"""Questions and answers as compact arrays in memory: what a dataset reads, what the question store holds.

Reading VQA v2's JSON into one Python object per question costs seconds and gigabytes (and every
loader worker touching those objects copies them); the arrays cost tens of megabytes and are
shared by the workers as they are. `encode_records` makes them from the JSON's records (the
question store's builder, or a Python caller with records of its own); `encoded_with` makes them
again for other dictionaries (a checkpoint's) from the question text and the annotators' answers
they keep, so no JSON is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np

from accuvqa.data.records import FOLDERS, QuestionRecord
from accuvqa.data.vocab import Vocab, answer_targets, tokenize

STRING_TABLES = ("folders", "answer_types", "question_types", "gt_strings")


def strings_to_arrays(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A list of strings as (UTF-8 bytes, offsets): no per-string object until decoded."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def arrays_to_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings `strings_to_arrays` encoded."""
    data = blob.tobytes()
    return [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _table(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct values in first-seen order, and each value's index among them."""
    index: dict[str, int] = {}
    ix = np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int32)
    return list(index), ix


def _csr(counts: Sequence[int]) -> np.ndarray:
    """Row offsets (N+1,) int64 of rows of the given lengths."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=offsets[1:])
    return offsets


@dataclass
class QuestionArrays:
    """The questions of one or more splits, one row each, as arrays (N questions, T = MAX_TOKEN).

    `question_id`, `image_id` (N,) int64; `folder` (N,) uint8 index into `folders` (the feature folder,
    '' for Visual Genome); `ques_ix` (N, T) int32 token ids, 0-padded; `n_tokens` (N,) int32 tokens
    before the cut to T; the soft answer targets as CSR rows: question i's answer indices
    `target_answer[target_offsets[i]:target_offsets[i+1]]` (int32) with scores `target_score`
    (float32); `annotated` (N,) bool; `answer_type` / `question_type` (N,) int32 indices into
    `answer_types` / `question_types`; the question text as UTF-8 bytes `text` cut at `text_offsets`
    (N+1,); the annotators' raw answers as CSR rows of indices `gt_answer` into `gt_strings`.
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
    text: np.ndarray
    text_offsets: np.ndarray
    gt_offsets: np.ndarray
    gt_answer: np.ndarray
    gt_strings: list[str]
    vocab: Vocab  # the dictionaries the tokens and targets were encoded with
    split_spec: str = ""

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

    def question(self, i: int) -> str:
        """The text of question `i`."""
        return self.text[self.text_offsets[i]: self.text_offsets[i + 1]].tobytes().decode()

    def questions(self) -> list[str]:
        """Every question's text, in order."""
        return arrays_to_strings(self.text, self.text_offsets)

    def gt_answers(self) -> list[tuple[str, ...] | None]:
        """Each question's annotators' raw answers (None where it has no annotation)."""
        offsets, ix, annotated = self.gt_offsets.tolist(), self.gt_answer.tolist(), self.annotated.tolist()
        return [tuple(self.gt_strings[j] for j in ix[offsets[i]: offsets[i + 1]]) if annotated[i] else None
                for i in range(len(annotated))]

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
        return "+".join(split_of.get(self.folders[f], self.folders[f] or "vg") for f in used)

    def encoded_with(self, vocab: Vocab, max_token: int) -> QuestionArrays:
        """These questions with tokens and targets encoded with `vocab` (from the text and raw answers kept)."""
        if vocab == self.vocab and max_token == self.ques_ix.shape[1]:
            return self
        ques_ix, n_tokens, target_offsets, target_answer, target_score = _encode(
            self.questions(), self.gt_answers(), vocab, max_token)
        return replace(self, ques_ix=ques_ix, n_tokens=n_tokens, target_offsets=target_offsets,
                       target_answer=target_answer, target_score=target_score, vocab=vocab)


def _encode(questions: Sequence[str], gt: Sequence[Sequence[str] | None], vocab: Vocab, max_token: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (N, max_token) int32, token counts, and the soft targets as CSR rows."""
    n = len(questions)
    token_to_ix, ans_to_ix = vocab.token_to_ix, vocab.ans_to_ix
    ques_ix = np.zeros((n, max_token), dtype=np.int32)
    n_tokens = np.zeros(n, dtype=np.int32)
    counts = np.zeros(n, dtype=np.int64)
    answers: list[int] = []
    scores: list[float] = []
    for i, (question, raw) in enumerate(zip(questions, gt)):
        words = tokenize(question)
        n_tokens[i] = len(words)
        ques_ix[i, : min(len(words), max_token)] = [token_to_ix.get(w, 1) for w in words[:max_token]]
        for a, s in answer_targets(raw, ans_to_ix) if raw else ():
            answers.append(a)
            scores.append(s)
            counts[i] += 1
    return (ques_ix, n_tokens, _csr(counts), np.array(answers, dtype=np.int32),
            np.array(scores, dtype=np.float32))


def encode_records(records: Sequence[QuestionRecord], vocab: Vocab, max_token: int,
                   split_spec: str = "") -> QuestionArrays:
    """The arrays of `records` (the question store's builder writes them)."""
    ques_ix, n_tokens, target_offsets, target_answer, target_score = _encode(
        [r.question for r in records], [r.answers for r in records], vocab, max_token)
    folders, folder = _table([r.folder for r in records])
    answer_types, answer_type = _table([r.answer_type for r in records])
    question_types, question_type = _table([r.question_type for r in records])
    gt_strings, gt_answer = _table([a for r in records if r.answers for a in r.answers])
    text, text_offsets = strings_to_arrays([r.question for r in records])
    return QuestionArrays(
        question_id=np.array([r.question_id for r in records], dtype=np.int64),
        image_id=np.array([r.image_id for r in records], dtype=np.int64),
        folder=folder.astype(np.uint8), folders=folders, ques_ix=ques_ix, n_tokens=n_tokens,
        target_offsets=target_offsets, target_answer=target_answer, target_score=target_score,
        annotated=np.array([r.answers is not None for r in records], dtype=bool),
        answer_type=answer_type, answer_types=answer_types, question_type=question_type,
        question_types=question_types, text=text, text_offsets=text_offsets,
        gt_offsets=_csr([len(r.answers) if r.answers else 0 for r in records]), gt_answer=gt_answer,
        gt_strings=gt_strings, vocab=vocab, split_spec=split_spec)


def concat(parts: Sequence[QuestionArrays], split_spec: str) -> QuestionArrays:
    """The questions of several splits, in order (their string tables merged)."""
    if len(parts) == 1:
        return replace(parts[0], split_spec=split_spec)

    def merged(index: str, table: str) -> tuple[list[str], np.ndarray]:
        names: dict[str, int] = {}
        ix = [np.array([names.setdefault(s, len(names)) for s in getattr(p, table)], dtype=np.int32)[getattr(p, index)]
              for p in parts]
        return list(names), np.concatenate(ix)

    def offsets(name: str) -> np.ndarray:
        shifts = np.cumsum([0] + [int(getattr(p, name)[-1]) for p in parts[:-1]])
        return np.concatenate([getattr(parts[0], name)[:1]] + [getattr(p, name)[1:] + s for p, s in zip(parts, shifts)])

    out: dict[str, Any] = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(QuestionArrays)
                           if f.name not in STRING_TABLES + ("vocab", "split_spec") and not f.name.endswith("offsets")}
    for index, table in (("folder", "folders"), ("answer_type", "answer_types"), ("question_type", "question_types"),
                         ("gt_answer", "gt_strings")):
        out[table], out[index] = merged(index, table)
    out["folder"] = out["folder"].astype(np.uint8)
    for name in ("target_offsets", "text_offsets", "gt_offsets"):
        out[name] = offsets(name)
    return QuestionArrays(**out, vocab=parts[0].vocab, split_spec=split_spec)
