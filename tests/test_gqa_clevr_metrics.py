"""Tests for accuvqa.gqa_metrics and accuvqa.clevr_metrics: equal to openvqa's own evaluation code.

The reference figures in tests/data/openvqa_eval/ were computed by openvqa's unmodified GQA and
CLEVR evaluation code (tests/make_openvqa_eval_reference.py) on the synthetic inputs stored beside
them; hand-worked cases check the rules one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accuvqa.clevr_metrics import (FAMILIES, clevr_report_lines, clevr_scores, read_clevr_predictions,
                                   write_clevr_predictions)
from accuvqa.errors import DataError
from accuvqa.gqa_metrics import gqa_report_lines, gqa_scores, read_gqa_predictions, write_gqa_predictions

DATA = Path(__file__).resolve().parent / "data" / "openvqa_eval"
REL = 1e-9
# openvqa's score key -> ours
GQA_HEADLINE = {"accuracy": "accuracy", "binary": "binary", "open": "open", "consistency": "consistency",
                "validity": "validity", "plausibility": "plausibility", "distribution": "distribution"}
GQA_TABLES = {"accuracyPerStructuralType": "per_structural_type", "accuracyPerSemanticType": "per_semantic_type",
              "accuracyPerSteps": "per_steps", "accuracyPerLength": "per_length"}


def load(name: str):
    """A stored input or reference file."""
    return json.loads((DATA / name).read_text())


@pytest.fixture(scope="module")
def gqa() -> dict:
    """The stored GQA inputs and openvqa's figures."""
    return {"questions": load("gqa_questions.json"), "choices": load("gqa_choices.json"),
            "predictions": read_gqa_predictions(DATA / "gqa_predictions.json"),
            "cases": load("gqa_reference.json")["cases"]}


@pytest.fixture(scope="module")
def clevr() -> dict:
    """The stored CLEVR inputs and openvqa's figures."""
    return {"questions": load("clevr_questions.json")["questions"],
            "predictions": read_clevr_predictions(DATA / "clevr_predictions.txt"),
            "reference": load("clevr_reference.json")}


def question(answer: str, structural: str = "query", semantic: str = "attr", detailed: str = "queryAttr",
             group: str | None = None, text: str = "What is it?", program: list | None = None,
             entailed: list | None = None, balanced: bool = True) -> dict:
    """One question in the GQA balanced-questions layout (the fields GQAEval reads)."""
    return {"question": text, "answer": answer, "isBalanced": balanced, "entailed": entailed or [],
            "groups": {"global": group, "local": None}, "fullAnswer": answer, "imageId": "n1",
            "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
            "semantic": program if program is not None else [{"operation": "select", "argument": "x (1)"}]}


# ---------------------------------------------------------------------------
# GQA: equal to openvqa's GQAEval
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["with_choices", "no_choices", "consistency"])
def test_gqa_scores_equal_openvqa(gqa: dict, case: str) -> None:
    reference = gqa["cases"][case]["scores"]
    ours = gqa_scores(gqa["questions"], gqa["predictions"], gqa["choices"] if case != "no_choices" else None,
                      consistency=case == "consistency")
    for theirs_key, our_key in GQA_HEADLINE.items():
        computed = ((theirs_key == "consistency" and case == "consistency")
                    or (theirs_key in ("validity", "plausibility") and case != "no_choices")
                    or theirs_key not in ("consistency", "validity", "plausibility"))
        if computed:
            assert ours[our_key] == pytest.approx(reference[theirs_key], rel=REL, abs=0), theirs_key
        else:  # openvqa keeps 0 for a figure it neither computes nor prints
            assert ours[our_key] is None and reference[theirs_key] == 0, theirs_key
    assert ours["questions"] == sum(1 for q in gqa["questions"].values() if q["isBalanced"])
    for theirs_key, our_key in GQA_TABLES.items():
        theirs = {key: (score, count) for key, score, count in reference[theirs_key]}
        assert sorted(ours[our_key]) == sorted(theirs), our_key
        for key, (score, count) in theirs.items():
            assert ours[our_key][key]["questions"] == count, (our_key, key)
            assert ours[our_key][key]["accuracy"] == pytest.approx(score, rel=REL, abs=0), (our_key, key)


@pytest.mark.parametrize("case", ["with_choices", "no_choices", "consistency"])
def test_gqa_report_lines_equal_openvqa_log(gqa: dict, case: str) -> None:
    scores = gqa_scores(gqa["questions"], gqa["predictions"], gqa["choices"] if case != "no_choices" else None,
                        consistency=case == "consistency")
    assert gqa_report_lines(scores) == gqa["cases"][case]["log_lines"]


def test_reference_exercises_every_category(gqa: dict) -> None:
    scores = gqa_scores(gqa["questions"], gqa["predictions"], gqa["choices"], consistency=True)
    for key in ("per_structural_type", "per_semantic_type"):
        assert all(0 < entry["accuracy"] < 100 for entry in scores[key].values()), key
    assert set(scores["per_structural_type"]) == {"verify", "query", "choose", "logical", "compare"}
    assert set(scores["per_semantic_type"]) == {"attr", "cat", "global", "obj", "rel"}
    assert any(not q["isBalanced"] for q in gqa["questions"].values())
    assert 0 < scores["validity"] < 100 and 0 < scores["plausibility"] < scores["validity"]


def test_gqa_writer_writes_openvqa_file_bytes(gqa: dict, tmp_path: Path) -> None:
    path = write_gqa_predictions(tmp_path / "result.json", gqa["predictions"].items())
    assert path.read_bytes() == (DATA / "gqa_predictions.json").read_bytes()
    assert read_gqa_predictions(path) == gqa["predictions"]
    assert not [p for p in tmp_path.iterdir() if p.name != "result.json"]  # no temporary file left


# ---------------------------------------------------------------------------
# GQA controls: a changed prediction changes the right figures
# ---------------------------------------------------------------------------


def changed(predictions: dict, qid: str, answer: str) -> dict:
    """The predictions with one answer replaced."""
    return {**predictions, qid: answer}


def test_gqa_fixing_one_answer_moves_only_its_categories(gqa: dict) -> None:
    questions, predictions = gqa["questions"], gqa["predictions"]
    qid = next(i for i, q in questions.items() if q["isBalanced"] and q["types"]["structural"] == "verify"
               and predictions[i] != q["answer"])
    before = gqa_scores(questions, predictions)
    after = gqa_scores(questions, changed(predictions, qid, questions[qid]["answer"]))
    n, n_binary = before["questions"], sum(1 for q in questions.values()
                                           if q["isBalanced"] and q["types"]["structural"] != "query")
    assert after["accuracy"] == pytest.approx(before["accuracy"] + 100 / n, rel=REL)
    assert after["binary"] == pytest.approx(before["binary"] + 100 / n_binary, rel=REL)
    assert after["open"] == before["open"]
    assert after["per_structural_type"]["verify"]["accuracy"] > before["per_structural_type"]["verify"]["accuracy"]
    assert all(after["per_structural_type"][t] == before["per_structural_type"][t]
               for t in before["per_structural_type"] if t != "verify")
    assert all(after["per_semantic_type"][t] == before["per_semantic_type"][t]
               for t in before["per_semantic_type"] if t != questions[qid]["types"]["semantic"])


def test_gqa_unbalanced_question_counts_only_for_consistency(gqa: dict) -> None:
    questions, predictions = gqa["questions"], gqa["predictions"]
    # an unbalanced question entailed by a correctly answered balanced one
    qid = next(e for i, q in questions.items() if q["isBalanced"] and predictions[i] == q["answer"]
               for e in q["entailed"] if e != i and not questions[e]["isBalanced"])
    flipped = changed(predictions, qid, "no" if predictions[qid] == questions[qid]["answer"]
                      else questions[qid]["answer"])
    before = gqa_scores(questions, predictions, gqa["choices"], consistency=True)
    after = gqa_scores(questions, flipped, gqa["choices"], consistency=True)
    assert after["consistency"] != before["consistency"]
    assert {k: v for k, v in after.items() if k != "consistency"} == \
        {k: v for k, v in before.items() if k != "consistency"}


def test_gqa_common_question_is_valid_for_any_common_answer(gqa: dict) -> None:
    # openvqa replaces the choices of a "...Common" question by color/material/shape; kept for equality
    questions, choices = gqa["questions"], gqa["choices"]
    qid = next(i for i, q in questions.items() if q["isBalanced"] and "Common" in q["types"]["detailed"])
    assert "shape" not in choices[qid]["valid"]
    as_color = gqa_scores(questions, changed(gqa["predictions"], qid, "color"), choices)
    as_shape = gqa_scores(questions, changed(gqa["predictions"], qid, "shape"), choices)
    as_red = gqa_scores(questions, changed(gqa["predictions"], qid, "red"), choices)
    assert as_shape["validity"] == as_color["validity"] > as_red["validity"]
    assert as_shape["plausibility"] == as_color["plausibility"] > as_red["plausibility"]


def test_gqa_hand_worked_figures() -> None:
    # steps: "exist" anywhere in "operation: argument", "query: name" and "choose name" are no steps
    two_steps = [{"operation": "select", "argument": "existing wall (3)"},
                 {"operation": "relate", "argument": "x,on,s"},
                 {"operation": "filter color", "argument": "red"}, {"operation": "query", "argument": "name"}]
    no_step = [{"operation": "exist", "argument": "?"}, {"operation": "choose name", "argument": "cup|plate"}]
    questions = {
        "1": question("red", group="color", text="What color is it?"),
        "2": question("red", group="color", text="What color is the cup?"),
        "3": question("blue", group="color", program=two_steps),
        "4": question("yes", structural="verify", detailed="verifyAttr", entailed=["4", "5", "6"]),
        "5": question("no", structural="choose", semantic="rel", balanced=False),
        "6": question("no", structural="logical", semantic="obj", detailed="twoCommonish", program=no_step),
    }
    predictions = {"1": "red", "2": "blue", "3": "green", "4": "yes", "5": "no", "6": "material"}
    choices = {q: {"valid": ["red", "blue", "green", "yes", "no"], "plausible": ["red", "yes"]} for q in questions}
    scores = gqa_scores(questions, predictions, choices, consistency=True)
    assert scores["questions"] == 5  # question 5 is unbalanced
    assert scores["accuracy"] == pytest.approx(40.0) and scores["open"] == pytest.approx(100 / 3)
    assert scores["binary"] == pytest.approx(50.0)  # 4 (verify) right, 6 (logical) wrong
    # valid: 1, 2, 3, 4 and 6 ("material": a *Common* detailed type); plausible: 1, 4 and 6
    assert scores["validity"] == pytest.approx(100.0) and scores["plausibility"] == pytest.approx(60.0)
    assert scores["consistency"] == pytest.approx(50.0)  # question 4 entails 5 (right) and 6 (wrong)
    # group "color": gold red 2, blue 1; predicted red 1, blue 1, green 1 -> (1-2)^2/2 + 0 = 0.5, weight 3
    assert scores["distribution"] == pytest.approx(0.5 * 3 / 3 / 100)
    assert {k: v["questions"] for k, v in scores["per_steps"].items()} == {1: 3, 2: 1, 0: 1}
    assert [scores["per_steps"][k]["accuracy"] for k in (1, 2, 0)] == pytest.approx([200 / 3, 0.0, 0.0])
    assert {k: v["questions"] for k, v in scores["per_length"].items()} == {4: 1, 5: 1, 3: 3}
    assert [scores["per_length"][k]["accuracy"] for k in (4, 5, 3)] == pytest.approx([100.0, 0.0, 100 / 3])
    assert scores["per_structural_type"]["query"] == {"accuracy": pytest.approx(100 / 3), "questions": 3}


def test_gqa_empty_categories_are_none_not_zero() -> None:
    scores = gqa_scores({"1": question("red")}, {"1": "blue"}, consistency=True)
    assert scores["open"] == 0.0 and scores["binary"] is None and scores["consistency"] is None
    assert scores["distribution"] is None  # no global group: openvqa divides by zero
    assert gqa_report_lines(scores)[:4] == ["Binary: n/a (no questions)", "Open: 0.00%", "Accuracy: 0.00%",
                                            "Distribution: n/a (no questions)"]


# ---------------------------------------------------------------------------
# GQA errors
# ---------------------------------------------------------------------------


def test_gqa_prediction_for_unknown_question_is_named() -> None:
    with pytest.raises(DataError, match=r"prediction for question '9'.*not in the questions file"):
        gqa_scores({"1": question("red")}, {"1": "red", "9": "red", "8": "red"})


def test_gqa_missing_prediction_is_named_even_for_unbalanced() -> None:
    questions = {"1": question("red"), "2": question("red", balanced=False), "3": question("red")}
    with pytest.raises(DataError, match=r"no prediction for GQA question '2' \(2 of 3"):
        gqa_scores(questions, {"1": "red"})


def test_gqa_missing_choices_and_entailed_question_are_named() -> None:
    questions = {"1": question("red", entailed=["7"])}
    with pytest.raises(DataError, match=r"no 'valid' answers for question '1'"):
        gqa_scores(questions, {"1": "red"}, {"2": {"valid": [], "plausible": []}})
    with pytest.raises(DataError, match=r"'1' entails question '7'"):
        gqa_scores(questions, {"1": "red"}, consistency=True)


def test_gqa_malformed_question_is_named() -> None:
    bad = question("red")
    del bad["types"]
    with pytest.raises(DataError, match=r"GQA question '1': missing or malformed field.*'types'"):
        gqa_scores({"1": bad}, {"1": "red"})


def test_gqa_prediction_files_reject_repeats_and_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="two predictions for GQA question '1'"):
        write_gqa_predictions(tmp_path / "p.json", [("1", "a"), ("1", "b")])
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([{"questionId": "1", "prediction": "a"}, {"questionId": "1", "prediction": "b"}]))
    with pytest.raises(DataError, match=r"two predictions for GQA question '1' \(entry 1\)"):
        read_gqa_predictions(path)
    path.write_text(json.dumps({"1": "a"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_gqa_predictions(path)


# ---------------------------------------------------------------------------
# CLEVR: equal to openvqa's result_eval
# ---------------------------------------------------------------------------


def test_clevr_scores_equal_openvqa(clevr: dict) -> None:
    scores = clevr_scores(clevr["questions"], clevr["predictions"])
    q_dict, score_dict = clevr["reference"]["q_dict"], clevr["reference"]["score_dict"]
    correct, total = q_dict["Overall"]
    assert (scores["correct"], scores["questions"]) == (correct, total)
    assert scores["accuracy"] == pytest.approx(100.0 * correct / total, rel=REL, abs=0)
    assert {f: [e["correct"], e["questions"]] for f, e in scores["per_function"].items()} == \
        {f: v for f, v in q_dict.items() if f != "Overall"}
    assert {f: [e["correct"], e["questions"]] for f, e in scores["per_family"].items()} == \
        {f: v for f, v in score_dict.items() if f != "Overall"}
    for family, (c, n) in score_dict.items():
        if family != "Overall":
            assert scores["per_family"][family]["accuracy"] == pytest.approx(100.0 * c / n, rel=REL, abs=0)
    assert all(0 < c < n for c, n in q_dict.values())  # right and wrong answers for every function


def test_clevr_report_lines_equal_openvqa_log(clevr: dict) -> None:
    assert clevr_report_lines(clevr_scores(clevr["questions"], clevr["predictions"])) == \
        clevr["reference"]["log_lines"]


def test_clevr_writer_writes_openvqa_file_bytes(clevr: dict, tmp_path: Path) -> None:
    path = write_clevr_predictions(tmp_path / "result.txt", clevr["predictions"])
    assert path.read_bytes() == (DATA / "clevr_predictions.txt").read_bytes()
    assert read_clevr_predictions(path) == clevr["predictions"]


def test_clevr_family_comes_from_last_program_function(clevr: dict) -> None:
    questions, predictions = clevr["questions"], list(clevr["predictions"])
    # openvqa files equal_integer under Compare_Attribute, not Compare_Numbers; kept for equality
    assert "equal_integer" in FAMILIES["Compare_Attribute"]
    i = next(i for i, q in enumerate(questions)
             if q["program"][-1]["function"] == "equal_integer" and predictions[i] != q["answer"])
    before = clevr_scores(questions, predictions)
    predictions[i] = questions[i]["answer"]
    after = clevr_scores(questions, predictions)
    assert after["per_family"]["Compare_Attribute"]["correct"] == \
        before["per_family"]["Compare_Attribute"]["correct"] + 1
    assert after["correct"] == before["correct"] + 1
    assert {f: e for f, e in after["per_family"].items() if f != "Compare_Attribute"} == \
        {f: e for f, e in before["per_family"].items() if f != "Compare_Attribute"}


def test_clevr_exact_match_after_openvqa_strip() -> None:
    questions = [{"program": [{"function": "scene"}, {"function": "count"}], "answer": "2"},
                 {"program": [{"function": "scene"}, {"function": "exist"}], "answer": "yes"}]
    scores = clevr_scores(questions, [" 2 ", "Yes"])
    assert scores["per_function"] == {"count": {"accuracy": 100.0, "correct": 1, "questions": 1},
                                      "exist": {"accuracy": 0.0, "correct": 0, "questions": 1}}
    # families with no question (openvqa: KeyError) are empty, not a crash
    assert scores["per_family"]["Query_Attribute"] == {"accuracy": None, "correct": 0, "questions": 0}
    assert clevr_report_lines(scores)[-1] == "Compare_Attribute : 0 / 0 = n/a"


def test_clevr_mismatched_inputs_are_named(clevr: dict) -> None:
    questions = clevr["questions"]
    with pytest.raises(DataError, match=r"57 CLEVR questions but 55 predictions: no prediction for question 55 "
                                        r"\(question_index 55, CLEVR_val_000018.png\)"):
        clevr_scores(questions, clevr["predictions"][:55])
    with pytest.raises(DataError, match=r"58 predictions: prediction 57 \('extra'\) has no question"):
        clevr_scores(questions, clevr["predictions"] + ["extra"])
    bad = [dict(questions[0], program=[])]
    with pytest.raises(DataError, match=r"CLEVR question 0 \(question_index 0.*no answer or functional program"):
        clevr_scores(bad, ["yes"])
    with pytest.raises(DataError, match=r"answer 1 \('a\\nb'\) has a line break"):
        write_clevr_predictions(Path("/nonexistent/never_written.txt"), ["a", "a\nb"])
