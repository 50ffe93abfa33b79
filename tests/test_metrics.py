"""Tests for accuvqa.metrics: hand-worked rules and a reference produced by the original VQA code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accuvqa.metrics import evaluate, normalize_answer, vqa_accuracy

REFERENCE = Path(__file__).resolve().parent / "data" / "vqa_eval_reference.json"


def ten(*groups: tuple[str, int]) -> list[str]:
    """Build a gt list from (answer, count) groups."""
    out = [a for a, k in groups for _ in range(k)]
    return out


# ---------------------------------------------------------------------------
# normalize_answer: one rule at a time
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # whitespace: newline / tab -> space, strip, whitespace runs collapse
        (" yes\n", "yes"),
        ("hot\tdog", "hot dog"),
        ("black  and   white", "black and white"),
        # lowercase
        ("RED", "red"),
        # number words -> digits ("none" too), after lowercasing
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("ONE", "1"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # articles dropped
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("a", ""),
        ("none of the above", "0 of above"),
        # contractions restored
        ("dont", "don't"),
        ("I dont know", "i don't know"),
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        ("youd've", "you'd've"),
        ("you'dve", "you'd've"),
        ("its", "its"),  # not in the table
        ("Im", "im"),  # the table's "Im" key can never fire after lowercasing
        ("somebody'd", "somebodyd"),  # official quirk
        # punctuation: a mark becomes a space ...
        ("t-shirt", "t shirt"),
        ("red/white", "red white"),
        ("dogs,cats", "dogs cats"),
        ("(yes)", "yes"),
        # ... or is deleted when it touches a space somewhere in the text
        ("t - shirt", "t shirt"),
        ("yes, it is", "yes it is"),
        ("x; y", "x y"),
        ("yes!", "yes"),  # "!" at the end touches no space: becomes " ", then stripped by split
        # characters that are not in the punctuation list are kept
        ("it's", "it's"),
        ("10:30", "10:30"),
        ("$5", "$5"),
        ("#1", "#1"),
        # comma between digits: every listed mark is deleted
        ("1,000", "1000"),
        ("5,000,000", "5000000"),
        ("3,4", "34"),
        ("a/b 1,2", "ab 12"),
        ("1,000 (approx.)", "1000 approx"),
        ("1, 000", "1 000"),  # no digit,digit: ", " is deleted, the space stays
        # periods: deleted unless followed by a digit
        ("yes.", "yes"),
        ("3.", "3"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("a.5", "a.5"),  # official regex only looks at the next character
        ("mr. smith", "mr smith"),
        ("u.s.a.", "usa"),
        ("1.5.2", "1.5.2"),
        ("one.", "1"),
        ("...", ""),
        # at most 32 periods are deleted (official passes re.UNICODE == 32 as count)
        ("." * 33 + "yes", ".yes"),
        ("." * 40 + "yes", "." * 8 + "yes"),
        # digits are ASCII digits, as in the original Python 2 run
        ("\u0661,\u0662", "\u0661 \u0662"),
    ],
)
def test_normalize_answer_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------------------
# vqa_accuracy
# ---------------------------------------------------------------------------

# Leave-one-out averaging, m = number of the 10 gt answers equal to the
# prediction.  A matching gt leaves m - 1 matches among the other nine, a
# non-matching one leaves m; each subset scores min(1, matches / 3):
#   m = 0: 10 * 0 / 10                                  = 0
#   m = 1: (1 * 0/3 + 9 * 1/3) / 10  = 3 / 10            = 0.3
#   m = 2: (2 * 1/3 + 8 * 2/3) / 10  = (2/3 + 16/3) / 10 = 0.6
#   m = 3: (3 * 2/3 + 7 * 1) / 10    = (2 + 7) / 10      = 0.9
#   m = 4: (4 * 1 + 6 * 1) / 10                          = 1.0
#   m >= 4: 1.0
@pytest.mark.parametrize(
    "matches, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0)],
)
def test_leave_one_out_averaging(matches: int, expected: float) -> None:
    gts = ten(("cat", matches), ("dog", 9 - matches), ("bird", 1))  # never unanimous
    assert vqa_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_with_normalised_matches() -> None:
    # "two" / "Two" / "2." all normalise to "2": 3 matches -> 0.9
    gts = ten(("2", 1), ("two", 1), ("Two", 1), ("3", 7))
    assert vqa_accuracy("two", gts) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("2.", gts) == pytest.approx(0.9, abs=1e-12)


def test_other_list_lengths() -> None:
    # 3 gts ["yes", "no", "yes"]: leave out yes -> 1 match, no -> 2, yes -> 1
    # (1/3 + 2/3 + 1/3) / 3 = 4/9
    assert vqa_accuracy("yes", ["yes", "no", "yes"]) == pytest.approx(4 / 9, abs=1e-12)
    # a single gt leaves nothing to match
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize(
    "pred, gts, expected",
    [
        ("two", ten(("2", 3), ("3", 7)), 0.9),  # number word
        ("2", ten(("two", 1), ("3", 9)), 0.3),
        ("a dog", ten(("dog", 3), ("puppy", 7)), 0.9),  # articles
        ("the dog", ten(("a dog", 2), ("dog", 1), ("cat", 7)), 0.9),
        ("yes.", ten(("yes", 5), ("no", 5)), 1.0),  # punctuation
        ("yes!", ten(("yes", 2), ("no", 8)), 0.6),
        ("dont know", ten(("don't know", 3), ("no", 7)), 0.9),  # contractions
        ("its", ten(("it's", 5), ("it is", 5)), 0.0),
        ("1,000", ten(("1000", 3), ("1 000", 2), ("thousand", 5)), 0.9),  # commas between digits
        ("3.", ten(("3", 3), ("3.5", 7)), 0.9),  # periods
        ("3.5", ten(("3.5", 2), ("3", 8)), 0.6),
        ("RED", ten(("red", 2), ("Red", 2), ("blue", 6)), 1.0),  # lowercase
        (" hot\tdog ", ten(("hot dog", 3), ("hotdog", 7)), 0.9),  # whitespace
    ],
)
def test_accuracy_with_each_rule(pred: str, gts: list[str], expected: float) -> None:
    assert vqa_accuracy(pred, gts) == pytest.approx(expected, abs=1e-12)


def test_unanimous_gts_get_only_whitespace_cleaning() -> None:
    # Official (GT-Vision-Lab) behaviour: when all ten stripped gts are equal,
    # neither side is normalised further.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes"] * 9 + ["yes\t"]) == 1.0  # still unanimous after strip
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 0.0
    # one disagreeing annotator switches normalisation on for both sides
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def _q(answers: list[str], answer_type: str, question_type: str) -> dict:
    return {"answers": answers, "answer_type": answer_type, "question_type": question_type}


def test_evaluate_per_type_aggregation() -> None:
    questions = {
        1: _q(ten(("yes", 9), ("no", 1)), "yes/no", "is the"),  # "yes" -> 1.0
        2: _q(ten(("no", 2), ("yes", 8)), "yes/no", "is the"),  # "no"  -> 0.6
        3: _q(ten(("2", 1), ("3", 9)), "number", "how many"),  # "two" -> 0.3
        4: _q(ten(("red", 3), ("blue", 7)), "other", "what color is the"),  # "red" -> 0.9
        5: _q(ten(("dog", 10)), "other", "is the"),  # "cat" -> 0.0
    }
    predictions = {1: "yes", 2: "no", 3: "two", 4: "red", 5: "cat", 99: "ignored"}
    result = evaluate(predictions, questions)
    assert result["n"] == 5
    assert result["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.3 + 0.9 + 0.0) / 5)
    assert result["per_answer_type"] == pytest.approx(
        {"yes/no": 100 * (1.0 + 0.6) / 2, "number": 30.0, "other": 100 * (0.9 + 0.0) / 2}
    )
    assert result["per_question_type"] == pytest.approx(
        {"is the": 100 * (1.0 + 0.6 + 0.0) / 3, "how many": 30.0, "what color is the": 90.0}
    )


def test_evaluate_returns_unrounded_percent() -> None:
    questions = {
        1: _q(ten(("a", 1), ("b", 9)), "other", "what"),  # "a" -> 0.3
        2: _q(ten(("a", 9), ("b", 1)), "other", "what"),  # "a" -> 1.0
        3: _q(ten(("c", 5), ("d", 5)), "other", "what"),  # "x" -> 0.0
    }
    # 100 * (0.3 + 1.0 + 0.0) / 3 = 43.333..., not rounded to 43.33
    result = evaluate({1: "a", 2: "a", 3: "x"}, questions)
    assert result["accuracy"] == pytest.approx(130 / 3, abs=1e-9)
    assert result["accuracy"] != round(result["accuracy"], 2)


def test_evaluate_missing_predictions() -> None:
    questions = {i: _q(["yes"] * 10, "yes/no", "is the") for i in (10, 11, 12)}
    with pytest.raises(ValueError, match=r"2 of 3 .*question id 11"):
        evaluate({10: "yes"}, questions)


# ---------------------------------------------------------------------------
# Reference computed by the original GT-Vision-Lab/VQA vqaEval.py
# (tests/data/make_vqa_eval_reference.py; unmodified, under Python 2.7)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict:
    with REFERENCE.open(encoding="utf-8") as f:
        return json.load(f)


def test_reference_per_question(reference: dict) -> None:
    assert len(reference["cases"]) >= 100
    for case in reference["cases"]:
        ours = vqa_accuracy(case["prediction"], case["answers"])
        assert ours == pytest.approx(case["accuracy"], abs=1e-9), case
        # the official per-question value it stores is round(100 * acc, 2)
        assert round(100 * ours, 2) == pytest.approx(case["accuracy_percent_rounded"], abs=1e-9), case


def test_reference_normalisation(reference: dict) -> None:
    for raw, expected in reference["normalize"].items():
        assert normalize_answer(raw) == expected, raw


def test_reference_aggregates(reference: dict) -> None:
    cases = reference["cases"]
    questions = {
        c["question_id"]: {k: c[k] for k in ("answers", "answer_type", "question_type")} for c in cases
    }
    predictions = {c["question_id"]: c["prediction"] for c in cases}
    result = evaluate(predictions, questions)
    overall = reference["overall"]
    assert result["n"] == len(cases)
    assert result["accuracy"] == pytest.approx(overall["accuracy"], abs=1e-9)
    assert result["per_answer_type"] == pytest.approx(overall["per_answer_type"], abs=1e-9)
    assert result["per_question_type"] == pytest.approx(overall["per_question_type"], abs=1e-9)
    # the official code rounds the aggregates to 2 decimals at the end
    rounded = overall["rounded"]
    assert round(result["accuracy"], 2) == pytest.approx(rounded["overall"], abs=1e-9)
    for t, v in result["per_answer_type"].items():
        assert round(v, 2) == pytest.approx(rounded["perAnswerType"][t], abs=1e-9)
    for t, v in result["per_question_type"].items():
        assert round(v, 2) == pytest.approx(rounded["perQuestionType"][t], abs=1e-9)
