"""VQA's scoring of a split's answers, and its submission file: what the VQA v2, easy-VQA and folder layouts
share (GQA and CLEVR score as their own benchmarks do, in their readers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accuvqa.data.questions import QuestionArrays
from accuvqa.files import write_json_atomic
from accuvqa.metrics import evaluate as vqa_evaluate


def vqa_score(questions: QuestionArrays, answers: list[str]) -> dict[str, Any]:
    """Official VQA accuracy (percent) overall, per answer type and per question type."""
    return vqa_evaluate(dict(zip(questions.question_id.tolist(), answers)), questions.scoring_table())


def vqa_submission(out_dir: Path, split: str, questions: QuestionArrays, answers: list[str]) -> Path | None:
    """The test split's `result_test.json` (`[{"question_id", "answer"}]`, the VQA server's format); None for
    another split."""
    if split != "test":
        return None
    return write_json_atomic(Path(out_dir) / "result_test.json",
                             [{"question_id": q, "answer": a} for q, a in zip(questions.question_id.tolist(), answers)])
