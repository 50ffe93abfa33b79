"""Config: the seed's MCAN file, presets, overrides, and every bad-input message."""

from pathlib import Path

import pytest

from accuvqa.config import Config, load_config
from accuvqa.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SEED_MODEL_YML = """\
LAYER: 6
HIDDEN_SIZE: 512
MULTI_HEAD: 8
DROPOUT_R: 0.1
FLAT_MLP_SIZE: 512
FLAT_GLIMPSES: 1
FLAT_OUT_SIZE: 1024
LR_BASE: 0.0001
LR_DECAY_R: 0.2
GRAD_ACCU_STEPS: 1
CKPT_VERSION: 'small'
CKPT_EPOCH: 13
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mcan_defaults_match_mcan_vqa_base_config():
    cfg = load_config()
    assert (cfg.BATCH_SIZE, cfg.MAX_EPOCH, cfg.LR_DECAY_LIST) == (64, 13, [10, 12])
    assert cfg.OPT_BETAS == (0.9, 0.98) and cfg.OPT_EPS == 1e-9
    assert cfg.GRAD_NORM_CLIP == -1 and cfg.IMG_FEAT_PAD_SIZE == 100 and cfg.MAX_TOKEN == 14
    assert cfg.WORD_EMBED_SIZE == 300 and cfg.IMG_FEAT_SIZE == 2048
    assert cfg.FF_SIZE == 4 * cfg.HIDDEN_SIZE == 2048


def test_seed_model_file_loads_verbatim_and_equals_configs_small(tmp_path):
    cfg = load_config(write(tmp_path, SEED_MODEL_YML))
    assert (ROOT / "configs/small.yml").read_text() == SEED_MODEL_YML
    assert cfg == load_config(ROOT / "configs/small.yml")
    assert (cfg.LAYER, cfg.HIDDEN_SIZE, cfg.MULTI_HEAD, cfg.FLAT_OUT_SIZE) == (6, 512, 8, 1024)
    assert cfg.LR_BASE == 0.0001 and cfg.CKPT_VERSION == "small" and cfg.CKPT_EPOCH == 13


def test_large_and_easyvqa_presets():
    large = load_config(ROOT / "configs/large.yml")
    assert (large.HIDDEN_SIZE, large.FLAT_OUT_SIZE, large.MULTI_HEAD, large.FF_SIZE) == (1024, 2048, 8, 4096)
    easy = load_config(ROOT / "configs/easyvqa.yml")
    assert easy.DATASET == "easyvqa" and easy.FF_SIZE == 256 and easy.LAYER == 2


def test_overrides_are_converted_to_the_key_type(tmp_path):
    cfg = load_config(write(tmp_path, SEED_MODEL_YML), {
        "GRAD_ACCU_STEPS": "4", "LR_BASE": "1e-4", "USE_GLOVE": "True", "LR_DECAY_LIST": "[3, 5]",
        "OPT_BETAS": "[0.8, 0.9]", "VERSION": "7", "DROPOUT_R": "0"})
    assert cfg.GRAD_ACCU_STEPS == 4 and cfg.LR_BASE == 1e-4 and cfg.USE_GLOVE is True
    assert cfg.LR_DECAY_LIST == [3, 5] and cfg.OPT_BETAS == (0.8, 0.9)
    assert cfg.VERSION == "7" and isinstance(cfg.DROPOUT_R, float)


def test_overrides_win_over_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "BATCH_SIZE: 32\n"), {"BATCH_SIZE": 16})
    assert cfg.BATCH_SIZE == 16


def test_uneven_batch_split_is_allowed():
    assert load_config(overrides={"BATCH_SIZE": "64", "GRAD_ACCU_STEPS": "3"}).GRAD_ACCU_STEPS == 3


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "LAYER: 6\nHIDDEN_SIZE: [512\nMULTI_HEAD: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "column" in str(e.value)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'HIDEN_SIZE'.*did you mean HIDDEN_SIZE"):
        load_config(write(tmp_path, "HIDEN_SIZE: 512\n"))
    with pytest.raises(ConfigError, match=r"GRAD_ACCU_STEP'.*command-line.*GRAD_ACCU_STEPS"):
        load_config(overrides={"GRAD_ACCU_STEP": "2"})


def test_wrong_type_names_key_expected_type_and_source(tmp_path):
    path = write(tmp_path, "BATCH_SIZE: big\n")
    with pytest.raises(ConfigError, match=rf"BATCH_SIZE: expected int, got 'big' \(str\) from {path}"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"LAYER: expected int, got 2.5 \(float\) from --LAYER"):
        load_config(overrides={"LAYER": "2.5"})
    with pytest.raises(ConfigError, match=r"LR_DECAY_LIST: expected list of int"):
        load_config(overrides={"LR_DECAY_LIST": "10"})


def test_hidden_size_must_divide_into_heads():
    with pytest.raises(ConfigError, match=r"HIDDEN_SIZE \(100\) must be divisible by MULTI_HEAD \(8\)"):
        load_config(overrides={"HIDDEN_SIZE": "100"})


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_grad_accu_steps_below_one(steps):
    with pytest.raises(ConfigError, match=rf"GRAD_ACCU_STEPS must be at least 1, got {steps}"):
        load_config(overrides={"GRAD_ACCU_STEPS": steps})


def test_grad_accu_steps_larger_than_the_batch():
    with pytest.raises(ConfigError, match=r"GRAD_ACCU_STEPS \(9\) is larger than the per-process batch \(8"):
        load_config(overrides={"BATCH_SIZE": "8", "GRAD_ACCU_STEPS": "9"})


@pytest.mark.parametrize("key", ["BATCH_SIZE", "HIDDEN_SIZE", "MAX_TOKEN", "IMG_FEAT_PAD_SIZE", "FF_SIZE"])
def test_non_positive_sizes(key):
    with pytest.raises(ConfigError, match=rf"{key} must be a positive integer, got 0"):
        load_config(overrides={key: "0"})


def test_config_is_immutable_and_replace_validates():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.LAYER = 2  # type: ignore[misc]
    assert cfg.replace(HIDDEN_SIZE=64, MULTI_HEAD=4).FF_SIZE == 256
    with pytest.raises(ConfigError):
        cfg.replace(MULTI_HEAD=7)
    assert isinstance(cfg, Config)


def test_grad_accu_steps_auto_from_yaml_and_command_line(tmp_path):
    assert load_config(write(tmp_path, "GRAD_ACCU_STEPS: auto\n")).GRAD_ACCU_STEPS == "auto"
    assert load_config(overrides={"GRAD_ACCU_STEPS": "auto"}).GRAD_ACCU_STEPS == "auto"
    with pytest.raises(ConfigError, match=r"GRAD_ACCU_STEPS must be a positive integer or 'auto', got 'many'"):
        load_config(overrides={"GRAD_ACCU_STEPS": "many"})


def test_amp_setting_is_checked():
    assert load_config(overrides={"AMP": "bf16"}).AMP == "bf16"
    with pytest.raises(ConfigError, match=r"AMP must be off, bf16 or fp16, got 'fp8'"):
        load_config(overrides={"AMP": "fp8"})
