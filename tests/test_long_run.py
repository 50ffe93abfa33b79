"""Long runs: memory does not grow across epochs; a data-loading worker that dies or fails is one clear
error, at once, never a hang; workers take nothing from the global RNG."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.features import feature_file
from accuvqa.data.loader import batch_loader, eval_batches, make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.errors import DataError
from conftest import ROOT, TINY, write_vqa_layout

# ----------------------------------------------------------------------------- memory

# Trains in a subprocess (its RSS is the run's own) and prints VmRSS after each epoch, sampled when
# train() logs "epoch N: ...".
_RSS_CHILD = r"""
import json, logging, re, sys
from accuvqa.config import load_config
from accuvqa.train import train

def vm_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

rss = []
class AfterEpoch(logging.Handler):
    def emit(self, record):
        if re.match(r"epoch \d+:", record.getMessage()):
            rss.append(vm_rss())

log = logging.getLogger("accuvqa.train")
log.setLevel(logging.INFO)
log.addHandler(AfterEpoch())
log.propagate = False
summary = train(load_config(sys.argv[1], json.loads(sys.argv[2])))
print(json.dumps({"rss": rss, "updates": summary["updates"]}))
"""

# Growth allowed between the end of epoch 2 and the end of epoch 5 (3 x 132 = 396 updates): 3 MiB, about
# 8 KiB per update, half of one batch here (16 x 5 regions x 32 floats, plus questions and answer
# scores: ~16 KiB). Measured on a 2-core machine: +0.07 to +0.21 MiB (RSS ~330 MiB). Keeping every
# batch grows it by ~6.5 MiB, keeping every loss with its autograd graph by ~55 MiB: both fail.
RSS_GROWTH_BOUND = 3 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
@pytest.mark.parametrize("workers", [0, 2])
def test_memory_does_not_grow_across_epochs(easyvqa_slice, tmp_path, workers):
    overrides = {
        **TINY, "NUM_THREADS": 1,  # 1: 2 threads on 2 busy cores are several times slower
        "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "PRELOAD": False,  # the packed features memory-mapped and read every batch, as a VQA v2 run does
        "NUM_WORKERS": workers, "BATCH_SIZE": 16, "MAX_EPOCH": 5, "EVAL_EVERY_EPOCH": False,
        "CKPTS_PATH": str(tmp_path / "ck"), "RESULT_PATH": str(tmp_path / "res")}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(ROOT / "configs/easyvqa.yml"),
                           json.dumps(overrides)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    rss = out["rss"]
    assert len(rss) == 5 and out["updates"] == 5 * 132, out  # one sample per epoch
    growth = rss[-1] - rss[1]
    assert growth < RSS_GROWTH_BOUND, (
        f"RSS grew by {growth / 2**20:.2f} MiB over epochs 3-5 ({3 * 132} updates); "
        f"per epoch (MiB): {[round(r / 2**20, 2) for r in rss]}")


# ----------------------------------------------------------------------------- worker processes

@pytest.fixture
def layout(tmp_path):
    """(config with NUM_WORKERS 2, dataset of 50 questions read from the packed store, 10 batches of 5)."""
    paths = write_vqa_layout(tmp_path, images_per_split=10)
    cfg = load_config(overrides={
        "DATASET_PATH": paths["DATASET_PATH"], "FEATURE_PATH": paths["FEATURE_PATH"], "IMG_FEAT_SIZE": 12,
        "IMG_FEAT_PAD_SIZE": 9, "PRELOAD": False, "VERBOSE": False, "NUM_WORKERS": 2})
    records = load_records(cfg, "train", need_answers=True)
    dataset = make_dataset(cfg, records, build_vocab(cfg, records))
    return cfg, dataset, eval_batches(len(dataset), 5)


class Fails:
    """The dataset, except that the worker loading the batch holding sample `at` does `what` first."""

    def __init__(self, dataset, at: int, what: str, delay: float = 0.0, marker=None) -> None:
        self.dataset, self.at, self.what, self.delay, self.marker = dataset, int(at), what, delay, marker
        self.main_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        if self.at in list(indices):
            assert os.getpid() != self.main_pid, "meant to run in a worker"
            time.sleep(self.delay)  # the worker's own work on the batch, not a synchronisation
            if self.marker is not None:
                self.marker.write_text(str(os.getpid()))  # the test waits for this, then for the death
            if self.what == "exit":
                os._exit(3)
            os.kill(os.getpid(), getattr(signal, self.what))
        return self.dataset[indices]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the loader hangs")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def workers_left():
    """() -> the worker processes started since the test began and still running; none at its end."""
    before = set(multiprocessing.active_children())

    def left() -> set:
        return set(multiprocessing.active_children()) - before
    yield left
    assert not left()


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _one_line(message: str, how: str) -> None:
    assert "\n" not in message
    assert re.fullmatch(rf"a data-loading worker \(pid \d+\) {how} at batch \d+ of 10.*; "
                        r"rerun with NUM_WORKERS 0 to see the error in the main process", message), message


def test_a_worker_killed_while_the_main_process_computes_is_a_data_error_at_once(layout, workers_left):
    cfg, dataset, batches = layout
    # worker 1 loads batches 1 and 3; it is killed 0.5 s into batch 3, while the main process is busy
    # with batch 0 (a long update): the error comes out of that update, not after it
    loader = batch_loader(Fails(dataset, at=batches[3][0], what="SIGKILL", delay=0.5), batches, cfg)
    updates_finished = 0
    with deadline(60), pytest.raises(DataError) as err:
        for _ in loader:
            time.sleep(30)  # a long update (not a synchronisation): the death must interrupt it
            updates_finished += 1
    assert updates_finished == 0  # the error came out of the first update, not after it
    _one_line(str(err.value), "was killed by signal SIGKILL")
    assert "out-of-memory killer" in str(err.value)
    loader.close()


def test_a_worker_that_exits_is_a_data_error_at_once(layout, workers_left):
    cfg, dataset, batches = layout
    with deadline(60), pytest.raises(DataError) as err:  # the deadline only guards against a hang
        list(batch_loader(Fails(dataset, at=batches[2][0], what="exit"), batches, cfg))
    _one_line(str(err.value), "exited with code 3")
    assert not workers_left()  # stopped when the error reached the caller, not when it is collected


def test_a_data_error_in_a_worker_reaches_the_caller_as_itself(layout, workers_left):
    cfg, dataset, batches = layout
    # the image of batch 4 loses its region boxes; a model that reads boxes (MMNasNet) gets a DataError
    # naming the image when that batch is read
    image_id = dataset.image_ids[dataset.question_row[batches[4][0]]]
    path = feature_file(cfg.FEATURE_PATH, "train2014", image_id)
    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files if k != "bbox"}
    np.savez(path, **kept)
    boxes = cfg.replace(MODEL_USE="mmnasnet")
    dataset = make_dataset(boxes, dataset.questions, dataset.questions.vocab)  # packs the changed folder again
    with pytest.raises(DataError) as in_process:
        list(batch_loader(dataset, batches, boxes.replace(NUM_WORKERS=0)))
    with deadline(60), pytest.raises(DataError) as in_worker:
        list(batch_loader(dataset, batches, boxes))
    assert type(in_worker.value) is type(in_process.value)
    assert str(in_worker.value) == str(in_process.value)  # one line, not the worker's traceback
    assert f"train2014.packed holds no boxes for image {image_id}" in str(in_worker.value)
    assert "\n" not in str(in_worker.value)
    assert "Traceback" in str(in_worker.value.__cause__)  # kept for ACCUVQA_DEBUG


def test_ctrl_c_is_left_to_the_main_process(layout):
    # Ctrl-C reaches the whole process group: the workers go on; the main process decides (it
    # finishes its update and saves a checkpoint)
    cfg, dataset, batches = layout
    with deadline(60):
        loaded = list(batch_loader(Fails(dataset, at=batches[2][0], what="SIGINT"), batches, cfg))
    assert len(loaded) == len(batches)
    assert torch.equal(loaded[2]["img_feat"], dataset[batches[2]]["img_feat"])


def test_a_worker_ended_by_sigterm_is_reported_at_the_next_batch_not_during_an_update(layout, workers_left,
                                                                                     tmp_path):
    # a worker killed by SIGTERM (not sent to this process): the main process, busy with an update, is not
    # interrupted; asking for another batch reports the death (a SIGTERM to the whole group, this process
    # included, is a clean stop instead: tests/test_stop_and_continue.py)
    cfg, dataset, batches = layout
    marker = tmp_path / "dying"
    loader = batch_loader(Fails(dataset, at=batches[3][0], what="SIGTERM", delay=0.5, marker=marker), batches, cfg)
    with deadline(60):
        next(loader)
        while not marker.exists():  # the update during which the worker dies: wait for the death itself
            time.sleep(0.01)
        pid = int(marker.read_text())
        while _alive(pid):
            time.sleep(0.01)
        with pytest.raises(DataError) as err:
            list(loader)
    _one_line(str(err.value), "was killed by signal SIGTERM")


_EXIT_WITH_LOADER = r"""
import sys
import numpy as np
from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader

class Numbers:
    def __len__(self):
        return 100
    def __getitem__(self, indices):
        return {"x": np.asarray(indices)}

batches = [np.arange(i, i + 5) for i in range(0, 100, 5)]
KEPT = batch_loader(Numbers(), batches, load_config(overrides={"NUM_WORKERS": 2}))
next(KEPT)
sys.exit(0)  # with the workers running: they are ended with SIGTERM and waited for
"""


def test_a_process_exits_with_its_loader_running():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", _EXIT_WITH_LOADER], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


class WorkerSeed:
    """Each batch: the torch seed of the process that loads it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, indices):
        return {"seed": torch.tensor(torch.initial_seed())}


def test_workers_take_nothing_from_the_global_rng_and_their_seeds_follow_seed(layout):
    cfg, _, _ = layout
    batches = eval_batches(8, 2)
    before = torch.get_rng_state()
    seeds = [b["seed"].item() for b in batch_loader(WorkerSeed(), batches, cfg)]
    assert torch.equal(torch.get_rng_state(), before)  # dropout draws the same numbers as NUM_WORKERS 0
    assert seeds == [b["seed"].item() for b in batch_loader(WorkerSeed(), batches, cfg)]
    assert seeds == [b["seed"].item() for b in batch_loader(WorkerSeed(), batches, cfg, seed=cfg.SEED)]
    assert seeds != [b["seed"].item() for b in batch_loader(WorkerSeed(), batches, cfg, seed=cfg.SEED + 1)]
    assert seeds != [b["seed"].item() for b in batch_loader(WorkerSeed(), batches, cfg.replace(SEED=cfg.SEED + 1))]
