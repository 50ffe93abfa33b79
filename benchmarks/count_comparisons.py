"""Where a model misses the count comparisons of the bundled reasoning set: accuracy of equal_integer, less_than
and greater_than by the two counts compared, read from a test split's predictions (CLEVR's format, one answer
per line, as `accuvqa test` writes it) and the split's programs run on its scenes.

    .venv/bin/python benchmarks/count_comparisons.py data/clevr_shapes results/<VERSION>/result_test_clevr.txt

Prints one line per (family, |count A - count B|) and per (smaller count, larger count) for counts at most 1
apart: questions, accuracy (percent).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from accuvqa.data import scenes

COMPARISONS = ("equal_integer", "less_than", "greater_than")


def counts_of(program: list[dict], scene: dict) -> tuple[int, int]:
    """The two counts a comparison compares: its program run up to each `count` step."""
    a, b = (int(scenes.execute(program[:k + 1], scene)) for k, node in enumerate(program)
            if node["function"] == "count")
    return a, b


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="the set's DATASET_PATH (questions/ and scenes/)")
    p.add_argument("predictions", type=Path, help="result_test_clevr.txt of `accuvqa test`")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    questions, scene_list = scenes.load_split(args.dataset, args.split)
    answers = args.predictions.read_text().split("\n")
    if len(answers) < len(questions):
        print(f"{args.predictions}: {len(answers)} answers for {len(questions)} questions", file=sys.stderr)
        return 1
    by_gap: dict[tuple[str, int], list[bool]] = defaultdict(list)
    by_pair: dict[tuple[int, int], list[bool]] = defaultdict(list)
    for q, answer in zip(questions, answers):
        family = scenes.family_of(q["program"])
        if family not in COMPARISONS:
            continue
        a, b = counts_of(q["program"], scene_list[q["image_index"]])
        right = answer == q["answer"]
        by_gap[family, abs(a - b)].append(right)
        if abs(a - b) <= 1:
            by_pair[min(a, b), max(a, b)].append(right)
    print("family          |A-B|  questions  accuracy")
    for (family, gap), hits in sorted(by_gap.items()):
        print(f"{family:15s} {gap:5d}  {len(hits):9d}  {100 * sum(hits) / len(hits):7.1f}")
    print("\ncounts (at most 1 apart)  questions  accuracy")
    for (low, high), hits in sorted(by_pair.items()):
        print(f"{low} vs {high}                    {len(hits):9d}  {100 * sum(hits) / len(hits):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
