"""Training through `train()`: MCAN's schedule, GRAD_ACCU_STEPS invariance, resume, AMP, the optimizer, faults."""

import numpy as np
import pytest
import torch

from accuvqa.checkpoint import load_checkpoint, load_trained
from accuvqa.config import load_config
from accuvqa.data.features import feature_file
from accuvqa.data.loader import epoch_batches, make_dataset
from accuvqa.data.records import load_records
from accuvqa.errors import ConfigError, DataError
from accuvqa.models import model_inputs
from accuvqa.runtime import Runtime
from accuvqa.recipe import lr_at
from accuvqa.train import train
from conftest import ROOT, TINY, write_vqa_layout
from float64_runs import float64_training


def test_lr_schedule_warms_up_then_decays_like_mcan():
    cfg = load_config(overrides={"LR_BASE": 1.0, "LR_DECAY_R": 0.5, "LR_DECAY_LIST": [4, 5]})
    per_epoch = 10.5  # data_size / BATCH_SIZE, as mcan-vqa counts it
    # hand-worked: warm-up thresholds int(10.5 * k) = 10, 21, 31 updates
    assert [lr_at(cfg, u, 0, per_epoch) for u in (1, 10)] == [0.25, 0.25]
    assert [lr_at(cfg, u, 1, per_epoch) for u in (11, 21)] == [0.5, 0.5]
    assert [lr_at(cfg, u, 2, per_epoch) for u in (22, 31)] == [0.75, 0.75]
    assert lr_at(cfg, 32, 3, per_epoch) == 1.0
    assert lr_at(cfg, 45, 4, per_epoch) == 0.5  # 0-based epoch 4: first decay
    assert lr_at(cfg, 60, 5, per_epoch) == 0.25


def test_warmup_epoch_follows_openvqa_formula():
    per_epoch = 10.5
    # openvqa's GQA MCAN presets: WARMUP_EPOCH 2; thresholds int(10.5 * 3 * 0.25k) = 7, 15, 23 updates at 1/3, 2/3, 1
    cfg = load_config(overrides={"LR_BASE": 3.0, "WARMUP_EPOCH": 2})
    got = [lr_at(cfg, u, u // 11, per_epoch) for u in (1, 7, 8, 15, 16, 23, 24)]
    assert got == pytest.approx([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0], rel=1e-15)
    # 1: thresholds 5, 10, 15 at 1/2, then 2/2, and 3/2 capped at LR_BASE
    cfg = load_config(overrides={"LR_BASE": 1.0, "WARMUP_EPOCH": 1})
    assert [lr_at(cfg, u, 0, per_epoch) for u in (5, 6, 11, 16)] == [0.5, 1.0, 1.0, 1.0]
    # 0: no warm-up
    cfg = load_config(overrides={"LR_BASE": 1.0, "WARMUP_EPOCH": 0})
    assert lr_at(cfg, 1, 0, per_epoch) == 1.0
    with pytest.raises(ConfigError, match="WARMUP_EPOCH must be >= 0, got -1"):
        load_config(overrides={"WARMUP_EPOCH": -1})


def _held_out_logits(cfg, records) -> torch.Tensor:
    """Logits of the run's last checkpoint on held-out questions."""
    model, vocab, _, _ = load_trained(cfg, torch.device("cpu"))
    dataset = make_dataset(cfg, records, vocab)
    batch = dataset[list(range(len(dataset)))]
    model.eval()
    with torch.no_grad():
        return model(*model_inputs(cfg, batch))


@pytest.mark.slow
def test_grad_accu_steps_does_not_change_what_is_learned(easyvqa_slice, tmp_path):
    """A tiny MCAN on the demo's data, DROPOUT_R 0, one epoch of BATCH_SIZE 64 through train() in 1, 3 (uneven) and
    4 pieces, in float64 (tests/float64_runs.py): the trained models answer held-out questions alike. Outputs, not
    weights, are compared (Adam's eps 1e-9 turns a weight's rounding-sized gradient into a step). In float32 the
    runs drift apart by summation order alone, 1e-4 and more, by an amount that depends on the CPU; in float64
    they differ by 2.3e-13 at most (measured, AMD EPYC, torch 2.13), so 1e-9 is a margin of 4,000, while one
    update fewer (the control) moves the outputs by 4e-2, 4e7 times the bound."""
    base = load_config(ROOT / "configs/easyvqa.yml", {
        **TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "DROPOUT_R": 0, "MAX_EPOCH": 1, "EVAL_EVERY_EPOCH": False, "CKPTS_PATH": str(tmp_path / "ck"),
        "RESULT_PATH": str(tmp_path / "res"), "CKPT_EVERY_STEPS": 32})  # step32.pkl: one update before the end
    held_out = load_records(base, "test", need_answers=True)[:300]
    logits, summaries = {}, {}
    with float64_training():
        for k in (1, 3, 4):
            cfg = base.replace(GRAD_ACCU_STEPS=k, VERSION=f"k{k}")
            summaries[k] = train(cfg)
            logits[k] = _held_out_logits(cfg.replace(CKPT_EPOCH=1), held_out)
        one_update_fewer = _held_out_logits(base.replace(CKPT_PATH=str(tmp_path / "ck/ckpt_k1/step32.pkl")), held_out)
    assert logits[1].dtype == torch.float64
    assert summaries[3]["effective_batch"] == "BATCH_SIZE 64 = 22 x 3 x 1 (uneven micro-batches, exact)"
    assert summaries[4]["effective_batch"] == "BATCH_SIZE 64 = 16 x 4 x 1"
    assert summaries[1]["updates"] == summaries[3]["updates"] == summaries[4]["updates"] == 33
    diffs = {k: float((logits[k] - logits[1]).abs().max()) for k in (3, 4)}
    print(f"max |logit diff| after one epoch ({summaries[1]['updates']} updates) vs GRAD_ACCU_STEPS 1:", diffs)
    assert max(diffs.values()) <= 1e-9, diffs
    assert (logits[1].std(dim=0) > 1e-2).any()  # the model did learn something input-dependent
    assert float((one_update_fewer - logits[1]).abs().max()) > 1e4 * 1e-9  # control: the bound sees one update


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(easyvqa_slice, tmp_path):
    base = {**TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
            "CKPTS_PATH": str(tmp_path / "ck"), "RESULT_PATH": str(tmp_path / "res"), "MAX_EPOCH": 2,
            "DROPOUT_R": 0.1, "EVAL_EVERY_EPOCH": False}
    cfg = load_config(ROOT / "configs/easyvqa.yml", {**base, "VERSION": "whole"})
    train(cfg)
    train(cfg.replace(VERSION="part", MAX_EPOCH=1))  # "killed" after its first epoch
    summary = train(cfg.replace(VERSION="part", RESUME=True, CKPT_EPOCH=1))
    whole = load_checkpoint(tmp_path / "ck/ckpt_whole/epoch2.pkl")
    resumed = load_checkpoint(tmp_path / "ck/ckpt_part/epoch2.pkl")
    assert whole["step"] == resumed["step"] == summary["updates"]
    assert summary["updates_run"] == whole["step"] // 2  # the second epoch only: it did resume
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def _dtypes_of_linear_outputs(seen: list):
    """A global forward hook recording the dtype of every nn.Linear output."""
    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            seen.append(output.dtype)
    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_training_with_bf16_autocast_and_auto_micro_batches(easyvqa_slice, tmp_path):
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        **TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "CKPTS_PATH": str(tmp_path / "ck"), "RESULT_PATH": str(tmp_path / "res"), "MAX_EPOCH": 1,
        "AMP": "bf16", "GRAD_ACCU_STEPS": "auto", "VERSION": "bf16", "EVAL_EVERY_EPOCH": False})
    seen: list = []
    handle = _dtypes_of_linear_outputs(seen)
    try:
        summary = train(cfg)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # every Linear ran in bf16 under autocast
    assert summary["effective_batch"].startswith("BATCH_SIZE 64 = 64 x 1 x 1")  # no OOM on CPU: one piece
    state = load_checkpoint(tmp_path / "ck/ckpt_bf16/epoch1.pkl")
    assert all(v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point())
    seen.clear()
    handle = _dtypes_of_linear_outputs(seen)
    try:
        train(cfg.replace(AMP="off", VERSION="fp32"))
    finally:
        handle.remove()
    assert set(seen) == {torch.float32}


def _poison(layout: dict, image_ids) -> None:
    """Put a NaN into the region features of these train images."""
    for image_id in image_ids:
        path = feature_file(layout["FEATURE_PATH"], "train2014", image_id)
        with np.load(path) as npz:
            x = npz["x"].copy()
        x[0, 0] = np.nan
        np.savez(path, x=x)


def _nan_cfg(layout: dict, tmp_path, **more):
    return load_config(overrides={**TINY, "DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                  "IMG_FEAT_SIZE": 12, "BATCH_SIZE": 10, "CKPTS_PATH": str(tmp_path / "ck"),
                                  "RESULT_PATH": str(tmp_path / "res"), "EVAL_EVERY_EPOCH": False, **more})


def test_too_many_non_finite_updates_in_a_row_stop_the_run_naming_the_update(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=10)  # 50 train questions, each answer 10 times
    _poison(layout, range(1000, 1010))  # every train image
    cfg = _nan_cfg(layout, tmp_path, MAX_EPOCH=2, MAX_BAD_UPDATES=3, VERSION="nan")
    with pytest.raises(DataError, match=r"^3 updates in a row had a non-finite loss or gradient, the last at update 3 "
                                        r"\(epoch 1; MAX_BAD_UPDATES 3\); .* the last good checkpoint is none$"):
        train(cfg)
    assert not (tmp_path / "ck" / "ckpt_nan").exists()  # no checkpoint of a diverged model


def test_an_update_with_a_non_finite_loss_is_skipped_and_training_goes_on(tmp_path, caplog):
    layout = write_vqa_layout(tmp_path, images_per_split=10)
    _poison(layout, [1003])
    cfg = _nan_cfg(layout, tmp_path, MAX_EPOCH=1, VERSION="skip", BUCKET_WINDOW=0)  # batches as drawn: as below
    records = load_records(cfg, "train", need_answers=True)
    poisoned = {i for i, r in enumerate(records) if r.image_id == 1003}
    expected = [step for step, batch in enumerate(epoch_batches(len(records), cfg, 0, Runtime(torch.device("cpu"))),
                                                  start=1) if poisoned & set(batch.tolist())]
    assert 0 < len(expected) < 5  # some updates meet the poisoned image, not all
    with caplog.at_level("WARNING", logger="accuvqa.train"):
        summary = train(cfg)
    skipped = [int(r.getMessage().split()[1]) for r in caplog.records if "non-finite" in r.getMessage()]
    assert skipped == expected and summary["updates"] == 5
    state = load_checkpoint(tmp_path / "ck/ckpt_skip/epoch1.pkl")
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    # Adam counted only the applied updates
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5 - len(expected)}


def test_the_optimizer_comes_from_opt_and_opt_params(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=10)
    cfg = load_config(overrides={**TINY, "DATASET_PATH": layout["DATASET_PATH"],
                                 "FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": 12, "BATCH_SIZE": 8,
                                 "MAX_EPOCH": 1, "CKPTS_PATH": str(tmp_path / "ck"), "VERSION": "adamax",
                                 "RESULT_PATH": str(tmp_path / "res"), "EVAL_EVERY_EPOCH": False,
                                 "OPT": "Adamax", "OPT_PARAMS": {"weight_decay": 0.01}})
    train(cfg)
    saved = load_checkpoint(tmp_path / "ck/ckpt_adamax/epoch1.pkl")["optimizer"]
    assert all("exp_inf" in s for s in saved["state"].values())  # Adamax's infinity-norm moment
    group = saved["param_groups"][0]
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.9, 0.98) and group["eps"] == 1e-9
