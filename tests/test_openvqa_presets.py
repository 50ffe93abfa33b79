"""The packaged BAN and MMNasNet presets hold openvqa's values.

tests/data/openvqa_cfgs/*.yml are verbatim copies of openvqa's configs/vqa/<preset>.yml
(https://github.com/MILVLG/openvqa, commit f8f9966f202d5edf2a84096e1bc05ebf58ef55e6; Apache License 2.0,
Copyright MILVLG). OPT_PARAMS is read as openvqa reads it: its values are Python text that openvqa evaluates
('(0.9, 0.999)', '1e-9'); every other key, WARMUP_EPOCH included, is compared as it is.
"""

import ast
from pathlib import Path

import pytest
import yaml

from accuvqa.config import load_config

ORIGINALS = Path(__file__).parent / "data" / "openvqa_cfgs"


@pytest.mark.parametrize("preset", ["ban_4", "ban_8", "mmnasnet_small", "mmnasnet_large"])
def test_preset_holds_openvqa_values(preset):
    original = yaml.safe_load((ORIGINALS / f"{preset}.yml").read_text())
    cfg = load_config(preset)
    opt_params = {k: ast.literal_eval(v) for k, v in original.pop("OPT_PARAMS").items()}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.OPT_PARAMS.items()} == opt_params
    for key, value in original.items():
        assert getattr(cfg, key) == value, f"{preset}: {key} is {getattr(cfg, key)!r}, openvqa's is {value!r}"
    # openvqa's values the preset leaves to the model's defaults are those defaults
    assert cfg.IMG_FEAT_SIZE == 2048 and cfg.MAX_TOKEN == 14
    if cfg.MODEL_USE == "ban":
        assert cfg.BA_HIDDEN_SIZE == 3 * 1024
