"""mcan-vqa's run.py flags reach the same commands and keys as accuvqa's own command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from accuvqa.cli import _parser, parse_overrides
from accuvqa.config import PRESETS, list_presets, load_config
from accuvqa.errors import ConfigError
from accuvqa.legacy import translate_argv

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = str(PRESETS / "small.yml"), str(PRESETS / "large.yml")  # the presets shipped in the package

# run.py's argparse table (mcan-vqa run.py: flag -> dest), written out by hand
RENAMED = [("SPLIT", "TRAIN_SPLIT", "train+val"), ("EVAL_EE", "EVAL_EVERY_EPOCH", "False"),
           ("SAVE_PRED", "TEST_SAVE_PRED", "True"), ("BS", "BATCH_SIZE", "32"), ("CKPT_V", "CKPT_VERSION", "small"),
           ("CKPT_E", "CKPT_EPOCH", "13"), ("ACCU", "GRAD_ACCU_STEPS", "4"), ("NW", "NUM_WORKERS", "8"),
           ("PINM", "PIN_MEM", "True"), ("VERB", "VERBOSE", "False"), ("DATA_PATH", "DATASET_PATH", "d/vqa"),
           ("FEAT_PATH", "FEATURE_PATH", "d/coco_extract")]
SAME = [("MAX_EPOCH", "3"), ("PRELOAD", "True"), ("GPU", "0"), ("SEED", "7"), ("VERSION", "mine"),
        ("RESUME", "True"), ("CKPT_PATH", "ckpts/x.pkl")]


@pytest.mark.parametrize("old,new,value", RENAMED)
def test_renamed_flags_in_both_spellings(old, new, value):
    assert translate_argv(["--RUN=train", f"--{old}={value}"]) == ["train", "--config", SMALL, f"--{new}={value}"]
    assert translate_argv(["--RUN", "train", f"--{old}", value]) == ["train", "--config", SMALL, f"--{new}", value]


@pytest.mark.parametrize("key,value", SAME)
def test_flags_named_like_config_keys_pass_unchanged(key, value):
    assert translate_argv(["--RUN=val", f"--{key}={value}"]) == ["val", "--config", SMALL, f"--{key}={value}"]


def test_run_and_model_become_command_and_config():
    assert translate_argv(["--RUN=test", "--MODEL=large", "--CKPT_V=large", "--CKPT_E=13"]) == [
        "test", "--config", LARGE, "--CKPT_VERSION=large", "--CKPT_EPOCH=13"]
    assert translate_argv(["--MODEL", "large", "--RUN", "train"]) == ["train", "--config", LARGE]


def test_native_command_lines_are_returned_as_they_are():
    native = ["train", "--config", "configs/easyvqa.yml", "--GRAD_ACCU_STEPS", "4", "--VERSION=x"]
    assert translate_argv(native) == native
    assert translate_argv(["predict", "--image", "a.npz", "--question", "What?", "--top", "3"]) == [
        "predict", "--image", "a.npz", "--question", "What?", "--top", "3"]
    assert translate_argv(["-h"]) == ["-h"]
    # aliases work in the native form too; --MODEL's config goes right after the command
    assert translate_argv(["val", "--MODEL=small", "--BS", "8"]) == ["val", "--config", SMALL, "--BATCH_SIZE", "8"]


def test_translated_line_loads_the_same_config_as_the_native_one():
    args, rest = _parser().parse_known_args(translate_argv(
        ["--RUN=train", "--MODEL=large", "--SPLIT=train+val", "--BS=32", "--ACCU=4", "--EVAL_EE=False"]))
    cfg = load_config(args.config, parse_overrides(rest))
    native = load_config(ROOT / "configs/large.yml", {"TRAIN_SPLIT": "train+val", "BATCH_SIZE": "32",
                                                      "GRAD_ACCU_STEPS": "4", "EVAL_EVERY_EPOCH": "False"})
    assert args.command == "train" and cfg == native
    assert (cfg.HIDDEN_SIZE, cfg.BATCH_SIZE, cfg.GRAD_ACCU_STEPS, cfg.EVAL_EVERY_EPOCH) == (1024, 32, 4, False)


@pytest.mark.parametrize("argv,message", [
    (["--RUN=eval"], "--RUN must be train, val or test"),
    (["--RUN=val", "--MODEL=huge"],
     "--MODEL huge: no packaged preset 'huge' \\(presets: " + ", ".join(list_presets()) + "\\)"),
    (["val", "--RUN=val"], "give either --RUN or a command"),
    (["--RUN=val", "--MODEL=small", "--config", "x.yml"], "give either --MODEL or --config"),
])
def test_contradictory_or_unknown_values_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        translate_argv(argv)


def test_model_selects_a_packaged_preset_else_the_current_folders_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert translate_argv(["--RUN=train", "--MODEL=easyvqa"]) == ["train", "--config", str(PRESETS / "easyvqa.yml")]
    with pytest.raises(ConfigError) as e:
        translate_argv(["--RUN=train", "--MODEL=ban_16"])
    assert str(tmp_path / "configs" / "ban_16.yml") in str(e.value) and "--config FILE.yml" in str(e.value)
    # openvqa's way: --MODEL NAME picks configs/NAME.yml of the current folder
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/ban_16.yml").write_text("LAYER: 2\n")
    assert translate_argv(["--RUN=train", "--MODEL=ban_16"]) == ["train", "--config", str(tmp_path / "configs/ban_16.yml")]


def test_cli_alias_form_reaches_the_real_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "accuvqa.cli", "--RUN=val", "--MODEL=small", "--CKPT_PATH=missing.pkl"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "checkpoint missing.pkl does not exist" in r.stderr and "Traceback" not in r.stderr
