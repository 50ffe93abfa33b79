"""Regenerate tests/data/openvqa_eval/ by running openvqa's OWN GQA and CLEVR evaluation code.

Not run by the tests (they read only what it wrote). How it was run, from the worktree root:

    # snapshot of github.com/MILVLG/openvqa at commit f8f9966f202d5edf2a84096e1bc05ebf58ef55e6
    mkdir -p .cache/openvqa
    git --git-dir=<openvqa clone>/.git archive HEAD | tar -x -C .cache/openvqa
    .venv/bin/python tests/make_openvqa_eval_reference.py .cache/openvqa

(Python 3.11, numpy 2.4, tqdm 4.70; openvqa's eval files import nothing else.)

It builds small synthetic inputs in the exact file layouts (deterministic: no randomness),
writes them under tests/data/openvqa_eval/, and runs openvqa's files UNMODIFIED, imported from
the given tree (openvqa has no __init__.py files: namespace packages):

* GQA, ``openvqa/datasets/gqa/eval/result_eval.py: eval`` (what openvqa runs after a val epoch:
  it writes the prediction file, then runs ``GQAEval`` with EVAL_CONSISTENCY=False), once with a
  choices file and once without; and ``gqa_eval.GQAEval`` directly with EVAL_CONSISTENCY=True
  (openvqa never turns it on; the figure is its code's nonetheless).
* CLEVR, ``openvqa/datasets/clevr/eval/result_eval.py: eval`` (writes the one-answer-per-line file,
  reads it back, scores, writes the log).

Stubbed, because irrelevant to scoring: openvqa's config object ``__C`` (a SimpleNamespace with
RAW_PATH / DATASET / SPLIT / TEST_SAVE_PRED=False, so no prediction vectors are pickled) and the
``dataset`` object (qid_list / data_size, ans_size and ix_to_ans, the answer vocabulary built from
the gold answers and the predictions); the answer indices passed in are those of the chosen
predictions.  Observed, not changed: for GQA the GQAEval instance (``result_eval.GQAEval`` is
replaced by a subclass that only records ``self``) to read its unrounded ``scores``; for CLEVR
the locals ``q_dict`` and ``score_dict`` of ``eval`` when it returns (``sys.setprofile``).
stdout (its "Loading ..." prints and tqdm bars) is silenced.  Grounding is not exercised:
GQAEval never computes it (its scene-graph loading is commented out; the score stays empty).

Outputs (all JSON but the CLEVR predictions):
``gqa_questions.json`` (balanced-questions layout, keyed by questionId), ``gqa_choices.json``
({qid: {"valid", "plausible"}}), ``gqa_predictions.json`` (as openvqa's result_eval wrote it),
``gqa_reference.json`` (per case: GQAEval's ``scores`` with per-type tables as [key, percent,
count] rows, and the lines it logged, blank lines dropped), ``clevr_questions.json`` ({"questions": [...]}),
``clevr_predictions.txt`` (as openvqa wrote it), ``clevr_reference.json`` (``q_dict``,
``score_dict`` as [correct, total], the logged lines, blank lines dropped).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

OUT = Path(__file__).resolve().parent / "data" / "openvqa_eval"
OPENVQA_COMMIT = "f8f9966f202d5edf2a84096e1bc05ebf58ef55e6"

COLORS = ["red", "blue", "green", "white", "black", "brown"]
OBJECTS = ["table", "chair", "cup", "dog", "car", "shirt", "man", "woman", "plate"]
# the prediction kinds, cycled per template so that every category gets right and wrong answers
KINDS = ["right", "plausible", "right", "valid", "invalid", "right", "case"]


def _program(*steps: str) -> list[dict]:
    """A GQA `semantic` program from "operation: argument" strings."""
    out = []
    for i, step in enumerate(steps):
        operation, argument = step.split(": ", 1) if ": " in step else (step, "")
        out.append({"operation": operation, "dependencies": [i - 1] if i else [], "argument": argument})
    return out


def _gqa_template(t: int, k: int) -> dict:
    """Question k of GQA template t: text, answer, types, group, program, valid and plausible answers."""
    o1, o2 = OBJECTS[(t + k) % len(OBJECTS)], OBJECTS[(t + 2 * k + 3) % len(OBJECTS)]
    c1, c2 = COLORS[(t + k) % len(COLORS)], COLORS[(t + 3 * k + 1) % len(COLORS)]
    yes_no = "yes" if (t + k) % 2 else "no"
    big = " big" * (k % 3)  # vary the word count
    if t == 0:
        return dict(q=f"Is the{big} {o1} {c1}?", a=yes_no, d="verifyAttr", s="verify", sem="attr", g=None,
                    p=_program(f"select: {o1} (1{k})", f"verify color: {c1}"), valid=["yes", "no"],
                    plausible=["yes", "no"])
    if t == 1:
        return dict(q=f"What color is the{big} {o1}?", a=c1, d="queryAttr", s="query", sem="attr", g="color",
                    p=_program(f"select: {o1} (2{k})", "query: color"), valid=COLORS,
                    plausible=[c1, c2, "white"])
    if t == 2:
        exist_arg = "existing wall (9)" if k % 3 == 0 else f"cup (3{k})"  # "exist" in the argument: no step
        return dict(q=f"What kind of furniture is to the left of the{big} cup?", a=["table", "chair"][k % 2],
                    d="relS", s="query", sem="rel", g="furniture",
                    p=_program(f"select: {exist_arg}", "relate: furniture,to the left of,s (4)", "query: name"),
                    valid=["table", "chair", "shelf", "bed"], plausible=["table", "chair", "shelf"])
    if t == 3:
        return dict(q="Which place is it?" if k % 2 else "Where was this picture taken?",
                    a=["kitchen", "street", "kitchen", "beach"][k % 4], d="placeQuery", s="query", sem="global",
                    g="place", p=_program("select: scene", "query: place"),
                    valid=["kitchen", "street", "beach", "park"], plausible=["kitchen", "street", "beach"])
    if t == 4:
        return dict(q=f"Is the{big} {o1} {c1} or {c2}?", a=c1 if k % 2 else c2, d="chooseAttr", s="choose",
                    sem="attr", g=None if k % 2 else "color",
                    p=_program(f"select: {o1} (5{k})", f"choose color: {c1}|{c2}"), valid=COLORS,
                    plausible=[c1, c2])
    if t == 5:
        return dict(q=f"Are there both {o1}s and {o2}s in the picture?", a=yes_no,
                    d="existAnd" if k % 2 else "existOr", s="logical", sem="obj", g=None,
                    p=_program(f"select: {o1} (6{k})", "exist: ?", f"select: {o2} (7{k})", "exist: ?", "and: "),
                    valid=["yes", "no"], plausible=["yes", "no"])
    if t == 6:
        # the choices file says only "color" is valid; openvqa's "Common" rule overrides it
        return dict(q=f"What do the {o1} and the {o2} have in common?", a=["color", "material", "color"][k % 3],
                    d="twoCommon", s="compare", sem="attr", g="common",
                    p=_program(f"select: {o1} (8{k})", f"select: {o2} (9{k})", "common: "),
                    valid=["color"], plausible=["color"])
    if t == 7:
        return dict(q=f"Are the{big} {o1} and the {o2} the same color?", a=yes_no, d="twoSame", s="compare",
                    sem="attr", g=None, p=_program(f"select: {o1} (1{k})", f"select: {o2} (2{k})", "same color: "),
                    valid=["yes", "no"], plausible=["yes", "no"])
    if t == 8:
        return dict(q=f"Is that a {o1} or a {o2}?", a=o1 if k % 2 else o2, d="chooseObject", s="choose",
                    sem="cat", g="object", p=_program("select: this (3)", f"choose name: {o1}|{o2}"),
                    valid=OBJECTS, plausible=[o1, o2])
    if t == 9:
        return dict(q=f"Is the{big} {o1} to the left or to the right of the {o2}?",
                    a="left" if k % 2 else "right", d="chooseRel", s="choose", sem="rel", g="position",
                    p=_program(f"select: {o1} (4{k})", f"choose rel: {o2},to the left of|to the right of,s (5)"),
                    valid=["left", "right"], plausible=["left", "right"])
    return dict(q=f"Who is wearing the{big} {c1} shirt?", a=["man", "woman", "man"][k % 3], d="relS",
                s="query", sem="rel", g="person",
                p=_program(f"select: shirt (6{k})", f"filter color: {c1}", *["filter size: big"] * (k % 4),
                           "relate: person,wearing,s (7)", "query: name"),
                valid=["man", "woman", "boy", "girl"], plausible=["man", "woman", "boy"])


def _wrong(spec: dict, kind: str) -> str:
    """A prediction of the given kind for a question spec."""
    gold, valid, plausible = spec["a"], spec["valid"], spec["plausible"]
    if kind == "right":
        return gold
    if kind == "case":
        return gold.capitalize()  # exact match only: "Yes" is wrong
    if kind == "plausible":
        return next((a for a in plausible if a != gold), "purple")
    if kind == "valid":
        return next((a for a in valid if a != gold and a not in plausible), "shape" if spec["d"] == "twoCommon"
                    else next(a for a in valid if a != gold))
    return "purple" if gold != "purple" else "orange"  # in no list


def build_gqa() -> tuple[dict, dict, list[tuple[str, str]]]:
    """Synthetic GQA questions, choices, and (questionId, prediction) pairs in question order."""
    questions, choices, pairs = {}, {}, []
    n = 0
    for t in range(11):
        for k in range(7):
            spec = _gqa_template(t, k)
            qid = f"{2096 + t:04d}{k:04d}"
            balanced = not (k == 6 and t % 2 == 0) and not (t == 3 and k == 5)
            questions[qid] = {
                "semantic": spec["p"], "entailed": [], "equivalent": [qid], "question": spec["q"],
                "imageId": f"n{10000 + (n // 4)}", "isBalanced": balanced,
                "groups": {"global": spec["g"], "local": f"{t}-{spec['d']}"},
                "answer": spec["a"], "semanticStr": " ".join(f"{s['operation']} {s['argument']}" for s in spec["p"]),
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": spec["d"], "semantic": spec["sem"], "structural": spec["s"]},
                "fullAnswer": f"The answer is {spec['a']}.",
            }
            choices[qid] = {"valid": spec["valid"], "plausible": spec["plausible"]}
            kind = KINDS[(k + t) % len(KINDS)]
            if spec["g"] is not None and k == 4:
                kind = "invalid"  # a predicted answer that is no gold answer of its group
            pairs.append((qid, _wrong(spec, kind)))
            n += 1
    ids = list(questions)
    for i, qid in enumerate(ids):  # entailed questions: none, others (balanced or not), itself
        if i % 4 == 1:
            questions[qid]["entailed"] = [ids[(i + 7) % len(ids)], ids[(i + 13) % len(ids)]]
        elif i % 4 == 2:
            questions[qid]["entailed"] = [qid, ids[(i + 3) % len(ids)], ids[(i + 6) % len(ids)],
                                          ids[(i + 28) % len(ids)]]
        elif i % 4 == 3:
            questions[qid]["entailed"] = [qid]
    return questions, choices, pairs


CLEVR_FUNCTIONS = ["count", "exist", "greater_than", "less_than", "equal_integer", "query_color",
                   "query_material", "query_shape", "query_size", "equal_color", "equal_material",
                   "equal_shape", "equal_size"]


def build_clevr() -> tuple[list[dict], list[str]]:
    """Synthetic CLEVR questions (v1.0 layout) and predictions, right and wrong for every last function."""
    values = {"query_color": ["red", "blue", "cyan"], "query_material": ["rubber", "metal"],
              "query_shape": ["cube", "sphere", "cylinder"], "query_size": ["large", "small"],
              "count": ["0", "1", "3", "10"]}
    questions, predictions = [], []
    for t, function in enumerate(CLEVR_FUNCTIONS):
        for k in range(3 + t % 4):
            choices = values.get(function, ["yes", "no"])
            answer = choices[k % len(choices)]
            wrong = choices[(k + 1) % len(choices)]
            program = [{"inputs": [], "function": "scene", "value_inputs": []},
                       {"inputs": [0], "function": "filter_color", "value_inputs": ["red"]}]
            if function in ("greater_than", "less_than", "equal_integer"):
                program += [{"inputs": [1], "function": "count", "value_inputs": []},
                            {"inputs": [], "function": "scene", "value_inputs": []},
                            {"inputs": [3], "function": "count", "value_inputs": []}]
            elif function.startswith("equal_"):
                program += [{"inputs": [1], "function": "unique", "value_inputs": []},
                            {"inputs": [2], "function": "query_" + function[6:], "value_inputs": []}]
            program.append({"inputs": [len(program) - 1], "function": function, "value_inputs": []})
            index = len(questions)
            questions.append({"image_index": index // 3, "program": program, "question_index": index,
                              "image_filename": f"CLEVR_val_{index // 3:06d}.png", "question_family_index": t,
                              "split": "val", "answer": answer,
                              "question": f"Question {index} about the {function.replace('_', ' ')}?"})
            predictions.append(answer if (k + t) % 3 != 1 else (wrong if k % 2 else "yes" if answer != "yes"
                                                                  else "2"))
    return questions, predictions


def _plain(value: Any) -> Any:
    """numpy scalars / tuples / int-keyed tables -> JSON-ready values."""
    if isinstance(value, dict):
        if any(not isinstance(key, str) for key in value) or any(isinstance(v, tuple) for v in value.values()):
            return [[key, *_plain(v)] if isinstance(v, (tuple, list)) else [key, _plain(v)]
                    for key, v in value.items()]
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def run_gqa(tree: Path, questions: dict, choices: dict, pairs: list) -> dict:
    """Run openvqa's GQA result_eval / GQAEval on the inputs; write them; return the reference cases."""
    sys.path.insert(0, str(tree))
    result_eval = importlib.import_module("openvqa.datasets.gqa.eval.result_eval")
    gqa_eval = importlib.import_module("openvqa.datasets.gqa.eval.gqa_eval")
    recorded = []

    class RecordingGQAEval(gqa_eval.GQAEval):
        """GQAEval unchanged; the instance is kept to read its unrounded scores."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            recorded.append(self)

    result_eval.GQAEval = RecordingGQAEval
    vocabulary = sorted({a for _, a in pairs} | {q["answer"] for q in questions.values()})
    dataset = SimpleNamespace(qid_list=[qid for qid, _ in pairs], ans_size=len(vocabulary),
                              ix_to_ans={str(i): a for i, a in enumerate(vocabulary)})
    ans_ix_list = [vocabulary.index(a) for _, a in pairs]
    (OUT / "gqa_questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    (OUT / "gqa_choices.json").write_text(json.dumps(choices, indent=1) + "\n")
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, raw in (("with_choices", {"val": str(OUT / "gqa_questions.json"),
                                            "val_choices": str(OUT / "gqa_choices.json")}),
                          ("no_choices", {"val": str(OUT / "gqa_questions.json")})):
            cfg = SimpleNamespace(RAW_PATH={"gqa": raw}, DATASET="gqa", SPLIT={"val": "val"}, TEST_SAVE_PRED=False)
            log = Path(tmp) / f"{case}.log"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result_eval.eval(cfg, dataset, ans_ix_list, None, f"{tmp}/result_{case}", None, str(log), valid=True)
            cases[case] = {"scores": _plain(recorded.pop().scores),
                           "log_lines": [line for line in log.read_text().splitlines() if line]}
            if case == "with_choices":
                (OUT / "gqa_predictions.json").write_bytes(Path(f"{tmp}/result_{case}.json").read_bytes())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            evaluator = gqa_eval.GQAEval(None, str(OUT / "gqa_predictions.json"), str(OUT / "gqa_questions.json"),
                                         str(OUT / "gqa_choices.json"), EVAL_CONSISTENCY=True)
        result, detail = evaluator.get_str_result()
        cases["consistency"] = {"scores": _plain(evaluator.scores), "log_lines": result + detail}
    return cases


def run_clevr(tree: Path, questions: list, predictions: list) -> dict:
    """Run openvqa's CLEVR result_eval on the inputs; write them; return its figures."""
    sys.path.insert(0, str(tree))
    result_eval = importlib.import_module("openvqa.datasets.clevr.eval.result_eval")
    (OUT / "clevr_questions.json").write_text(json.dumps({"info": {"split": "val", "version": "1.0"},
                                                          "questions": questions}, indent=1) + "\n")
    vocabulary = sorted(set(predictions) | {q["answer"] for q in questions})
    dataset = SimpleNamespace(data_size=len(questions), ans_size=len(vocabulary), ix_to_ans=dict(enumerate(vocabulary)))
    cfg = SimpleNamespace(RAW_PATH={"clevr": {"val": str(OUT / "clevr_questions.json")}}, DATASET="clevr",
                          SPLIT={"val": "val"}, TEST_SAVE_PRED=False)
    seen: dict = {}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is result_eval.eval.__code__:
            seen.update(q_dict=_plain(frame.f_locals["q_dict"]), score_dict=_plain(frame.f_locals["score_dict"]))

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "clevr.log"
        sys.setprofile(profile)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result_eval.eval(cfg, dataset, [vocabulary.index(p) for p in predictions], None,
                                 f"{tmp}/result", None, str(log), valid=True)
        finally:
            sys.setprofile(None)
        (OUT / "clevr_predictions.txt").write_bytes(Path(f"{tmp}/result.txt").read_bytes())
        return {**seen, "log_lines": [line for line in log.read_text().splitlines() if line]}


def main() -> None:
    """Build the inputs, run openvqa on them, write tests/data/openvqa_eval/."""
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "openvqa" / "datasets").is_dir():
        sys.exit("usage: make_openvqa_eval_reference.py OPENVQA_TREE  (a checkout of MILVLG/openvqa)")
    tree = Path(sys.argv[1]).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"generator": "tests/make_openvqa_eval_reference.py", "openvqa_commit": OPENVQA_COMMIT}
    questions, choices, pairs = build_gqa()
    gqa = run_gqa(tree, questions, choices, pairs)
    (OUT / "gqa_reference.json").write_text(json.dumps({"meta": meta, "cases": gqa}, indent=1) + "\n")
    clevr = run_clevr(tree, *build_clevr())
    (OUT / "clevr_reference.json").write_text(json.dumps({"meta": meta, **clevr}, indent=1) + "\n")


if __name__ == "__main__":
    main()
