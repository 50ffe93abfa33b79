"""The official VQA accuracy metric, reimplemented.

Reference: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
at commit a013f0043c1e2cdc995922dfe257f7149aa9af06 ("Fixed processing answers
bug", 2021), i.e. the current official version.  What that code does for one
question, and what this module reproduces step by step:

1. Every ground-truth (gt) answer and the predicted answer: ``\\n`` and ``\\t``
   become spaces, then surrounding whitespace is stripped.  Always.
2. Only if the stripped gt answers are NOT all identical (``len(set(gts)) > 1``)
   are the gt answers AND the predicted answer passed through punctuation
   processing and digit/article processing (see :func:`normalize_answer`).
   When all annotators agree, neither side is normalised any further: "Yes"
   or "yes." scores 0 against ten "yes".
3. For each of the n gt answers, the others (n - 1) are compared by exact
   string equality with the prediction, and that subset scores
   ``min(1, matches / 3)``; the question's accuracy is the mean of those n
   values.  (The official code removes the left-out answer with
   ``item != gtAnsDatum`` on annotation dicts that carry a unique
   ``answer_id``, so exactly one answer is left out each time; we do the same
   by position.)
4. Overall / per-answer-type / per-question-type accuracies are
   ``100 * sum(acc) / count`` over the questions, summed in question order.
   The official code then rounds these (and the per-question values it
   stores) to 2 decimals; we return unrounded floats.  Its aggregates are
   computed from the unrounded per-question accuracies, as ours are.

Faithfully kept quirks of the official code:

* the punctuation rule tests the *input* text: a punctuation mark is deleted
  if it touches a space anywhere in the text, or if the text contains a comma
  between two digits (then every listed mark is deleted); otherwise it
  becomes a space;
* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` contains a typo (``(?!<=`` is a
  lookahead, not a lookbehind), so it deletes every period not *followed* by
  a digit (``"3."`` -> ``"3"``, ``"a.5"`` stays); and it is called as
  ``sub("", text, re.UNICODE)``, which passes ``re.UNICODE == 32`` as the
  *count*, so at most the first 32 such periods are deleted;
* the original ran under Python 2 with byte-string patterns compiled without
  ``re.UNICODE``, so ``\\d`` there means ASCII ``[0-9]`` only; we use
  ``[0-9]`` (a Python 3 port would also match e.g. Arabic-Indic digits);
* ``"none"`` maps to ``"0"``; articles are dropped after number mapping;
  contractions are looked up after lowercasing, so the original table's
  capitalised keys ("Im", "Ive", "Id've", "I'dve") can never fire and are
  omitted here, as are its identity entries ("let's", "she's"); the entry
  ``"somebody'd" -> "somebodyd"`` (apostrophe removed) is kept as is.

Differences in MILVLG/mcan-vqa's copy (``utils/vqaEval.py``), which is the
older official version (GT-Vision-Lab/VQA commit a4f1afd, "updated for v2.0")
with Python 3 print calls:

* the predicted answer is ALWAYS normalised (punctuation + digits/articles),
  even when all annotators agree;
* the gt answers, when annotators disagree, get only punctuation processing
  (no lowercasing, number mapping, article removal or contractions);
* the gt answers are never whitespace-cleaned (no ``\\n``/``\\t`` replacement,
  no strip), and the agreement test uses the raw strings;
* ``commaStrip`` is written ``(\\d)(,)(\\d)`` instead of ``(\\d)(\\,)(\\d)``
  (same regex); and under Python 3 its ``\\d`` matches any Unicode digit.

So mcan-vqa's numbers can differ from the official ones (e.g. prediction
"Yes" against ten "yes" scores 1 there and 0 here; prediction "two" against
gts with "two"/"2" matches only the "2"s there).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Sequence

__all__ = ["normalize_answer", "vqa_accuracy", "evaluate"]

# ---------------------------------------------------------------------------
# Tables (same content as the official ``manualMap``, ``articles``, ``punct``
# and ``contractions``; the contraction table is rebuilt from its patterns).
# ---------------------------------------------------------------------------

_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Punctuation marks handled by the punctuation rule, in the official order.
# Note that "." (period rule), "'", ":", "*", "#", "$", "%", "&", "^", "|"
# and "~" are not in the list and are kept.
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# (mark, mark followed by a space, mark preceded by a space)
_PUNCT_SPACED: tuple[tuple[str, str, str], ...] = tuple((p, p + " ", " " + p) for p in _PUNCT)


def _build_contractions() -> dict[str, str]:
    """Build the official contraction table (lowercase keys only)."""
    table: dict[str, str] = {}
    # Forms whose key is the form with every apostrophe removed.
    full_forms = (
        "'twas ain't aren't can't could've couldn't didn't doesn't don't "
        "hadn't hasn't haven't he'd he's how'd how'll how's isn't it'd it'll "
        "ma'am might've mightn't must've mustn't needn't not've o'clock "
        "oughtn't shan't should've shouldn't somebody'll somebody's someone'd "
        "someone'll someone's something'd something'll that's there'd "
        "there're there's they'd they'll they're they've wasn't we've "
        "weren't what'll what're what's what've when's where'd where's "
        "where've who'd who'll who's who've why'll why're why's won't "
        "would've wouldn't y'all you'd you'll you're you've"
    ).split()
    for form in full_forms:
        table[form.replace("'", "")] = form
    # X'd've, written "Xd've" or "X'dve".
    for stem in ("he", "it", "she", "somebody", "someone", "something", "there",
                 "they", "we", "who", "you"):
        table[stem + "d've"] = stem + "'d've"
        table[stem + "'dve"] = stem + "'d've"
    # Xn't've, written "Xnt've" or "Xn'tve".
    for stem in ("could", "had", "might", "should", "would"):
        table[stem + "nt've"] = stem + "n't've"
        table[stem + "n'tve"] = stem + "n't've"
    # Irregular entries, verbatim (including the official "somebodyd" quirk).
    for key in ("yall'd've", "y'alld've", "y'all'dve"):
        table[key] = "y'all'd've"
    for key in ("yall'll", "y'allll"):
        table[key] = "y'all'll"
    for key in ("ow's'at", "'ows'at", "'ow'sat"):
        table[key] = "'ow's'at"
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS: dict[str, str] = _build_contractions()

# Precompiled patterns.  ASCII digits, as in the original Python 2 run.
_ANY_PUNCT_RE = re.compile("[" + re.escape("".join(_PUNCT)) + "]")
_COMMA_BETWEEN_DIGITS_RE = re.compile(r"[0-9],[0-9]")
# Equivalent to the official "(?!<=\d)(\.)(?!\d)": the first group is a
# (typo'd) lookahead that a "." can never fail, so only "not followed by a
# digit" remains.
_PERIOD_RE = re.compile(r"\.(?![0-9])")
# The official call sub("", text, re.UNICODE) passes 32 as the count.
_PERIOD_MAX_COUNT = int(re.UNICODE)  # == 32

_CACHE_SIZE = 1 << 17


# ---------------------------------------------------------------------------
# Processing steps
# ---------------------------------------------------------------------------


def _clean_whitespace(text: str) -> str:
    """Official first step: newline and tab to space, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``."""
    out = text
    if _ANY_PUNCT_RE.search(text) is not None:
        delete_all = _COMMA_BETWEEN_DIGITS_RE.search(text) is not None
        for mark, mark_space, space_mark in _PUNCT_SPACED:
            if mark not in text:
                continue  # replacing an absent mark is a no-op
            # The conditions look at the input text, not the partly processed one.
            if delete_all or mark_space in text or space_mark in text:
                out = out.replace(mark, "")
            else:
                out = out.replace(mark, " ")
    if "." in out:
        out = _PERIOD_RE.sub("", out, count=_PERIOD_MAX_COUNT)
    return out


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words, articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


@lru_cache(maxsize=_CACHE_SIZE)
def _normalize_cleaned(text: str) -> str:
    """Punctuation then digit/article processing of a whitespace-cleaned answer."""
    return _process_digit_article(_process_punctuation(text))


def normalize_answer(answer: str) -> str:
    """Apply the full official answer processing (whitespace, punctuation, digits, articles, contractions)."""
    return _normalize_cleaned(_clean_whitespace(answer))


# ---------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------


def vqa_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """Return one question's official VQA accuracy in [0, 1] for a raw prediction and raw gt answers."""
    n = len(gt_answers)
    if n == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    gts = [_clean_whitespace(g) for g in gt_answers]
    pred = _clean_whitespace(answer)
    distinct = set(gts)
    if len(distinct) > 1:
        # Annotators disagree: normalise both sides (each distinct gt once).
        normalized = {g: _normalize_cleaned(g) for g in distinct}
        gts = [normalized[g] for g in gts]
        pred = _normalize_cleaned(pred)
    matches = 0
    for g in gts:
        if g == pred:
            matches += 1
    # Leave-one-out: a matching gt leaves (matches - 1) matches among the
    # others, a non-matching one leaves all of them.  Accumulated in gt order
    # like the official sum over its list.
    total = 0.0
    for g in gts:
        others = matches - 1 if g == pred else matches
        total += min(1.0, others / 3)
    return total / n


def evaluate(predictions: Mapping[int, str], questions: Mapping[int, Mapping]) -> dict:
    """Return official overall / per-answer-type / per-question-type accuracies in percent (unrounded) and the count."""
    missing = [qid for qid in questions if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(questions)} questions have no prediction "
            f"(e.g. question id {missing[0]!r})"
        )
    if not questions:
        raise ValueError("evaluate needs at least one question")
    # Predictions for ids not in `questions` are ignored.
    total = 0.0
    ans_sum: dict[str, float] = {}
    ans_count: dict[str, int] = {}
    ques_sum: dict[str, float] = {}
    ques_count: dict[str, int] = {}
    for qid, question in questions.items():
        acc = vqa_accuracy(predictions[qid], question["answers"])
        total += acc
        a_type = question["answer_type"]
        q_type = question["question_type"]
        ans_sum[a_type] = ans_sum.get(a_type, 0.0) + acc
        ans_count[a_type] = ans_count.get(a_type, 0) + 1
        ques_sum[q_type] = ques_sum.get(q_type, 0.0) + acc
        ques_count[q_type] = ques_count.get(q_type, 0) + 1
    n = len(questions)
    return {
        "accuracy": 100 * total / n,
        "per_answer_type": {t: 100 * s / ans_count[t] for t, s in ans_sum.items()},
        "per_question_type": {t: 100 * s / ques_count[t] for t, s in ques_sum.items()},
        "n": n,
    }
