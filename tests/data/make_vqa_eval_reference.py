"""Regenerate tests/data/vqa_eval_reference.json by running the ORIGINAL VQA evaluation code.

Not run by the tests.  Usage (Python 3.8+, git on PATH):

    python3 tests/data/make_vqa_eval_reference.py [--vqa-repo PATH] [--python2 python2.7]

What it does:

* takes ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` from GT-Vision-Lab/VQA
  at commit a013f0043c1e2cdc995922dfe257f7149aa9af06 (from ``--vqa-repo``, a git
  clone of https://github.com/GT-Vision-Lab/VQA, or a fresh clone when omitted)
  and copies it into a temporary directory outside the project;
* runs it UNMODIFIED under Python 2.7 (the interpreter it was written for), on
  the cases listed below, through a tiny driver: the driver replaces the
  ``VQA`` helper objects (``vqa.py`` is not used) by stubs that only offer what
  ``VQAEval.evaluate`` reads (``.qa`` and ``getQuesIds()``), builds the gt
  annotations like the real annotation files (dicts with ``answer``,
  ``answer_confidence`` and a unique ``answer_id`` 1..n, which the original's
  leave-one-out ``item != gtAnsDatum`` relies on), and subclasses ``VQAEval``
  only to record the unrounded values passed to ``setEvalQA`` and
  ``setAccuracy`` before delegating to the original methods.  It also records
  ``processDigitArticle(processPunctuation(s))`` (after the same
  newline/tab/strip cleaning the original applies) for a list of strings;
* as a cross-check, also runs a Python 3 copy in which the only change is the
  minimum needed to import it: the two ``print "..."`` statements become
  ``print("...")`` calls.  Cases on which the Python 3 run differs are listed
  in ``meta.py3_differs`` (expected: only the non-ASCII digit case, because
  Python 3's ``\\d`` matches Unicode digits while Python 2's byte-string
  pattern does not).  If no Python 2 is found, the Python 3 run becomes the
  reference (stated in ``meta.reference_interpreter``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VQA_URL = "https://github.com/GT-Vision-Lab/VQA"
VQA_COMMIT = "a013f0043c1e2cdc995922dfe257f7149aa9af06"
EVAL_PATH = "PythonEvaluationTools/vqaEvaluation/vqaEval.py"
OUT_DEFAULT = Path(__file__).resolve().parent / "vqa_eval_reference.json"

# Driver, valid Python 2.7 and Python 3.  argv: eval_dir cases.json out.json
DRIVER = r'''
from __future__ import print_function
import json
import sys

sys.path.insert(0, sys.argv[1])
from vqaEval import VQAEval


class StubVQA(object):
    def __init__(self, qa, ids):
        self.qa = qa
        self._ids = ids

    def getQuesIds(self):
        return list(self._ids)


class RecordingVQAEval(VQAEval):
    def __init__(self, vqa, vqaRes, n=2):
        VQAEval.__init__(self, vqa, vqaRes, n)
        self.raw_acc = {}
        self.raw_accuracy = {}

    def setEvalQA(self, quesId, acc):
        self.raw_acc[quesId] = acc
        VQAEval.setEvalQA(self, quesId, acc)

    def setAccuracy(self, accQA, accQuesType, accAnsType):
        mean = lambda xs: 100 * float(sum(xs)) / len(xs)
        self.raw_accuracy = {
            "overall": mean(accQA),
            "perQuestionType": dict((k, mean(v)) for k, v in accQuesType.items()),
            "perAnswerType": dict((k, mean(v)) for k, v in accAnsType.items()),
        }
        VQAEval.setAccuracy(self, accQA, accQuesType, accAnsType)


def main():
    with open(sys.argv[2]) as f:
        data = json.load(f)
    ids, gts, res = [], {}, {}
    for case in data["cases"]:
        qid = case["question_id"]
        ids.append(qid)
        gts[qid] = {
            "question_id": qid,
            "image_id": 0,
            "question_type": case["question_type"],
            "answer_type": case["answer_type"],
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(case["answers"])
            ],
        }
        res[qid] = {"question_id": qid, "answer": case["prediction"]}
    ev = RecordingVQAEval(StubVQA(gts, ids), StubVQA(res, ids), n=2)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # progress bar and messages
    try:
        ev.evaluate()
    finally:
        sys.stdout = real_stdout
    normalized = []
    for s in data["normalize"]:
        t = s.replace("\n", " ").replace("\t", " ").strip()
        normalized.append(ev.processDigitArticle(ev.processPunctuation(t)))
    out = {
        "interpreter": sys.version.split()[0],
        "per_question": [ev.raw_acc[q] for q in ids],
        "per_question_rounded": [ev.evalQA[q] for q in ids],
        "accuracy": ev.raw_accuracy,
        "accuracy_rounded": ev.accuracy,
        "normalize": normalized,
    }
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)


main()
'''


def rep(answer: str, k: int) -> list[str]:
    return [answer] * k


def hand_cases() -> list[tuple[str, list[str], str, str]]:
    """(prediction, gt answers, answer_type, question_type)."""
    yn, num, oth = "yes/no", "number", "other"
    cases: list[tuple[str, list[str], str, str]] = [
        # --- all annotators agree: only whitespace cleaning on both sides
        ("yes", rep("yes", 10), yn, "is the"),
        ("Yes", rep("yes", 10), yn, "is the"),
        ("yes.", rep("yes", 10), yn, "is the"),
        (" yes\n", rep("yes", 10), yn, "is the"),
        ("yes\u00a0", rep("yes", 10), yn, "is the"),
        ("no", rep("yes", 10), yn, "is the"),
        ("two", rep("2", 10), num, "how many"),
        ("2", rep("two", 10), num, "how many"),
        ("two", rep("two", 10), num, "how many"),
        ("2", rep("2", 9) + ["2 "], num, "how many"),
        ("yes", rep("yes", 9) + ["yes\t"], yn, "is the"),
        ("a dog", rep("dog", 10), oth, "what animal is"),
    ]
    # --- 0..10 matching yes/no answers
    for k in range(11):
        cases.append(("yes", rep("yes", k) + rep("no", 10 - k), yn, "is this"))
    cases += [
        # --- numbers
        ("two", rep("2", 3) + rep("3", 7), num, "how many"),
        ("2", rep("two", 4) + rep("2", 2) + rep("3", 4), num, "how many"),
        ("Two dogs", rep("2 dogs", 2) + rep("2", 8), num, "how many"),
        ("none", rep("0", 5) + rep("none", 2) + rep("1", 3), num, "how many"),
        ("zero", ["0", "none", "zero", "nothing", "0", "1", "2", "no", "0", "none"], num, "how many"),
        ("ten", rep("10", 3) + rep("11", 7), num, "how many"),
        ("eleven", rep("11", 3) + rep("eleven", 3) + rep("12", 4), num, "how many"),
        ("ONE", rep("1", 2) + rep("one", 1) + rep("2", 7), num, "how many"),
        ("one.", rep("1", 4) + rep("2", 6), num, "how many"),
        ("1.0", rep("1", 5) + rep("1.0", 1) + rep("2", 4), num, "how many"),
        ("2 people", rep("two people", 3) + rep("2", 7), num, "how many people are"),
        ("none of the above", ["0 of above"] + rep("none", 9), oth, "what"),
        # --- articles
        ("a dog", rep("dog", 3) + rep("puppy", 7), oth, "what animal is"),
        ("the dog", rep("a dog", 2) + rep("dog", 1) + rep("cat", 7), oth, "what animal is"),
        ("an apple", rep("apple", 2) + rep("the apple", 2) + rep("banana", 6), oth, "what is the"),
        ("dog", rep("The Dog", 4) + rep("cat", 6), oth, "what animal is"),
        ("A", ["a"] + rep("the", 2) + rep("b", 7), oth, "what"),
        ("", ["", "", "an", "yes", "no", "no", "no", "no", "no", "no"], yn, "is the"),
        # --- contractions
        ("dont know", rep("don't know", 3) + rep("no", 7), oth, "what"),
        ("I dont know", rep("i don't know", 2) + rep("unknown", 8), oth, "what"),
        ("its", rep("it's", 5) + rep("it is", 5), oth, "what"),
        ("oclock", rep("o'clock", 2) + rep("noon", 8), oth, "what time"),
        ("cant tell", rep("can't tell", 4) + rep("yes", 6), yn, "is the"),
        ("Im not sure", rep("i'm not sure", 3) + rep("im not sure", 1) + rep("no", 6), oth, "what"),
        ("twas", rep("'twas", 1) + rep("twas", 1) + rep("was", 8), oth, "what"),
        ("somebody'd", rep("somebodyd", 3) + rep("someone", 7), oth, "who"),
        ("youd've", rep("you'd've", 2) + rep("you'dve", 1) + rep("no", 7), oth, "what"),
        ("whats", rep("what's", 3) + rep("what", 7), oth, "what"),
        # --- punctuation
        ("yes!", rep("yes", 5) + rep("no", 5), yn, "is the"),
        ("t-shirt", rep("t shirt", 2) + rep("tshirt", 2) + rep("shirt", 6), oth, "what is the man wearing"),
        ("t - shirt", rep("t shirt", 3) + rep("t-shirt", 3) + rep("shirt", 4), oth, "what is the man wearing"),
        ("red/white", rep("red white", 1) + rep("red and white", 9), oth, "what color is the"),
        ("red / white", rep("red white", 2) + rep("red/white", 2) + rep("red", 6), oth, "what color is the"),
        ("(yes)", rep("yes", 3) + rep("no", 7), yn, "is the"),
        ("yes, it is", rep("yes it is", 1) + rep("yes", 9), yn, "is the"),
        ("x;y", rep("x y", 2) + rep("xy", 8), oth, "what"),
        ("x; y", rep("x y", 2) + rep("x;y", 2) + rep("xy", 6), oth, "what"),
        ("back\\slash", rep("back slash", 3) + rep("backslash", 7), oth, "what"),
        ("#1", rep("#1", 2) + rep("1", 8), num, "what number is"),
        ("$5", rep("$5", 3) + rep("5", 7), num, "how much"),
        ("10:30", rep("10:30", 4) + rep("1030", 6), oth, "what time"),
        ("hot\tdog", rep("hot dog", 3) + rep("hotdog", 7), oth, "what is the"),
        ("black  and   white", rep("black and white", 4) + rep("black", 6), oth, "what color is the"),
        ("RED", rep("red", 2) + rep("Red", 2) + rep("blue", 6), oth, "what color is the"),
        ("black, white", rep("black white", 2) + rep("black and white", 8), oth, "what color is the"),
        ("dogs,cats", rep("dogs cats", 3) + rep("dogs", 7), oth, "what animals are"),
        # --- commas between digits
        ("1,000", rep("1000", 3) + rep("1 000", 2) + rep("thousand", 5), num, "how many"),
        ("1, 000", rep("1 000", 2) + rep("1000", 8), num, "how many"),
        ("3,4", rep("34", 2) + rep("3 4", 2) + rep("3", 6), num, "how many"),
        ("5,000,000", rep("5000000", 3) + rep("5 million", 7), num, "how many"),
        ("a/b 1,2", rep("ab 12", 2) + rep("a b 1 2", 2) + rep("no", 6), oth, "what"),
        ("1,000 (approx.)", rep("1000 approx", 3) + rep("1000", 7), num, "how many"),
        # --- periods
        ("3.5", rep("3.5", 2) + rep("3", 8), num, "what number is"),
        ("3.", rep("3", 3) + rep("3.5", 7), num, "what number is"),
        (".5", rep(".5", 3) + rep("5", 7), num, "what number is"),
        ("a.5", rep("a.5", 2) + rep("a5", 8), oth, "what"),
        ("mr. smith", rep("mr smith", 3) + rep("smith", 7), oth, "who is"),
        ("u.s.a.", rep("usa", 4) + rep("us", 6), oth, "what country"),
        ("1.5.2", rep("1.5.2", 2) + rep("152", 8), oth, "what"),
        ("...", rep("", 1) + rep("nothing", 9), oth, "what"),
        ("yes...", rep("yes", 3) + rep("no", 7), yn, "is the"),
        ("." * 33 + "yes", rep("." * 33 + "yes", 3) + rep("yes", 7), yn, "is the"),
        ("." * 40 + "yes", rep("." * 8 + "yes", 3) + rep("yes", 7), yn, "is the"),
        # --- non-ASCII
        ("café", rep("café", 3) + rep("cafe", 7), oth, "what is the"),
        ("\u0661,\u0662", rep("\u0661\u0662", 4) + ["\u0661 \u0662"] + rep("x", 5), num, "how many"),
        # --- other list lengths
        ("yes", ["yes", "no", "yes"], yn, "is the"),
        ("yes", ["yes"], yn, "is the"),
    ]
    return cases


def random_cases(n: int, seed: int = 1234) -> list[tuple[str, list[str], str, str]]:
    """Seeded mixtures of spelling variants of a few concepts."""
    groups = [
        (["2", "two", "Two", "2.", " 2 ", "2\n"], "number", "how many"),
        (["3", "three", "3.", "Three"], "number", "how many"),
        (["yes", "Yes", "yes.", "YES!", "yes\t"], "yes/no", "is the"),
        (["no", "No", "no.", "nope"], "yes/no", "is the"),
        (["t-shirt", "t shirt", "tshirt", "T-Shirt", "t - shirt"], "other", "what is the man wearing"),
        (["1,000", "1000", "1 000", "one thousand"], "number", "how many"),
        (["don't know", "dont know", "Don't Know.", "do not know"], "other", "what"),
        (["the dog", "dog", "a dog", "Dog", "dogs"], "other", "what animal is"),
        (["black and white", "black & white", "black/white", "black, white", "black white"], "other", "what color is the"),
        (["3.5", "3.50", "3 . 5", "3,5"], "number", "what number is"),
        (["none", "0", "zero", "nothing"], "number", "how many"),
        (["10:30", "10:30 am", "1030", "10 30"], "other", "what time"),
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picked = rng.sample(groups, rng.choice([1, 1, 2, 3]))
        pool = [v for g in picked for v in g[0]]
        weights = [rng.random() ** 2 for _ in pool]
        gts = rng.choices(pool, weights=weights, k=10)
        pred = rng.choice(pool + [rng.choice(gts)])
        out.append((pred, gts, picked[0][1], picked[0][2]))
    return out


def normalize_inputs(cases: list[tuple[str, list[str], str, str]]) -> list[str]:
    """Strings whose official normalisation is recorded."""
    from_cases = []
    for pred, gts, _, _ in cases:
        from_cases.append(pred)
        from_cases.extend(gts)
    extra = [
        "Hello, World!", "it's 5 o'clock", "a-b-c", "a - b", "[x]", "{y}", "<z>",
        "x=y+z", "me@home", "`q`", "what?", "why!?", "a_b", "n/a", "1,2,3",
        "1, 2, 3", "(1,000)", "e.g. this", "3.14", "pi is 3.14.", "..5", "5..",
        "The One", "an hour", "aint", "arent", "hed", "hes", "I'm", "Ive",
        "y'all'll", "yall'd've", "ow's'at", "'ows'at", "'ow'sat", "let's", "she's",
        "  spaced\n\tout  ", "MiXeD CaSe", "NONE", "None.", "ten.", "a the an",
    ]
    # every key and value of the official contraction table that we know of
    contraction_words = (
        "aint arent cant couldve couldnt couldn'tve couldnt've didnt doesnt dont "
        "hadnt hadnt've hadn'tve hasnt havent hed hed've he'dve hes howd howll "
        "hows Id've I'dve Im Ive isnt itd itd've it'dve itll let's maam mightnt "
        "mightnt've mightn'tve mightve mustnt mustve neednt notve oclock oughtnt "
        "ow's'at 'ows'at 'ow'sat shant shed've she'dve she's shouldve shouldnt "
        "shouldnt've shouldn'tve somebody'd somebodyd've somebody'dve somebodyll "
        "somebodys someoned someoned've someone'dve someonell someones somethingd "
        "somethingd've something'dve somethingll thats thered thered've there'dve "
        "therere theres theyd theyd've they'dve theyll theyre theyve twas wasnt "
        "wed've we'dve weve werent whatll whatre whats whatve whens whered wheres "
        "whereve whod whod've who'dve wholl whos whove whyll whyre whys wont "
        "wouldve wouldnt wouldnt've wouldn'tve yall yall'll y'allll yall'd've "
        "y'alld've y'all'dve youd youd've you'dve youll youre youve "
        "shed wed ill well its id yallll"
    ).split()
    seen: dict[str, None] = {}
    for s in from_cases + extra + contraction_words:
        seen.setdefault(s, None)
    return list(seen)


def get_eval_source(repo: Path | None, tmp: Path) -> str:
    if repo is None:
        repo = tmp / "VQA"
        subprocess.run(["git", "clone", "--quiet", VQA_URL, str(repo)], check=True)
    return subprocess.run(
        ["git", "--git-dir", str(_git_dir(repo)), "show", f"{VQA_COMMIT}:{EVAL_PATH}"],
        check=True, capture_output=True, text=True,
    ).stdout


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def run_original(python: str, eval_source: str, work: Path, cases_file: Path) -> dict:
    work.mkdir()
    (work / "vqaEval.py").write_text(eval_source, encoding="utf-8")
    (work / "driver.py").write_text(DRIVER, encoding="utf-8")
    out = work / "out.json"
    subprocess.run([python, str(work / "driver.py"), str(work), str(cases_file), str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vqa-repo", type=Path, default=None, help="git clone (or bare mirror) of GT-Vision-Lab/VQA")
    ap.add_argument("--python2", default="python2.7")
    ap.add_argument("--python3", default=sys.executable)
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    args = ap.parse_args()

    cases = hand_cases()
    cases += random_cases(40)
    case_dicts = [
        {"question_id": 1000 + i, "prediction": p, "answers": gts, "answer_type": at, "question_type": qt}
        for i, (p, gts, at, qt) in enumerate(cases)
    ]
    norm_inputs = normalize_inputs(cases)

    with tempfile.TemporaryDirectory(prefix="vqa_eval_ref_") as tmp_name:
        tmp = Path(tmp_name)
        source = get_eval_source(args.vqa_repo, tmp)
        cases_file = tmp / "cases.json"
        cases_file.write_text(json.dumps({"cases": case_dicts, "normalize": norm_inputs}), encoding="utf-8")

        # Python 3 copy: the only edit is print statement -> print call.
        py3_source, n_prints = re.subn(r'print "([^"\n]*)"', r'print("\1")', source)
        assert n_prints == 2, n_prints
        res3 = run_original(args.python3, py3_source, tmp / "py3", cases_file)
        res2 = None
        if shutil.which(args.python2):
            res2 = run_original(args.python2, source, tmp / "py2", cases_file)
    ref = res2 if res2 is not None else res3

    py3_differs = []
    if res2 is not None:
        py3_differs = [
            case_dicts[i]["question_id"]
            for i in range(len(case_dicts))
            if res2["per_question"][i] != res3["per_question"][i]
        ]
        py3_differs_norm = [s for s, a, b in zip(norm_inputs, res2["normalize"], res3["normalize"]) if a != b]
    else:
        py3_differs_norm = []

    for c, acc, acc_r in zip(case_dicts, ref["per_question"], ref["per_question_rounded"]):
        c["accuracy"] = acc  # unrounded, in [0, 1]
        c["accuracy_percent_rounded"] = acc_r  # what the official evalQA stores
    payload = {
        "meta": {
            "source": f"{VQA_URL} {EVAL_PATH} @ {VQA_COMMIT}",
            "generator": "tests/data/make_vqa_eval_reference.py",
            "reference_interpreter": "python " + ref["interpreter"],
            "unmodified": res2 is not None,
            "py3_cross_check_interpreter": "python " + res3["interpreter"],
            "py3_differs": py3_differs,
            "py3_differs_normalize": py3_differs_norm,
        },
        "cases": case_dicts,
        "overall": {
            "accuracy": ref["accuracy"]["overall"],
            "per_answer_type": ref["accuracy"]["perAnswerType"],
            "per_question_type": ref["accuracy"]["perQuestionType"],
            "rounded": ref["accuracy_rounded"],
        },
        "normalize": dict(zip(norm_inputs, ref["normalize"])),
    }
    args.out.write_text(compact_json(payload), encoding="utf-8")


def compact_json(payload: dict) -> str:
    """JSON with one case / one normalisation entry per line."""
    parts = [
        '"meta": ' + json.dumps(payload["meta"], indent=1),
        '"cases": [\n' + ",\n".join(json.dumps(c) for c in payload["cases"]) + "\n]",
        '"overall": ' + json.dumps(payload["overall"], indent=1),
        '"normalize": {\n'
        + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in payload["normalize"].items())
        + "\n}",
    ]
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    main()
