"""GQA scoring, equal to openvqa's own evaluation code, and GQA's prediction file.

Reference: MILVLG/openvqa ``openvqa/datasets/gqa/eval/gqa_eval.py`` (``GQAEval``, itself a copy
of the official GQA ``eval.py``) as called by ``openvqa/datasets/gqa/eval/result_eval.py``, at
commit f8f9966f202d5edf2a84096e1bc05ebf58ef55e6.  tests/test_gqa_clevr_metrics.py compares
:func:`gqa_scores` with figures that code computed (tests/make_openvqa_eval_reference.py).

What openvqa computes, over the *balanced* questions only (``isBalanced``), and we with it:

* ``accuracy``: exact string match of the prediction with ``answer`` (no normalisation);
  ``binary`` / ``open``: the same over questions whose structural type is / is not ``query``
  (so ``choose`` questions count as binary);
* ``validity`` / ``plausibility`` (only with a choices file, e.g. ``val_choices.json``): the
  prediction is in the question's ``valid`` / ``plausible`` list; for a question whose detailed
  type contains ``Common`` ("what do they have in common?") the list is ``color, material,
  shape`` whatever the choices file says;
* ``consistency`` (openvqa's runs leave it off; ``consistency=True`` here): for each correctly
  answered question with entailed questions (``entailed`` minus itself, balanced or not), the
  fraction of those answered correctly, averaged over such questions;
* ``distribution``: per ``groups.global`` group (null groups skipped) the chi-square statistic
  sum((predicted - gold)^2 / gold) over the group's *gold* answers (predicted answers that are
  never gold do not enter it), averaged over groups weighted by their question count, / 100;
  lower is better and it is not a percentage;
* accuracy per structural type, per semantic type, per number of reasoning steps (operations of
  the ``semantic`` program whose ``"operation: argument"`` text contains none of ``exist``,
  ``query: name``, ``choose name``, a substring test: an argument containing "exist" drops its
  step too), and per number of words (``question.split()``), each with its question count.

Accuracies are percentages, summed in question order as openvqa does, so they are equal to its
unrounded figures.  Not reproduced: ``grounding`` (openvqa never computes it: it needs scene
graphs and attention maps, and its code for them is commented out).

Where we differ, on inputs where openvqa crashes or stays silent: a prediction for an unknown
question, a missing prediction (openvqa raises for a balanced question and KeyErrors on an
unbalanced one), a missing choices entry or entailed question raise DataError naming the id;
a figure over no questions is None where openvqa prints 0 (or divides by zero, for distribution).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

# openvqa's printed order of the headline figures (`metrics` in GQAEval), with our key for each
HEADLINE = ("binary", "open", "accuracy", "consistency", "validity", "plausibility", "distribution")
# (our key, openvqa's printed title) of the breakdowns, in openvqa's printed order
BREAKDOWNS = (("per_structural_type", "Accuracy / structural type"),
              ("per_semantic_type", "Accuracy / semantic type"),
              ("per_steps", "Accuracy / steps number"),
              ("per_length", "Accuracy / words number"))
# program steps that do not count as reasoning steps (substrings of "operation: argument")
_NOT_A_STEP = ("exist", "query: name", "choose name")
# what a "what do they have in common?" answer may be, whatever the choices file says
_COMMON_ANSWERS = ("color", "material", "shape")


def gqa_scores(questions: Mapping[str, Mapping[str, Any]], predictions: Mapping[str, str],
               choices: Mapping[str, Mapping[str, Any]] | None = None, consistency: bool = False) -> dict:
    """Every figure openvqa's GQAEval computes, from a GQA questions dict, {questionId: answer} and choices.

    Returns ``accuracy``, ``binary``, ``open`` (percent), ``validity``, ``plausibility`` (percent; None
    without choices), ``consistency`` (percent; None unless asked), ``distribution`` (chi-square / 100),
    ``questions`` (balanced questions scored), and ``per_structural_type``, ``per_semantic_type``,
    ``per_steps``, ``per_length``: {type or number: {"accuracy": percent, "questions": count}}.
    """
    _check_predictions(questions, predictions)
    correct: list[float] = []
    by_answer_type: dict[str, list[float]] = {"binary": [], "open": []}
    valid: list[float] = []
    plausible: list[float] = []
    consistent: list[float] = []
    breakdowns: dict[str, dict[Any, list[float]]] = {key: {} for key, _ in BREAKDOWNS}
    gold_hist: dict[str, dict[str, int]] = {}
    predicted_hist: dict[str, dict[str, int]] = {}
    for qid, question in questions.items():
        try:
            if not question["isBalanced"]:
                continue
            gold, predicted = question["answer"], predictions[qid]
            score = 1.0 if predicted == gold else 0.0
            structural, semantic = question["types"]["structural"], question["types"]["semantic"]
            correct.append(score)
            by_answer_type["open" if structural == "query" else "binary"].append(score)
            for key, value in (("per_structural_type", structural), ("per_semantic_type", semantic),
                               ("per_steps", _steps(question["semantic"])),
                               ("per_length", len(question["question"].split()))):
                breakdowns[key].setdefault(value, []).append(score)
            if choices is not None:
                valid.append(_belongs(predicted, _choice_list(choices, qid, "valid"), question))
                plausible.append(_belongs(predicted, _choice_list(choices, qid, "plausible"), question))
            group = question["groups"]["global"]
            if group is not None:
                gold_hist.setdefault(group, {})
                predicted_hist.setdefault(group, {})
                gold_hist[group][gold] = gold_hist[group].get(gold, 0) + 1
                predicted_hist[group][predicted] = predicted_hist[group].get(predicted, 0) + 1
            if consistency and score:
                entailed = [eid for eid in question["entailed"] if eid != qid]
                if entailed:
                    consistent.append(_mean([_entailed_score(questions, predictions, qid, eid) for eid in entailed]))
        except (KeyError, TypeError, AttributeError) as error:
            raise DataError(f"GQA question {qid!r}: missing or malformed field ({type(error).__name__}: {error}); "
                            f"expected the GQA questions layout (answer, question, isBalanced, types.structural, "
                            f"types.semantic, types.detailed, groups.global, semantic, entailed)") from error
    return {
        "accuracy": _percent(correct),
        "binary": _percent(by_answer_type["binary"]),
        "open": _percent(by_answer_type["open"]),
        "consistency": _percent(consistent) if consistency else None,
        "validity": _percent(valid) if choices is not None else None,
        "plausibility": _percent(plausible) if choices is not None else None,
        "distribution": _chi_square(gold_hist, predicted_hist),
        "questions": len(correct),
        **{key: {value: {"accuracy": _percent(scores), "questions": len(scores)} for value, scores in table.items()}
           for key, table in breakdowns.items()},
    }


def gqa_report_lines(scores: Mapping[str, Any]) -> list[str]:
    """The lines openvqa writes to its log for these scores (its result and detail strings)."""
    lines = []
    for key in HEADLINE:
        value = scores[key]
        if value is None and key in ("consistency", "validity", "plausibility"):
            continue  # openvqa prints them only when computed
        if value is None:
            lines.append(f"{key.capitalize()}: n/a (no questions)")
        elif key == "distribution":
            lines.append(f"Distribution: {value:.2f} (lower is better)")
        else:
            lines.append(f"{key.capitalize()}: {value:.2f}%")
    for key, title in BREAKDOWNS:
        lines.append(f"{title}:")
        # openvqa means to print "Attribute" for "attr" etc., but tests a stale loop variable and
        # so prints the raw type names; we print what it prints
        for value in sorted(scores[key]):
            entry = scores[key][value]
            lines.append(f"  {value}: {entry['accuracy']:.2f}% ({entry['questions']} questions)")
    return lines


def write_gqa_predictions(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write (questionId, answer) pairs as GQA's prediction file, ``[{"questionId", "prediction"}]``, atomically."""
    rows, seen = [], set()
    for qid, answer in pairs:
        if qid in seen:
            raise DataError(f"{path}: two predictions for GQA question {qid!r}; give one answer per question")
        seen.add(qid)
        rows.append({"questionId": qid, "prediction": answer})
    return write_json_atomic(path, rows)


def read_gqa_predictions(path: str | Path) -> dict[str, str]:
    """{questionId: prediction} from a GQA prediction file; DataError when malformed or an id repeats."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read GQA predictions ({error}); expected a JSON list of "
                        f'{{"questionId": ..., "prediction": ...}}') from error
    if not isinstance(rows, list):
        raise DataError(f'{path}: expected a JSON list of {{"questionId": ..., "prediction": ...}}, '
                        f"got a {type(rows).__name__}")
    predictions: dict[str, str] = {}
    for position, row in enumerate(rows):
        if not isinstance(row, dict) or "questionId" not in row or "prediction" not in row:
            raise DataError(f'{path}: entry {position} is not {{"questionId": ..., "prediction": ...}}: {row!r}')
        if row["questionId"] in predictions:
            raise DataError(f"{path}: two predictions for GQA question {row['questionId']!r} (entry {position})")
        predictions[row["questionId"]] = row["prediction"]
    return predictions


def _check_predictions(questions: Mapping[str, Any], predictions: Mapping[str, str]) -> None:
    """DataError naming the first prediction for an unknown question, or the first question without one."""
    unknown = next((qid for qid in predictions if qid not in questions), None)
    if unknown is not None:
        raise DataError(f"GQA prediction for question {unknown!r}, which is not in the questions file "
                        f"({len(questions)} questions); predict the split you score")
    missing = [qid for qid in questions if qid not in predictions]
    if missing:
        raise DataError(f"no prediction for GQA question {missing[0]!r} ({len(missing)} of {len(questions)} "
                        f"questions have none); predict every question of the split")


def _steps(program: list[Mapping[str, Any]]) -> int:
    """The number of reasoning steps of a GQA ``semantic`` program, counted as openvqa counts them."""
    return sum(1 for step in program
               if not any(word in f"{step['operation']}: {step['argument']}" for word in _NOT_A_STEP))


def _choice_list(choices: Mapping[str, Mapping[str, Any]], qid: str, kind: str) -> list[str]:
    """The question's `valid` or `plausible` answers from the choices file; DataError when absent."""
    if qid not in choices or kind not in choices[qid]:
        raise DataError(f"GQA choices file has no {kind!r} answers for question {qid!r}; give the choices file "
                        f"of the scored split (e.g. val_choices.json), or none")
    return choices[qid][kind]


def _belongs(predicted: str, answers: list[str], question: Mapping[str, Any]) -> float:
    """1.0 if the prediction is among `answers` (the "in common" answers for a *Common question), else 0.0."""
    if "Common" in question["types"]["detailed"]:
        answers = list(_COMMON_ANSWERS)
    return 1.0 if predicted in answers else 0.0


def _entailed_score(questions: Mapping[str, Mapping[str, Any]], predictions: Mapping[str, str],
                    qid: str, eid: str) -> float:
    """1.0 if entailed question `eid` (of question `qid`) is answered correctly, else 0.0."""
    if eid not in questions:
        raise DataError(f"GQA question {qid!r} entails question {eid!r}, which is not in the questions file; "
                        f"score consistency on a split with all its entailed questions (e.g. val_all)")
    return 1.0 if predictions[eid] == questions[eid]["answer"] else 0.0


def _mean(values: list[float]) -> float:
    """sum / count, summed left to right as openvqa's ``avg``."""
    return float(sum(values)) / len(values)


def _percent(scores: list[float]) -> float | None:
    """The mean of 0/1 scores in percent (None for no scores; openvqa prints 0)."""
    return _mean(scores) * 100 if scores else None


def _chi_square(gold: dict[str, dict[str, int]], predicted: dict[str, dict[str, int]]) -> float | None:
    """openvqa's distribution figure: per-group chi-square averaged with question-count weights, / 100."""
    weighted, total = 0.0, 0
    for group, gold_counts in gold.items():
        statistic = 0.0
        for answer, expected in gold_counts.items():
            statistic += float(predicted[group].get(answer, 0) - expected) ** 2 / expected
        count = sum(gold_counts.values())
        weighted += statistic * count
        total += count
    return weighted / total / 100 if total else None
