"""The `accuvqa` command: thin sub-commands over the library.

Every sub-command takes `--config FILE.yml` and `--KEY VALUE` overrides of any config key.
User errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from accuvqa.config import Config, load_config
from accuvqa.errors import AccuvqaError, ConfigError

log = logging.getLogger("accuvqa")

COMMANDS = {
    "prepare": "write the bundled easy-VQA data in the VQA v2 layout (DATASET easyvqa), "
               "or check a VQA v2 tree (DATASET vqa)",
    "train": "train a model; checkpoint and evaluate after each epoch",
    "val": "evaluate a checkpoint on the val split",
    "test": "predict the test split and write the submission file",
    "predict": "answer one question about one image",
    "check": "measure that gradient accumulation equals the one-batch gradient on this model",
    "plot": "plot accuracy and loss per epoch of a run (<RESULT_PATH>/<VERSION>/metrics.png)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accuvqa",
        description="Train and evaluate VQA models (MCAN) with exact gradient accumulation.",
        epilog="Any config key can be overridden as --KEY VALUE, e.g. --GRAD_ACCU_STEPS 4.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="Any config key can be overridden as --KEY VALUE.")
        p.add_argument("--config", metavar="FILE.yml", help="YAML file of config keys")
        if name == "predict":
            p.add_argument("--image", required=True, help="image file (easyvqa) or region features .npz")
            p.add_argument("--question", required=True, help="the question, in words")
            p.add_argument("--top", type=int, default=5, help="how many answers to print (default 5)")
    return parser


def parse_overrides(rest: Sequence[str]) -> dict[str, str]:
    """['--KEY', 'VALUE', '--K2=V2'] -> {'KEY': 'VALUE', 'K2': 'V2'}; unknown keys are ConfigErrors."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"unexpected argument {token!r}: overrides are written --KEY VALUE")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = rest[i + 1]
            i += 1
        overrides[key] = value
        i += 1
    return overrides


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def _print_table(title: str, rows: dict[str, Any]) -> None:
    print(title)
    for key, value in rows.items():
        print(f"  {key:<18} {value}")


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the sub-command, return the exit code."""
    from accuvqa.legacy import translate_argv

    argv = translate_argv(list(sys.argv[1:] if argv is None else argv))  # mcan-vqa's run.py flags
    args, rest = _parser().parse_known_args(argv)
    cfg: Config = load_config(args.config, parse_overrides(rest))
    _setup_logging(cfg.VERBOSE)
    if args.command == "prepare":
        return _prepare(cfg)
    if args.command == "train":
        from accuvqa.train import train

        s = train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
            return 0
        _print_table(f"training done: run {s['version']}", {
            "val accuracy": f"{s['val_accuracy']:.2f}%" if s["val_accuracy"] is not None else "not evaluated",
            "wall time": f"{s['wall_time_s']:.1f} s",
            "samples/s": f"{s['samples_per_s']:.0f}",
            "updates": s["updates"],
            "effective batch": s["effective_batch"],
            "checkpoint": s["checkpoint"],
        })
        return 0
    if args.command in ("val", "test"):
        from accuvqa.train import run_eval

        s = run_eval(cfg, args.command)
        rows: dict[str, Any] = {"checkpoint": s["checkpoint"], "questions": s["questions"]}
        if "accuracy" in s:
            rows["accuracy"] = f"{s['accuracy']:.2f}%"
            rows.update({f"  {k}": f"{v:.2f}%" for k, v in sorted(s["per_answer_type"].items())})
        for key in ("submission", "predictions"):
            if key in s:
                rows[key] = s[key]
        _print_table(f"{args.command} ({cfg.DATASET}, split {args.command})", rows)
        return 0
    if args.command == "predict":
        from accuvqa.train import predict

        for answer, score in predict(cfg, args.image, args.question, args.top):
            print(f"{score:.4f}  {answer}")
        return 0
    if args.command == "plot":
        from pathlib import Path

        from accuvqa.plot import plot_metrics

        run_dir = Path(cfg.RESULT_PATH) / cfg.run_version
        print(f"wrote {plot_metrics(run_dir / 'metrics.jsonl', run_dir / 'metrics.png')}")
        return 0
    if args.command == "check":
        from accuvqa.check import TOLERANCE, format_table
        from accuvqa.train import run_check

        rows, risks = run_check(cfg)
        print(f"gradient of one batch of {cfg.BATCH_SIZE} ({cfg.LOSS_REDUCTION} loss, dropout off) "
              f"vs the same batch in micro-batches, float32:")
        print(format_table(rows))
        for risk in risks:
            print(f"note: {risk}")
        worst = max(r.rel_diff for r in rows)
        if worst > TOLERANCE:
            print(f"verdict: NOT equivalent: relative difference {worst:.2e} > {TOLERANCE:.0e}")
            return 1
        print(f"verdict: equivalent: every relative difference <= {worst:.2e} (tolerance {TOLERANCE:.0e})")
        return 0
    raise AssertionError(args.command)


def _prepare(cfg: Config) -> int:
    if cfg.DATASET != "easyvqa":
        from accuvqa.data.validate import validate_vqa_tree

        summary = validate_vqa_tree(cfg)
        _print_table(f"VQA v2 tree at {cfg.DATASET_PATH} and {cfg.FEATURE_PATH}: complete", {
            split: (f"{v['questions']} questions, "
                    + (f"{v['annotations']} annotated, " if v["annotations"] is not None else "")
                    + f"{v['images']} images, {v['feature_files']} feature files, "
                    f"regions {'/'.join(map(str, v['sampled_regions']))} in the first files")
            for split, v in summary["splits"].items()})
        for note in summary["notes"]:
            print(f"note: {note}")
        return 0
    from tqdm import tqdm

    from accuvqa.data.easyvqa import prepare_easyvqa

    summary = prepare_easyvqa(cfg, progress=lambda items, desc: tqdm(items, desc=desc, file=sys.stderr,
                                                                      disable=not cfg.VERBOSE))
    _print_table(f"easy-VQA written to {cfg.DATASET_PATH} and {cfg.FEATURE_PATH}", {
        split: f"{v['questions']} questions, {v['images']} images" for split, v in summary.items()})
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = run(argv)
    except AccuvqaError as e:
        print(f"accuvqa: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("accuvqa: interrupted; completed epochs are saved as checkpoints", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
