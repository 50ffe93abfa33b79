"""Runs survive interruption: mid-epoch checkpoints, SIGKILL at any moment, SIGTERM, a full disk.

A resumed run must end with weights bit-identical to an uninterrupted one. Each resume test would
fail if `--RESUME` did nothing: the resumed process must say it started from the checkpoint, run
only the remaining updates, and (dropout on) reproduce the random stream from the saved RNG state.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accuvqa.checkpoint import load_checkpoint
from accuvqa.config import load_config
from accuvqa.errors import ConfigError
from accuvqa.runtime import StopRequest
from accuvqa.train import train
from conftest import ROOT, TINY, cli_overrides, run_cli, write_vqa_layout

UPDATES_PER_EPOCH = 132  # the easy-VQA slice's train split (2,123 questions) at BATCH_SIZE 16


def _run_args(slice_paths: dict, tmp_path: Path, version: str, workers: int) -> list[str]:
    """A tiny MCAN, dropout on, uneven micro-batches (16 = 6 + 5 + 5), a mid-epoch checkpoint every 7 updates."""
    return ["train", "--config", str(ROOT / "configs/easyvqa.yml"), *cli_overrides({
        **TINY, "VERBOSE": True, "DATASET_PATH": slice_paths["DATASET_PATH"],
        "FEATURE_PATH": slice_paths["FEATURE_PATH"], "CKPTS_PATH": str(tmp_path / "ck"),
        "RESULT_PATH": str(tmp_path / "res"), "VERSION": version, "MAX_EPOCH": 2, "BATCH_SIZE": 16,
        "GRAD_ACCU_STEPS": 3, "DROPOUT_R": 0.1, "EVAL_EVERY_EPOCH": False, "CKPT_EVERY_STEPS": 7,
        "KEEP_CKPTS": 2, "NUM_WORKERS": workers, "PRELOAD": workers == 0})]


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "accuvqa", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _latest_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "latest.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _latest_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before update {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint of update {step} within {timeout} s"
        time.sleep(0.01)


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(easyvqa_slice, tmp_path_factory) -> dict:
    """Final weights of the same run, never interrupted, for NUM_WORKERS 0 and 2."""
    out = {}
    for workers in (0, 2):
        root = tmp_path_factory.mktemp(f"whole{workers}")
        r = run_cli(*_run_args(easyvqa_slice, root, "whole", workers), cwd=root)
        assert r.returncode == 0, r.stderr[-2000:]
        out[workers] = _weights(root / "ck/ckpt_whole/epoch2.pkl")
    _assert_same_weights(out[0], out[2])  # worker processes change nothing, dropout included
    return out


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_killed_twice_at_random_updates_ends_bit_identical(easyvqa_slice, uninterrupted, tmp_path, workers):
    rng = random.Random(1000 + workers)
    # the second kill comes in the second epoch: the resumed process crosses the epoch boundary
    targets = [rng.randrange(10, 90), rng.randrange(UPDATES_PER_EPOCH + 10, 2 * UPDATES_PER_EPOCH - 20)]
    args, run_dir = _run_args(easyvqa_slice, tmp_path, "killed", workers), tmp_path / "ck/ckpt_killed"
    resumed_from = []
    for n, target in enumerate(targets):
        proc = _popen(args + (["--RESUME", "True"] if n else []), cwd=tmp_path)
        _wait_for_step(proc, run_dir, target)
        proc.send_signal(signal.SIGKILL)  # at whatever moment the run is in: no warning, no clean-up
        assert proc.wait(timeout=30) == -signal.SIGKILL
        proc.communicate()
        assert not (run_dir / "epoch2.pkl").exists()
        resumed_from.append(_latest_step(run_dir))
    r = run_cli(*args, "--RESUME", "True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    last = resumed_from[-1]
    assert f"{UPDATES_PER_EPOCH} updates/epoch" in r.stderr
    assert f"resuming from {run_dir}/step{last}.pkl: 1 epochs and {last} updates done" in r.stderr
    total = 2 * UPDATES_PER_EPOCH
    assert f"{total} ({total - last} in this run)" in r.stdout  # only the remaining updates ran
    _assert_same_weights(_weights(run_dir / "epoch2.pkl"), uninterrupted[workers])
    # KEEP_CKPTS 2: two mid-epoch checkpoints left, both epoch checkpoints kept
    names = sorted(p.name for p in run_dir.iterdir())
    assert [n for n in names if n.startswith("epoch")] == ["epoch1.pkl", "epoch2.pkl"]
    assert len([n for n in names if n.startswith("step")]) == 2 and not [n for n in names if ".tmp" in n]


@pytest.mark.slow
def test_sigterm_finishes_the_update_saves_and_says_how_to_continue(easyvqa_slice, uninterrupted, tmp_path):
    args, run_dir = _run_args(easyvqa_slice, tmp_path, "termed", 0), tmp_path / "ck/ckpt_termed"
    proc = _popen(args, cwd=tmp_path)
    _wait_for_step(proc, run_dir, 30)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 10
    line = err.strip().splitlines()[-1]
    assert line.startswith("accuvqa: stopped: SIGTERM at update ") and "--RESUME True" in line, line
    step = int(line.split("at update ")[1].split()[0])
    saved = run_dir / f"step{step}.pkl"
    assert f"saved {saved}" in line and _latest_step(run_dir) == step
    assert load_checkpoint(saved)["position"]["batch"] == step  # inside epoch 1
    command = line.split("continue with: ")[1]
    assert command.startswith("accuvqa train ") and command.count("--RESUME") == 1
    r = run_cli(*args, "--RESUME", "True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_weights(_weights(run_dir / "epoch2.pkl"), uninterrupted[0])


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: asks the loop to stop after its update
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the second: now
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored afterwards


def _small_overrides(tmp_path: Path, **more) -> dict:
    layout = write_vqa_layout(tmp_path, images_per_split=10)  # 50 train questions: 5 updates of 10
    return {**TINY, "DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
            "IMG_FEAT_SIZE": 12, "BATCH_SIZE": 10, "CKPTS_PATH": str(tmp_path / "ck"),
            "RESULT_PATH": str(tmp_path / "res"), "EVAL_EVERY_EPOCH": False, "VERSION": "r", "DROPOUT_R": 0.1, **more}


def _small_run(tmp_path: Path, **more):
    return load_config(overrides=_small_overrides(tmp_path, **more))


def test_mid_epoch_checkpoints_hold_their_position_and_resume_alone_continues(tmp_path):
    cfg = _small_run(tmp_path, MAX_EPOCH=2, CKPT_EVERY_STEPS=3, KEEP_CKPTS=2)
    train(cfg)
    run_dir = tmp_path / "ck/ckpt_r"
    # updates 3 (epoch 1, batch 3), 6 (epoch 2, batch 1) and 9 (epoch 2, batch 4) were mid-epoch;
    # KEEP_CKPTS 2 keeps the newest two
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch1.pkl", "epoch2.pkl", "latest.json", "step6.pkl",
                                                         "step9.pkl"]
    position = load_checkpoint(run_dir / "step6.pkl")["position"]
    assert {k: position[k] for k in ("epoch", "step", "batch", "item_sum", "bad_updates")} == {
        "epoch": 1, "step": 6, "batch": 1, "item_sum": 10.0, "bad_updates": 0}
    assert load_checkpoint(run_dir / "step9.pkl")["position"]["batch"] == 4
    assert json.loads((run_dir / "latest.json").read_text()) == {"checkpoint": "epoch2.pkl", "epoch": 2, "step": 10}
    whole = _weights(run_dir / "epoch2.pkl")
    # resume from update 6 (the newest mid-epoch checkpoint) into a copy of the run
    copy_dir = tmp_path / "ck/ckpt_c"
    copy_dir.mkdir()
    (copy_dir / "step6.pkl").write_bytes((run_dir / "step6.pkl").read_bytes())
    (copy_dir / "latest.json").write_text(json.dumps({"checkpoint": "step6.pkl", "epoch": 1, "step": 6}))
    summary = train(cfg.replace(VERSION="c", RESUME=True))
    assert summary["updates"] == 10 and summary["updates_run"] == 4
    _assert_same_weights(_weights(copy_dir / "epoch2.pkl"), whole)


def test_resume_of_a_run_without_checkpoints_names_it(tmp_path):
    cfg = _small_run(tmp_path, MAX_EPOCH=1)
    with pytest.raises(ConfigError, match=r"run 'nothere' has no checkpoint to resume in .*ckpt_nothere"):
        train(cfg.replace(VERSION="nothere", RESUME=True))


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()}): needs root")


def test_a_full_disk_stops_with_one_line_naming_the_last_good_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        overrides = _small_overrides(tmp_path, MAX_EPOCH=1, CKPTS_PATH=str(disk))
        train(load_config(overrides=overrides))
        good = disk / "ckpt_r" / "epoch1.pkl"
        before = good.read_bytes()
        with open(disk / "filler", "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = run_cli("train", *cli_overrides({**overrides, "MAX_EPOCH": 2, "RESUME": True}), cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"accuvqa: error: cannot write checkpoint {disk}/ckpt_r/epoch2.pkl: no space left on device")
        assert line.endswith(f"the last good checkpoint is {good}")
        assert sorted(p.name for p in (disk / "ckpt_r").iterdir()) == ["epoch1.pkl", "latest.json"]  # no temp file
        assert good.read_bytes() == before and load_checkpoint(good)["epoch"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)
