"""Stopped runs continue the right run: a shipped preset, a SIGTERM, the printed command run verbatim.

The stop comes from ACCUVQA_FAIL_AT's `term` / `term-group` drills: a real SIGTERM, to the process or
to its whole process group (loader workers included, as SLURM and `timeout` send it), at a chosen
update, so no test waits on a clock to hit the run mid-way.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accuvqa.checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, TINY, cli_overrides, write_vqa_layout
from test_resume import _assert_same_weights, _weights

FEAT = 12  # write_vqa_layout's feature size


def _keys(layout: dict, root: Path, version: str, workers: int) -> dict:
    """Tiny overrides of the `small` preset (LAYER 6, HIDDEN_SIZE 512 ... and CKPT_VERSION small, CKPT_EPOCH 13)."""
    return {**TINY, "VERBOSE": True, "DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
            "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "MAX_TOKEN": 6, "BATCH_SIZE": 4, "GRAD_ACCU_STEPS": 2,
            "MAX_EPOCH": 2, "DROPOUT_R": 0.1, "CKPTS_PATH": str(root / "ck"), "RESULT_PATH": str(root / "res"),
            "VERSION": version, "NUM_WORKERS": workers}


def _accuvqa(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accuvqa ARGV` as a user types it (the console script's code), in a session of its own (so a
    SIGTERM to the process group reaches this run and its workers only)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "accuvqa", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, start_new_session=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    layout = write_vqa_layout(root, images_per_split=10, seed=5)
    # mcan-vqa's released checkpoint where the `small` preset's CKPT_VERSION / CKPT_EPOCH point: a trap
    trap = root / "ck" / "ckpt_small" / "epoch13.pkl"
    save_checkpoint(trap, {"state_dict": {"not": torch.zeros(1)}, "epoch": 13})
    return {"root": root, "layout": layout, "trap": trap}


@pytest.mark.slow
@pytest.mark.parametrize("workers,drill", [(0, "term"), (2, "term-group")])
def test_a_small_preset_run_stopped_by_sigterm_continues_with_the_printed_command_bit_identical(tree, workers,
                                                                                                 drill):
    root, layout = tree["root"], tree["layout"]
    whole = _accuvqa(["train", "--config", "small", *cli_overrides(_keys(layout, root, f"whole{workers}", workers))],
                     cwd=root)
    assert whole.returncode == 0, whole.stderr[-2000:]
    argv = ["train", "--config", "small", *cli_overrides(_keys(layout, root, f"stopped{workers}", workers))]
    stopped = _accuvqa(argv, cwd=root, env={"ACCUVQA_FAIL_AT": f"0:7:{drill}"})  # 12 updates/epoch: mid-epoch 1
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("accuvqa: stopped: SIGTERM at update 7 (epoch 1); saved "), line
    run_dir = root / "ck" / f"ckpt_stopped{workers}"
    assert f"saved {run_dir}/step7.pkl" in line and load_checkpoint(run_dir / "step7.pkl")["position"]["batch"] == 7
    command = line.split("continue with: ")[1]
    assert command.startswith("accuvqa train --config small ") and command.endswith(" --RESUME True")

    continued = _accuvqa(shlex.split(command)[1:], cwd=root)  # verbatim, as printed
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert (f"checkpoint to resume: {run_dir}/step7.pkl (the newest checkpoint of run 'stopped{workers}' (VERSION); "
            f"CKPT_VERSION small, CKPT_EPOCH 13 in ") in continued.stderr
    assert "ignored: only the command line names another checkpoint" in continued.stderr
    assert "24 (17 in this run)" in continued.stdout  # it continued the stopped run, not mcan-vqa's epoch 13
    _assert_same_weights(_weights(run_dir / "epoch2.pkl"), _weights(root / "ck" / f"ckpt_whole{workers}" / "epoch2.pkl"))
    assert load_checkpoint(tree["trap"])["epoch"] == 13  # the trap was never read as this run's

    # val of that run, without CKPT_EPOCH: its newest checkpoint (epoch 2), never ckpt_small/epoch13.pkl
    val = _accuvqa(["val", "--config", "small", *cli_overrides(_keys(layout, root, f"stopped{workers}", workers))],
                   cwd=root)
    assert val.returncode == 0, val.stderr[-2000:]
    assert f"checkpoint to evaluate: {run_dir}/epoch2.pkl (the newest checkpoint of run 'stopped{workers}'" in val.stderr
    lines = [json.loads(x) for x in (root / "res" / f"stopped{workers}" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["split"] == "val" and lines[-1]["epoch"] == 2
    # the accuracy val prints is the one the training's own evaluation of epoch 2 recorded
    assert lines[-1]["accuracy"] == lines[-2]["accuracy"] and lines[-2]["epoch"] == 2
