"""CLEVR scoring, equal to openvqa's own evaluation code, and CLEVR's prediction file.

Reference: MILVLG/openvqa ``openvqa/datasets/clevr/eval/result_eval.py`` at commit
f8f9966f202d5edf2a84096e1bc05ebf58ef55e6.  tests/test_gqa_clevr_metrics.py compares
:func:`clevr_scores` with figures that code computed (tests/make_openvqa_eval_reference.py).

openvqa writes one predicted answer per line, in the order of the questions file, reads the lines
back stripped, and scores exact string equality with each question's ``answer``.  A question's
type is the ``function`` of the LAST step of its functional ``program``; it counts correct /
total per type and prints these families (``FAMILIES``):

* Count: ``count``;  Exist: ``exist``;
* Compare_Numbers: ``greater_than``, ``less_than``;
* Query_Attribute: ``query_color``, ``query_material``, ``query_shape``, ``query_size``;
* Compare_Attribute: ``equal_color``, ``equal_integer``, ``equal_material``, ``equal_shape``,
  ``equal_size``.

Kept for equality, though it departs from the CLEVR paper (whose "compare integer" family holds
equal / less / greater): openvqa files ``equal_integer`` under Compare_Attribute.  ``per_function``
keeps every type apart, so either grouping can be read off it.

Where we differ: openvqa crashes (KeyError) when a type of a family has no question, e.g. on a
subset of val; we count what is there and give a family of no questions ``accuracy`` None.
A length mismatch (openvqa: AssertionError) is a DataError naming the first unmatched question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from accuvqa.errors import DataError
from accuvqa.files import atomic_write

# openvqa's families, in its printed order, with the last program functions each one holds
FAMILIES: dict[str, tuple[str, ...]] = {
    "Count": ("count",),
    "Exist": ("exist",),
    "Compare_Numbers": ("greater_than", "less_than"),
    "Query_Attribute": ("query_color", "query_material", "query_shape", "query_size"),
    "Compare_Attribute": ("equal_color", "equal_integer", "equal_material", "equal_shape", "equal_size"),
}


def question_function(question: Mapping[str, Any]) -> str:
    """A CLEVR question's type as openvqa takes it: the ``function`` of its program's last step."""
    return question["program"][-1]["function"]


def clevr_scores(questions: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> dict:
    """Overall and per-family accuracy as openvqa's CLEVR evaluation computes them.

    `questions`: the ``questions`` list of a CLEVR questions file; `predictions`: one answer per
    question, in the same order.  Returns ``accuracy`` (percent), ``correct``, ``questions``, and
    ``per_family`` (``FAMILIES``' names) and ``per_function`` (last program function), each
    {name: {"accuracy": percent or None, "correct": int, "questions": int}}.
    """
    if len(questions) != len(predictions):
        first = min(len(questions), len(predictions))
        if len(predictions) < len(questions):
            raise DataError(f"{len(questions)} CLEVR questions but {len(predictions)} predictions: no prediction "
                            f"for question {first} ({_name(questions[first])}); give one answer per question, in "
                            f"the questions file's order")
        raise DataError(f"{len(questions)} CLEVR questions but {len(predictions)} predictions: prediction "
                        f"{first} ({predictions[first]!r}) has no question; score the split you predicted")
    per_function: dict[str, list[int]] = {}  # function -> [correct, total]
    for position, (question, predicted) in enumerate(zip(questions, predictions)):
        try:
            function, gold = question_function(question), question["answer"]
        except (KeyError, IndexError, TypeError) as error:
            raise DataError(f"CLEVR question {position} ({_name(question)}): no answer or functional program "
                            f"({type(error).__name__}: {error}); expected the CLEVR questions layout with "
                            f"'answer' and 'program' [{{'function': ...}}, ...]") from error
        tally = per_function.setdefault(function, [0, 0])
        tally[0] += predicted.strip() == gold  # openvqa reads its prediction lines back stripped
        tally[1] += 1
    correct = sum(c for c, _ in per_function.values())
    return {
        **_entry(correct, len(questions)),
        "per_family": {family: _entry(sum(per_function.get(f, (0, 0))[0] for f in functions),
                                      sum(per_function.get(f, (0, 0))[1] for f in functions))
                       for family, functions in FAMILIES.items()},
        "per_function": {f: _entry(*per_function[f]) for f in sorted(per_function)},
    }


def clevr_report_lines(scores: Mapping[str, Any]) -> list[str]:
    """The lines openvqa writes to its log for these scores ("Overall : c / n = xx.xx", then each family)."""
    rows = [("Overall", scores)] + list(scores["per_family"].items())
    return [f"{name} : {row['correct']} / {row['questions']} = "
            + (f"{row['accuracy']:.2f}" if row["accuracy"] is not None else "n/a") for name, row in rows]


def write_clevr_predictions(path: str | Path, answers: Iterable[str]) -> Path:
    """Write CLEVR's prediction file, one answer per line in question order, atomically."""
    lines = []
    for position, answer in enumerate(answers):
        if "\n" in answer or "\r" in answer or answer != answer.strip():
            raise DataError(f"{path}: CLEVR answer {position} ({answer!r}) has a line break or surrounding "
                            f"whitespace, which one-answer-per-line files cannot hold")
        lines.append(answer + "\n")
    return atomic_write(path, lambda f: f.write("".join(lines).encode()))


def read_clevr_predictions(path: str | Path) -> list[str]:
    """The answers of a CLEVR prediction file, one per line, stripped as openvqa reads them."""
    try:
        with open(path) as f:
            return [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read CLEVR predictions ({error}); expected one answer per line") from error


def _entry(correct: int, total: int) -> dict[str, Any]:
    """{"accuracy", "correct", "questions"}; accuracy as openvqa prints it, 100.0 * correct / total."""
    return {"accuracy": 100.0 * correct / total if total else None, "correct": correct, "questions": total}


def _name(question: Any) -> str:
    """How an error names a CLEVR question: its question_index (and image) when it has them."""
    if isinstance(question, Mapping) and "question_index" in question:
        return f"question_index {question['question_index']}, {question.get('image_filename', '?')}"
    return "no question_index"
