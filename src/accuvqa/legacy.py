"""Translate mcan-vqa's command-line flags (its `run.py`: `--RUN`, `--MODEL`, `--CKPT_V`, ...) into
accuvqa's command line, so an mcan-vqa command runs as it is (`accuvqa` applies this to every
command line first; docs/migrating-from-mcan-vqa.md).

`python3 run.py --RUN='val' --MODEL='large' --CKPT_V=large --CKPT_E=13` becomes
`accuvqa val --config <the packaged large.yml> --CKPT_VERSION large --CKPT_EPOCH 13`. Flags may be
written `--FLAG=value` or `--FLAG value`, as argparse accepts them in run.py. Flags whose names
are already config keys (MAX_EPOCH, PRELOAD, GPU, SEED, VERSION, RESUME, CKPT_PATH) pass as they are.
"""

from __future__ import annotations

from pathlib import Path

from accuvqa.config import list_presets, preset_file
from accuvqa.errors import ConfigError

# run.py flag -> config key, where the names differ
FLAG_TO_KEY = {
    "SPLIT": "TRAIN_SPLIT",
    "EVAL_EE": "EVAL_EVERY_EPOCH",
    "SAVE_PRED": "TEST_SAVE_PRED",
    "BS": "BATCH_SIZE",
    "CKPT_V": "CKPT_VERSION",
    "CKPT_E": "CKPT_EPOCH",
    "ACCU": "GRAD_ACCU_STEPS",
    "NW": "NUM_WORKERS",
    "PINM": "PIN_MEM",
    "VERB": "VERBOSE",
    "DATA_PATH": "DATASET_PATH",
    "FEAT_PATH": "FEATURE_PATH",
}
RUN_MODES = ("train", "val", "test")
_NO_VALUE = ("-h", "--help")


def model_config(model: str) -> Path:
    """The preset `model` shipped in the package (small, large, ...), else ./configs/<model>.yml."""
    found = preset_file(model)
    if found is None:
        raise ConfigError(f"--MODEL {model}: no packaged preset {model!r} (presets: {', '.join(list_presets())}) "
                          f"and no {Path.cwd() / 'configs' / (model + '.yml')}; or give --config FILE.yml")
    return found


def translate_argv(argv: list[str]) -> list[str]:
    """Rewrite run.py's flags (--RUN, --MODEL and the renamed ones) into accuvqa arguments.

    Arguments without a run.py flag pass unchanged, so a native command line is returned as it is.
    `--RUN` without `--MODEL` loads configs/small.yml, as run.py's default `--MODEL small` does.
    """
    out: list[str] = []
    run_mode: str | None = None
    model: str | None = None
    command_at: int | None = None  # where the sub-command stands in `out`
    has_config = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token in _NO_VALUE:
            if command_at is None and not token.startswith("-"):
                command_at = len(out)
            out.append(token)
            i += 1
            continue
        flag, eq, value = token[2:].partition("=")
        separate = not eq and i + 1 < len(argv)
        if not eq and separate:
            value = argv[i + 1]
        i += 2 if separate else 1
        if flag == "RUN":
            if value not in RUN_MODES:
                raise ConfigError(f"--RUN must be train, val or test (as in mcan-vqa), got {value!r}")
            run_mode = value
            continue
        if flag == "MODEL":
            model = value
            continue
        has_config = has_config or flag == "config"
        name = f"--{FLAG_TO_KEY.get(flag, flag)}"
        out += [f"{name}={value}"] if eq else ([name, value] if separate else [name])
    if run_mode is not None and command_at is not None:
        raise ConfigError(f"--RUN {run_mode} names the command; give either --RUN or a command such as "
                          f"`accuvqa {run_mode}`, not both")
    if model is not None and has_config:
        raise ConfigError(f"--MODEL {model} selects configs/{model}.yml; give either --MODEL or --config, not both")
    if run_mode is not None and model is None and not has_config:
        model = "small"
    config = ["--config", str(model_config(model))] if model is not None else []
    if run_mode is not None:
        return [run_mode, *config, *out]
    at = len(out) if command_at is None else command_at + 1
    return out[:at] + config + out[at:]
