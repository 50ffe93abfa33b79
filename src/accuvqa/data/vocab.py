"""Question tokens and answers, processed exactly as mcan-vqa does, and a run's two dictionaries."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from accuvqa.config import Config
from accuvqa.data.records import QuestionRecord, load_split, question_file
from accuvqa.errors import DataError
from accuvqa.metrics import normalize_answer

PAD, UNK = 0, 1
_DROP = re.compile(r"[.,'!?\"()*#:;]")


def tokenize(question: str) -> list[str]:
    """Lower-case, drop `.,'!?"()*#:;`, turn '-' and '/' into spaces, split on white space."""
    return _DROP.sub("", question.lower()).replace("-", " ").replace("/", " ").split()


def build_token_dict(questions: Iterable[str]) -> dict[str, int]:
    """Token ids in first-seen order after PAD=0 and UNK=1."""
    token_to_ix = {"PAD": PAD, "UNK": UNK}
    for question in questions:
        for word in tokenize(question):
            if word not in token_to_ix:
                token_to_ix[word] = len(token_to_ix)
    return token_to_ix


def encode_question(question: str, token_to_ix: dict[str, int], max_token: int) -> np.ndarray:
    """Token ids of one question, zero-padded or cut to `max_token`."""
    return encode_tokens(tokenize(question), token_to_ix, max_token)


def encode_tokens(words: Sequence[str], token_to_ix: dict[str, int], max_token: int) -> np.ndarray:
    """Token ids of a tokenized question, zero-padded or cut to `max_token`."""
    ids = np.zeros(max_token, dtype=np.int64)
    for i, word in enumerate(words[:max_token]):
        ids[i] = token_to_ix.get(word, UNK)
    return ids


def prep_answer(answer: str) -> str:
    """mcan-vqa's answer processing: the official normalisation, then any comma dropped."""
    return normalize_answer(answer).replace(",", "")


def build_answer_dict(most_common_answers: Iterable[str], min_count: int = 8) -> tuple[dict[str, int], dict[str, str]]:
    """mcan-vqa's `[ans_to_ix, ix_to_ans]` from each training question's most common answer.

    Answers are normalised as the official evaluation does, counted, and kept when seen more than
    `min_count` times (ANSWER_MIN_COUNT; mcan-vqa: 8), in first-seen order.
    """
    counts = Counter(prep_answer(a) for a in most_common_answers)
    kept = [a for a in counts if counts[a] > min_count]
    ans_to_ix = {a: i for i, a in enumerate(kept)}
    ix_to_ans = {str(i): a for a, i in ans_to_ix.items()}
    return ans_to_ix, ix_to_ans


def save_answer_dict(path: str | Path, ans_to_ix: dict[str, int], ix_to_ans: dict[str, str]) -> None:
    """Write `[ans_to_ix, ix_to_ans]` as mcan-vqa's answer_dict.json."""
    Path(path).write_text(json.dumps([ans_to_ix, ix_to_ans]))


def load_answer_dict(path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """Read mcan-vqa's answer_dict.json (`[ans_to_ix, ix_to_ans]`)."""
    try:
        ans_to_ix, ix_to_ans = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"cannot read answer dictionary {path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise DataError(
            f"{path} is not an answer dictionary: expected JSON [ans_to_ix, ix_to_ans]"
        ) from e
    if not (isinstance(ans_to_ix, dict) and isinstance(ix_to_ans, dict)
            and all(isinstance(i, int) for i in ans_to_ix.values())):
        raise DataError(f"{path} is not an answer dictionary: expected JSON [ans_to_ix, ix_to_ans], "
                        f"ans_to_ix mapping each answer to its index")
    return ans_to_ix, ix_to_ans


def load_token_dict(path: str | Path) -> dict[str, int]:
    """Read a token dictionary (JSON {token: id}), as TOKEN_DICT_PATH names it."""
    try:
        token_to_ix = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"cannot read TOKEN_DICT_PATH {path}: {e.strerror}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"TOKEN_DICT_PATH {path} is not valid JSON: {e}") from e
    if not isinstance(token_to_ix, dict) or not all(isinstance(i, int) for i in token_to_ix.values()):
        raise DataError(f"TOKEN_DICT_PATH {path} is not a token dictionary: expected JSON {{token: id}}")
    return token_to_ix


def soft_score(matches: int) -> float:
    """mcan-vqa's soft target for an answer given by `matches` annotators."""
    return (0.0, 0.3, 0.6, 0.9)[matches] if matches < 4 else 1.0


def answer_targets(gt_answers: Sequence[str], ans_to_ix: dict[str, int]) -> list[tuple[int, float]]:
    """(answer index, soft score) for each in-dictionary answer among the annotators' answers."""
    counts = Counter(prep_answer(a) for a in gt_answers)
    return [(ans_to_ix[a], soft_score(c)) for a, c in counts.items() if a in ans_to_ix]


@dataclass
class Vocab:
    """Token and answer dictionaries of a run."""

    token_to_ix: dict[str, int]
    ans_to_ix: dict[str, int]

    @property
    def ix_to_ans(self) -> list[str]:
        """Answer string of each class index."""
        out = [""] * len(self.ans_to_ix)
        for a, i in self.ans_to_ix.items():
            out[i] = a
        return out

    def fingerprint(self) -> str:
        """Short hash of both dictionaries: checkpoints and data must agree on it."""
        blob = json.dumps([self.token_to_ix, self.ans_to_ix], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def build_vocab(cfg: Config, train_records: Sequence[QuestionRecord],
                questions: Sequence[str] | None = None) -> Vocab:
    """Token dictionary over every question file present (mcan-vqa's rule), answers from training.

    TOKEN_DICT_PATH / ANSWER_DICT_PATH pin either dictionary to a file instead. `questions`: those
    files' questions when the caller has read them already. Question arrays read from
    `accuvqa prepare`'s store (instead of records) bring the dictionaries they were encoded with.
    """
    stored = getattr(train_records, "vocab", None)  # qa_store.QuestionArrays
    if stored is not None:
        return stored
    if cfg.TOKEN_DICT_PATH:
        token_to_ix = load_token_dict(cfg.TOKEN_DICT_PATH)
    elif questions is not None:
        token_to_ix = build_token_dict(questions)
    else:
        questions = []
        # mcan-vqa reads all four question files whatever TRAIN_SPLIT is, so an original checkpoint
        # trained on train+val+vg fits a val/test run configured with TRAIN_SPLIT train.
        for split in ("train", "val", "test", "vg"):
            if question_file(cfg.DATASET_PATH, split).is_file():
                questions += [r.question for r in load_split(cfg.DATASET_PATH, split, need_answers=False,
                                                                   allow_empty=True)]
        token_to_ix = build_token_dict(questions)
    if cfg.ANSWER_DICT_PATH:
        ans_to_ix, _ = load_answer_dict(cfg.ANSWER_DICT_PATH)
    else:
        ans_to_ix, _ = build_answer_dict((r.multiple_choice_answer for r in train_records), cfg.ANSWER_MIN_COUNT)
    if not ans_to_ix:
        raise DataError(f"the answer dictionary is empty: no training answer is seen more than ANSWER_MIN_COUNT "
                        f"{cfg.ANSWER_MIN_COUNT} times (lower it for a small dataset)")
    return Vocab(token_to_ix, ans_to_ix)
