"""Config: the seed's MCAN file, presets, overrides, and every bad-input message."""

import dataclasses
import importlib.resources
import pickle
from pathlib import Path

import pytest

from accuvqa.config import Config, list_presets, load_config, resolve_config_file
from accuvqa.errors import ConfigError
from accuvqa.models import list_models, model_spec

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CFGS = Path(__file__).parent / "data" / "mcan_vqa_cfgs"  # mcan-vqa's cfgs/*_model.yml, verbatim
PACKAGED = Path(str(importlib.resources.files("accuvqa") / "configs"))
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
    assert cfg.LR_BASE == 0.0001
    # its checkpoint keys name mcan-vqa's released checkpoint: set aside, never used unless the command line says so
    assert cfg.CKPT_VERSION is None and cfg.CKPT_EPOCH == 0
    assert cfg.ignored == {"CKPT_VERSION": ("small", str(tmp_path / "cfg.yml")), "CKPT_EPOCH": (13, str(tmp_path / "cfg.yml"))}
    named = load_config(write(tmp_path, SEED_MODEL_YML), overrides={"CKPT_VERSION": "small", "CKPT_EPOCH": 13})
    assert (named.CKPT_VERSION, named.CKPT_EPOCH) == ("small", 13)


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


# --- packaged presets against mcan-vqa's original model files

@pytest.mark.parametrize("preset", ["small", "large"])
def test_packaged_preset_equals_mcan_vqa_original(preset):
    original_path = ORIGINAL_CFGS / f"{preset}_model.yml"
    packaged, original = load_config(preset), load_config(original_path)
    want, got = original.to_dict(), packaged.to_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], \
            f"{preset}: {key} is {got[key]!r}, mcan-vqa's {original_path.name} gives {want[key]!r}"
    assert packaged == original
    # the texts are the same too, but for the newline ending the packaged file
    assert (PACKAGED / f"{preset}.yml").read_text().rstrip("\n") == original_path.read_text()


def test_large_learning_rate_is_mcan_vqa_s():
    assert load_config("large").LR_BASE == 5e-05
    assert load_config(ORIGINAL_CFGS / "large_model.yml").LR_BASE == 5e-05


def test_preset_by_name_equals_its_packaged_file():
    for name in ("small", "large", "easyvqa"):
        assert resolve_config_file(name) == PACKAGED / f"{name}.yml"
        assert load_config(name) == load_config(PACKAGED / f"{name}.yml")


def test_unknown_preset_lists_the_presets():
    assert {"easyvqa", "large", "small"} <= set(list_presets())
    with pytest.raises(ConfigError, match=r"no config preset 'nosuch'") as e:
        load_config("nosuch")
    assert ", ".join(list_presets()) in str(e.value)
    assert all(f" {name}," in str(e.value) or str(e.value).endswith(f" {name}") for name in ("easyvqa", "large", "small"))


# --- MODEL_USE and the model's own keys

def test_unknown_model_lists_the_registered_models():
    assert "mcan" in list_models()
    with pytest.raises(ConfigError, match=r"MODEL_USE 'nosuch' is not a registered model") as e:
        load_config(overrides={"MODEL_USE": "nosuch"})
    assert f"registered: {', '.join(list_models())}" in str(e.value)
    if list_models() == ["mcan"]:
        assert "registered: mcan" in str(e.value)


def test_unknown_key_suggests_a_model_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'FLAT_OUT_SIZ' in .*did you mean FLAT_OUT_SIZE\?"):
        load_config(write(tmp_path, "FLAT_OUT_SIZ: 1024\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'layer' in command-line overrides; "
                                          r"did you mean LAYER\?"):
        load_config(overrides={"layer": "2"})
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size'.*did you mean BATCH_SIZE\?"):
        load_config(overrides={"batch_size": "2"})


def test_key_of_another_model_names_that_model(monkeypatch):
    """A key only another registered model declares says which model, not 'unknown'."""
    from accuvqa.models import registry

    @dataclasses.dataclass(frozen=True)
    class ToyKeys:
        TOY_WIDTH: int = 3

        def validate(self, where):
            pass

    toy_spec = registry.ModelSpec("toy_for_test", lambda *a: None, ToyKeys)
    monkeypatch.setitem(registry._REGISTRY, "toy_for_test", toy_spec)
    with pytest.raises(ConfigError, match=r"TOY_WIDTH \(in command-line overrides\) is a key of model toy_for_test, "
                                          r"not of MODEL_USE mcan"):
        load_config(overrides={"TOY_WIDTH": "4"})
    toy = load_config(overrides={"MODEL_USE": "toy_for_test", "TOY_WIDTH": "4"})
    assert toy.TOY_WIDTH == 4 and "LAYER" not in toy.to_dict()
    with pytest.raises(AttributeError):
        toy.LAYER
    with pytest.raises(ConfigError,
                       match=r"LAYER .* is a key of model (.*, )?mcan(, .*)?, not of MODEL_USE toy_for_test"):
        load_config(overrides={"MODEL_USE": "toy_for_test", "LAYER": "2"})
    back = toy.replace(MODEL_USE="mcan")  # another model: its keys start from their defaults
    assert back == load_config() and "TOY_WIDTH" not in back.to_dict()


def test_model_keys_are_config_keys():
    cfg = load_config("large")
    d = cfg.to_dict()
    for key in ("LAYER", "HIDDEN_SIZE", "FF_SIZE", "MULTI_HEAD", "FLAT_OUT_SIZE", "MODEL_USE"):
        assert key in d
    assert (d["HIDDEN_SIZE"], d["FF_SIZE"], d["MODEL_USE"]) == (1024, 4096, "mcan")
    assert "model_keys" not in d
    own = {f.name for f in dataclasses.fields(model_spec(cfg.MODEL_USE).keys)}
    assert own <= set(d)
    with pytest.raises(AttributeError, match=r"no key 'NOSUCH'"):
        cfg.NOSUCH


@pytest.mark.parametrize("preset", ["small", "large", "easyvqa"])
def test_config_pickles(preset):
    """Loader workers receive the config pickled."""
    cfg = load_config(preset, {"OPT_PARAMS": "{weight_decay: 0.01}", "LAYER": "3"})
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.LAYER == 3 and back.FF_SIZE == cfg.FF_SIZE


def test_replace_model_use_keeps_working():
    cfg = load_config()
    assert cfg.replace(MODEL_USE="mcan") == cfg
    assert cfg.replace(MODEL_USE="mcan", LAYER=2).LAYER == 2
    with pytest.raises(ConfigError, match=r"registered: "):
        cfg.replace(MODEL_USE="nosuch")


def test_replace_same_model_use_keeps_the_model_keys():
    cfg = load_config("large", {"FF_SIZE": "1000"})
    same = cfg.replace(MODEL_USE=cfg.MODEL_USE)
    assert (same.HIDDEN_SIZE, same.FF_SIZE) == (1024, 1000)
    assert same == cfg


# --- OPT and OPT_PARAMS

def test_optimizer_by_name():
    assert load_config(overrides={"OPT": "Adamax"}).OPT == "Adamax"
    assert load_config(overrides={"OPT": "SGD", "OPT_PARAMS": "{momentum: 0.9}"}).OPT_PARAMS == {"momentum": 0.9}
    with pytest.raises(ConfigError, match=r"OPT 'Nope' \(from --OPT\) is not a torch.optim optimizer") as e:
        load_config(overrides={"OPT": "Nope"})
    assert "Adamax" in str(e.value) and "SGD" in str(e.value)
    with pytest.raises(ConfigError, match=r"OPT 'Optimizer'"):
        load_config(overrides={"OPT": "Optimizer"})


def test_optimizer_params_are_checked_against_the_optimizer(tmp_path):
    cfg = load_config(overrides={"OPT_PARAMS": {"weight_decay": 0.01}})
    assert cfg.OPT == "Adam" and cfg.OPT_PARAMS == {"weight_decay": 0.01}
    assert load_config(write(tmp_path, "OPT_PARAMS:\n  weight_decay: 0.01\n")).OPT_PARAMS == {"weight_decay": 0.01}
    with pytest.raises(ConfigError, match=r"OPT_PARAMS \(from --OPT_PARAMS\): Adam takes no momentum") as e:
        load_config(overrides={"OPT_PARAMS": {"momentum": 0.9}})
    assert "weight_decay" in str(e.value)  # and says what it does take
    with pytest.raises(ConfigError, match=r"OPT_PARAMS: expected mapping"):
        load_config(overrides={"OPT_PARAMS": "[1, 2]"})


def test_amp_off_can_be_written(tmp_path):
    assert load_config(overrides={"AMP": "off"}).AMP == "off"
    assert load_config(write(tmp_path, "AMP: off\n")).AMP == "off"
