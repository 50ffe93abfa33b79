"""The `accuvqa` command: a table of sub-commands, each a `main(cfg, args)` in its own module.
Nothing in the package imports this module (`python -m accuvqa` runs it).

Every sub-command takes `--config FILE.yml` (or a packaged preset's name) and `--KEY VALUE`
overrides of any config key. User errors print one line on stderr and exit with code 2;
ACCUVQA_DEBUG=1 prints their full traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
import textwrap
import traceback
from typing import Any, NamedTuple, Sequence

from accuvqa.config import load_config
from accuvqa.config_doc import help_text
from accuvqa.errors import AccuvqaError, ConfigError, Stopped


class Command(NamedTuple):
    """One sub-command: `module:function` taking (cfg, args) and returning the exit code."""

    target: str
    help: str
    arguments: tuple[tuple[str, dict[str, Any]], ...] = ()


COMMANDS: dict[str, Command] = {
    "prepare": Command("accuvqa.prepare:main", "write the bundled easy-VQA data in the VQA v2 layout "
                       "(DATASET easyvqa), or check a VQA v2 tree (DATASET vqa)"),
    "train": Command("accuvqa.train:main", "train a model; checkpoint and evaluate after each epoch", (
        ("--nproc", {"type": int, "metavar": "N", "help": "train in N processes on this machine (torchrun "
                     "--standalone --nproc_per_node N); BATCH_SIZE stays the effective batch over all"}),)),
    "val": Command("accuvqa.evaluate:main", "evaluate a checkpoint on the val split"),
    "test": Command("accuvqa.evaluate:main", "predict the test split and write the submission file"),
    "predict": Command("accuvqa.predict:main", "answer one question about one image", (
        ("--image", {"help": "the image's region features (.npz), or a picture (easyvqa, or a model trained on "
                     "features accuvqa extract wrote: the checkpoint's extractor runs on it)"}),
        ("--question", {"required": True, "help": "the question, in words"}),
        ("--top", {"type": int, "default": 5, "help": "how many answers to print (default 5)"}),
        ("--attention", {"metavar": "OUT.png", "help": "also draw the model's attention over the image's "
                         "regions, the question and the answers into OUT.png"}),
        ("--attention-layers", {"action": "store_true", "help": "with --attention: add the per-layer, "
                                "per-head maps (question self-attention, image-to-question, image self-attention)"}),
        ("--image-file", {"metavar": "IMG", "help": "the photo: alone, answered through the extractor the "
                          "checkpoint records (accuvqa extract); with --image FILE.npz and --attention, the photo to "
                          "draw the regions on (default: a blank canvas of the stored image size)"}))),
    "check": Command("accuvqa.check:main", "measure that gradient accumulation equals the one-batch gradient "
                     "on this model"),
    "plot": Command("accuvqa.plot:main", "plot accuracy, loss and learning rate per epoch of a run "
                    "(<RESULT_PATH>/<VERSION>/metrics.png), or of several runs in one picture "
                    "(--VERSION a,b,c --out FILE.png)", (
                        ("--out", {"metavar": "FILE.png", "help": "where to write the picture (default: "
                                   "<RESULT_PATH>/<VERSION>/metrics.png for one run, "
                                   "<RESULT_PATH>/compare_<a>_<b>.png for several)"}),)),
    "serve": Command("accuvqa.serve:main", "ask a trained model about an image in the browser "
                     "(needs pip install 'accuvqa[demo]')", (
        ("--host", {"default": "127.0.0.1", "help": "address to serve on (default 127.0.0.1)"}),
        ("--port", {"type": int, "default": 7860, "help": "port to serve on (default 7860)"}))),
    "extract": Command("accuvqa.extract:main", "extract grid features of images (a torchvision ResNet backbone, "
                       "BACKBONE / BACKBONE_LAYER / EXTRACT_RESIZE) into one .npz per image; resumable; --KEY VALUE "
                       "overrides go after the images", (
        ("images", {"nargs": "+", "metavar": "IMAGES", "help": "image files, folders of images (recursively), or "
                    ".txt lists of image paths"}),
        ("--out", {"required": True, "metavar": "DIR", "help": "folder for <name>.npz and extractor.json"}),
        ("--weights", {"metavar": "FILE", "help": "the backbone's weights: a torchvision state-dict file, or a "
                       "torchvision weights name (overrides BACKBONE_WEIGHTS)"}))),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accuvqa",
        description="Train and evaluate VQA models (MCAN) with exact gradient accumulation.",
        epilog="Any config key can be overridden as --KEY VALUE, e.g. --GRAD_ACCU_STEPS 4.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys = help_text()  # every config key: group, type, default, meaning
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=textwrap.fill(command.help, 100), epilog=keys,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE.yml|PRESET", help="YAML file of config keys, or the name of "
                       "a packaged preset (small, large, easyvqa)")
        for flag, options in command.arguments:
            p.add_argument(flag, **options)
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


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the sub-command, return the exit code."""
    from accuvqa.legacy import translate_argv

    argv = translate_argv(list(sys.argv[1:] if argv is None else argv))  # mcan-vqa's run.py flags
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.5)
        raise ConfigError(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]}?" if close else "")
                          + f" (commands: {', '.join(COMMANDS)})")
    args, rest = _parser().parse_known_args(argv)
    cfg = load_config(args.config, parse_overrides(rest))
    stderr = logging.StreamHandler(sys.stderr)  # the level sits on the handler: a run's log.txt takes every line
    stderr.setLevel(logging.INFO if cfg.VERBOSE else logging.WARNING)
    logging.basicConfig(level=logging.INFO if cfg.VERBOSE else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", handlers=[stderr])
    if getattr(args, "nproc", None) is not None:  # train --nproc N: the same command in N processes
        from accuvqa.launch import launch, without_nproc

        return launch(args.nproc, without_nproc(argv), cfg, run_here=run)
    module, function = COMMANDS[args.command].target.split(":")
    code = getattr(importlib.import_module(module), function)(cfg, args)
    from accuvqa.runtime import end_process_group

    end_process_group()
    return code


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = run(argv)
    except AccuvqaError as e:
        if os.environ.get("ACCUVQA_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"accuvqa: {'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("accuvqa: interrupted at once; the newest checkpoint saved before it is intact "
              "(continue with --RESUME True)", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
