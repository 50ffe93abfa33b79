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
# Waits end on an event (a checkpoint appears, a process exits); the deadline only turns a hang into a failure,
# so it is far above what a loaded 2-core machine takes (a few seconds to a minute), never a speed bound.
DEADLINE = 600


def _run_args(slice_paths: dict, tmp_path: Path, version: str, workers: int) -> list[str]:
    """A tiny MCAN, dropout on, uneven micro-batches (16 = 6 + 5 + 5), a mid-epoch checkpoint every 7 updates."""
    return ["train", "--config", str(ROOT / "configs/easyvqa.yml"), *cli_overrides({
        **TINY, "VERBOSE": True, "DATASET_PATH": slice_paths["DATASET_PATH"],
        "FEATURE_PATH": slice_paths["FEATURE_PATH"], "CKPTS_PATH": str(tmp_path / "ck"),
        "RESULT_PATH": str(tmp_path / "res"), "VERSION": version, "MAX_EPOCH": 2, "BATCH_SIZE": 16,
        "GRAD_ACCU_STEPS": 3, "DROPOUT_R": 0.1, "EVAL_EVERY_EPOCH": False, "CKPT_EVERY_STEPS": 7,
        "KEEP_CKPTS": 2, "NUM_WORKERS": workers, "PRELOAD": workers == 0})]


def _popen(args: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """`python -m accuvqa ARGS` in the background, its output in files `<name>.out` and `<name>.err` in cwd (files,
    not pipes: a pipe nobody reads while the test waits for a checkpoint could fill up and stall the run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "accuvqa", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
    proc.err_file = cwd / f"{name}.err"
    return proc


def _latest_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "latest.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while _latest_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before update {step}: {proc.err_file.read_text()[-2000:]}"
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
        proc = _popen(args + (["--RESUME", "True"] if n else []), cwd=tmp_path, name=f"run{n}")
        _wait_for_step(proc, run_dir, target)
        proc.send_signal(signal.SIGKILL)  # at whatever moment the run is in: no warning, no clean-up
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
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
    proc = _popen(args, cwd=tmp_path, name="termed")
    _wait_for_step(proc, run_dir, 30)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=DEADLINE)
    err = proc.err_file.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
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
    with pytest.raises(ConfigError, match=r"run 'nothere' has no checkpoint in .*ckpt_nothere; .*without --RESUME"):
        train(cfg.replace(VERSION="nothere", RESUME=True))


def test_a_full_disk_stops_with_one_line_and_the_last_good_checkpoint_resumes(tmp_path):
    """The disk fills while the resumed run writes its epoch-2 checkpoint: ACCUVQA_DISK_FULL_AFTER (the drill in
    src/accuvqa/files.py) lets each atomically written file hold 64 KiB, enough for config.yml and latest.json,
    not for a checkpoint; no privileges needed (no filesystem to mount)."""
    capacity = 64 * 1024
    overrides = _small_overrides(tmp_path, MAX_EPOCH=1)
    train(load_config(overrides=overrides))
    run_dir = tmp_path / "ck/ckpt_r"
    good, latest = run_dir / "epoch1.pkl", run_dir / "latest.json"
    before, latest_before = good.read_bytes(), latest.read_bytes()
    assert len(before) > 4 * capacity  # the checkpoint cannot fit: the drill strikes inside torch.save
    args = ["train", *cli_overrides({**overrides, "MAX_EPOCH": 2, "RESUME": True})]
    r = run_cli(*args, cwd=tmp_path, env={"ACCUVQA_DISK_FULL_AFTER": str(capacity)})
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("accuvqa: error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    assert "no space left" in errors[0].lower() and str(run_dir / "epoch2.pkl") in errors[0], errors[0]
    for internals in ("Traceback", "enforce fail", "inline_container", "unexpected pos"):  # torch's words, not ours
        assert internals not in r.stderr, r.stderr[-2000:]
    # nothing torn, no temporary file, the previous checkpoint and its pointer untouched
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch1.pkl", "latest.json"]
    assert good.read_bytes() == before and latest.read_bytes() == latest_before
    # with room again, the run resumes from that checkpoint and finishes
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 (5 in this run)" in r.stdout  # 5 updates per epoch: it went on from epoch 1's checkpoint
    assert load_checkpoint(run_dir / "epoch2.pkl")["step"] == 10


def test_a_malformed_disk_full_drill_is_named(tmp_path, monkeypatch):
    from accuvqa.files import write_json_atomic

    monkeypatch.setenv("ACCUVQA_DISK_FULL_AFTER", "lots")
    with pytest.raises(ConfigError, match=r"^ACCUVQA_DISK_FULL_AFTER='lots': expected a number of bytes"):
        write_json_atomic(tmp_path / "x.json", {})
    assert not list(tmp_path.iterdir())
