"""Under DistributedDataParallel (2 gloo processes on CPU): the engine's update equals one process's;
`train()`, `val` and `test` under torchrun and `accuvqa train --nproc` give one process's results; a run
resumes on another number of processes; a failing, killed or hung process ends the job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from accuvqa.accumulate import GradientAccumulator
from accuvqa.checkpoint import load_checkpoint, load_trained
from accuvqa.cli import run as cli_run
from accuvqa.config import load_config
from accuvqa.data.loader import make_dataset
from accuvqa.data.records import load_split
from accuvqa.errors import ConfigError
from accuvqa.evaluate import run_eval
from accuvqa.models import model_inputs
from accuvqa.launch import without_nproc
from accuvqa.runtime import PeerFailure, end_process_group, gather, rank_failures, setup_runtime
from accuvqa.train import train
from conftest import ROOT, TINY, cli_overrides, run_cli, write_vqa_layout
from float64_runs import FLOAT64_ENV, float64_training

N, FEATURES, TOKENS = 13, 6, 5  # 13 samples: each rank's share (7, 6) splits unevenly
# Every comparison of runs here is in float64 (tests/float64_runs.py), where processes and micro-batches change
# only the summation order: the engine's gradient differs from one process's by 2.3e-16 relative at most, whole
# runs' val logits (|logit| <= 2.5) by 5.3e-13 at most (measured, AMD EPYC, torch 2.13). In float32 the same runs
# drift apart by 1e-4 after two epochs, by an amount that depends on the CPU: no float32 bound tests exactness.
EXACT = 1e-12  # relative, the engine's gradient and loss: a margin of 4,000; the controls miss by >= 1.7e-2
RUN_EXACT = 1e-9  # absolute, logits of whole runs: a margin of 1,900; one update fewer moves them by 0.28
# Waits end on an event (a file appears, a process exits); a deadline only turns a hang into a failure, far
# above what a loaded 2-core machine takes, never a speed bound.
DEADLINE = 300


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, TOKENS)).double()


def make_batch() -> dict:
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(N, TOKENS, generator=gen) < 0.5).double()
    mask[:, 0] = 1
    return {"x": torch.randn(N, FEATURES, generator=gen, dtype=torch.float64),
            "y": torch.rand(N, TOKENS, generator=gen, dtype=torch.float64), "mask": mask}


def token_loss(model, batch):
    per_item = F.binary_cross_entropy_with_logits(model(batch["x"]), batch["y"], reduction="none")
    return (per_item * batch["mask"]).sum(), batch["mask"].sum()


class Recorder(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def _accumulate_share(rank: int, world: int, out_dir: str, reduction: str, micro_batches: int) -> None:
    """One process's share through DDP and the accumulator; what it computed saved to out_dir. DDP (which holds
    the process group) is freed on return, before the group is closed."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = Recorder(model.parameters())
    calls = []
    orig_reducer_hook = ddp.require_backward_grad_sync
    batch = make_batch()
    share = {k: v.tensor_split(world)[rank] for k, v in batch.items()}

    def counting_loss(m, piece):
        calls.append(ddp.require_backward_grad_sync)  # False inside no_sync()
        return token_loss(m, piece)

    acc = GradientAccumulator(ddp, opt, micro_batches=micro_batches, reduction=reduction)
    result = acc.step(share, counting_loss)
    torch.save({"grads": opt.seen[0], "loss": result.loss, "n_items": result.n_items,
                "sync_flags": calls, "initial_flag": orig_reducer_hook},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, world: int, init_file: str, out_dir: str, reduction: str, micro_batches: int):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _accumulate_share(rank, world, out_dir, reduction, micro_batches)
        end_process_group()  # what a command does: collect DDP's reducer, wait for the other process, close gloo
    finally:
        if dist.is_initialized():  # the share failed: close the group anyway
            dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path, reduction):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), reduction, 3),
                       nprocs=2, join=True, start_method="spawn")
    model, batch = make_model(), make_batch()
    loss_sum, items = token_loss(model, batch)
    loss = loss_sum / items if reduction == "mean" else loss_sum
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    scale = max(float(w.abs().max()) for w in want)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        diff = max(float((g - w).abs().max()) for g, w in zip(got["grads"], want)) / scale
        assert diff <= EXACT, diff
        assert float(got["n_items"]) == float(items)  # item count all-reduced: global window
        assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=EXACT)
        assert got["sync_flags"] == [False, False, True]  # all-reduce on the last micro-batch only
    # control: DistributedDataParallel's own rule (each process normalises its share alone, the gradients are
    # averaged) misses the one-process gradient by far more than the bound (unequal shares 7 and 6, masked items)
    averaged = [torch.zeros_like(w) for w in want]
    for share in zip(*(v.tensor_split(2) for v in batch.values())):
        model.zero_grad()
        share_sum, share_items = token_loss(model, dict(zip(batch, share)))
        (share_sum / share_items if reduction == "mean" else share_sum / 2).backward()
        averaged = [a + p.grad / (2 if reduction == "mean" else 1) for a, p in zip(averaged, model.parameters())]
    assert max(float((a - w).abs().max()) for a, w in zip(averaged, want)) / scale > 1e6 * EXACT


# ----------------------------------------------------------------------------- train() and evaluation under torchrun
# 2 gloo processes on CPU, started as a user starts them: `accuvqa train --nproc 2` and `torchrun -m accuvqa`.

RUN = {"BATCH_SIZE": 4, "MAX_EPOCH": 2, "DROPOUT_R": 0.0, "LR_BASE": 0.003, "IMG_FEAT_SIZE": 12,
       "NUM_THREADS": 1, "VERBOSE": True}  # 50 train questions: 12 updates per epoch
UPDATES_PER_EPOCH = 12


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict:
    """The tiny VQA v2 layout: 50 questions per split, each answer 10 times in train."""
    return write_vqa_layout(tmp_path_factory.mktemp("layout"), images_per_split=10)


def _cfg(layout: dict, root: Path, version: str, **changes):
    return load_config(overrides={**TINY, **RUN, "DATASET_PATH": layout["DATASET_PATH"],
                                  "FEATURE_PATH": layout["FEATURE_PATH"], "CKPTS_PATH": str(root / "ck"),
                                  "RESULT_PATH": str(root / "res"), "VERSION": version, **changes})


def _args(cfg) -> list[str]:
    """The command-line overrides that give `cfg` (the keys this file sets)."""
    keys = [*TINY, *RUN, "DATASET_PATH", "FEATURE_PATH", "CKPTS_PATH", "RESULT_PATH", "VERSION", "EVAL_EVERY_EPOCH"]
    return cli_overrides({k: getattr(cfg, k) for k in dict.fromkeys(keys)})


def _torchrun(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m accuvqa ARGS`."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "accuvqa", *args], cwd=cwd, capture_output=True, text=True, timeout=DEADLINE,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})


def _nproc2(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accuvqa train --nproc 2 ARGS`."""
    return run_cli("train", "--nproc", "2", *args, cwd=cwd, env=env)


@torch.no_grad()
def _val_logits(cfg, checkpoint: Path) -> torch.Tensor:
    """The model's logits on every val question (held out from training), in one batch."""
    model, vocab, _, _ = load_trained(cfg.replace(CKPT_PATH=str(checkpoint)), torch.device("cpu"))
    dataset = make_dataset(cfg, load_split(cfg.DATASET_PATH, "val", need_answers=True), vocab)
    return model.eval()(*model_inputs(cfg, dataset[list(range(len(dataset)))]))


@pytest.fixture(scope="module")
def uninterrupted(layout, tmp_path_factory) -> dict:
    """One process, never stopped, in float64: its config and its val logits after update 23 and after epoch 2
    (update 24). CKPT_EVERY_STEPS 23 only saves the one before the last."""
    root = tmp_path_factory.mktemp("whole")
    cfg = _cfg(layout, root, "whole", CKPT_EVERY_STEPS=2 * UPDATES_PER_EPOCH - 1)
    run_dir = root / "ck/ckpt_whole"
    with float64_training():
        train(cfg)
        logits = {"one update fewer": _val_logits(cfg, run_dir / f"step{2 * UPDATES_PER_EPOCH - 1}.pkl"),
                  "final": _val_logits(cfg, run_dir / "epoch2.pkl")}
    assert logits["final"].dtype == torch.float64
    return {"cfg": cfg.replace(CKPT_EVERY_STEPS=0), **logits}


def _assert_outputs_match(got: torch.Tensor, uninterrupted: dict) -> float:
    """got equals the uninterrupted run's final outputs within RUN_EXACT, while one update fewer (the control)
    moves them by far more."""
    assert got.dtype == torch.float64
    diff = float((got - uninterrupted["final"]).abs().max())
    assert diff <= RUN_EXACT, diff
    assert float((uninterrupted["final"] - uninterrupted["one update fewer"]).abs().max()) > 1e4 * RUN_EXACT
    return diff


@pytest.mark.slow
def test_two_processes_evaluate_val_and_test_exactly_as_one(uninterrupted, tmp_path):
    ckpt = {"CKPTS_PATH": uninterrupted["cfg"].CKPTS_PATH, "CKPT_VERSION": "whole", "CKPT_EPOCH": 2}
    one = uninterrupted["cfg"].replace(RESULT_PATH=str(tmp_path / "one"), TEST_SAVE_PRED=True, **ckpt)
    with float64_training():  # the checkpoint is float64: both evaluations run in float64
        for split in ("val", "test"):
            run_eval(one, split)
    two = one.replace(RESULT_PATH=str(tmp_path / "two"))
    for split in ("val", "test"):  # torchrun -m accuvqa, as a user writes it
        r = _torchrun(split, *_args(two), *cli_overrides({"TEST_SAVE_PRED": True, **ckpt}), cwd=tmp_path,
                      env=FLOAT64_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("checkpoint") == 1  # one summary table, the first process's
    for name in ("result_val_pred.json", "result_test.json"):  # 13 batches of 4: 7 on rank 0, 6 on rank 1
        assert (tmp_path / "two/whole" / name).read_bytes() == (tmp_path / "one/whole" / name).read_bytes(), name
    lines = [(tmp_path / run / "whole/metrics.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(lines[1]) == 1  # written once; the test split has no answers, no line
    assert json.loads(lines[1][0]) == json.loads(lines[0][0])  # accuracy, per type, loss: the same numbers


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes(layout, uninterrupted, tmp_path):
    cfg = _cfg(layout, tmp_path, "grow", EVAL_EVERY_EPOCH=True)
    with float64_training():
        train(cfg.replace(MAX_EPOCH=1))
    r = _nproc2(*_args(cfg), "--RESUME", "True", cwd=tmp_path, env=FLOAT64_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {tmp_path}/ck/ckpt_grow/epoch1.pkl" in r.stderr
    assert f"updates            {2 * UPDATES_PER_EPOCH} ({UPDATES_PER_EPOCH} in this run)" in r.stdout
    assert "BATCH_SIZE 4 = 2 x 1 x 2" in r.stdout
    with float64_training():
        _assert_outputs_match(_val_logits(cfg, tmp_path / "ck/ckpt_grow/epoch2.pkl"), uninterrupted)
    # the per-epoch evaluation ran in both processes and was logged once, by the first
    lines = [json.loads(x) for x in (tmp_path / "res/grow/metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["step"]) for x in lines] == [(1, 12), (2, 24)]


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_and_its_last_checkpoint_resumes_on_one_process(layout, uninterrupted, tmp_path):
    # DIST_TIMEOUT (3600 s) far above the run's deadline (run_cli's 300 s): had rank 0 waited for the lost peer
    # until its collective timed out, the run would miss the deadline; it notices the closed connection instead
    cfg = _cfg(layout, tmp_path, "crash", EVAL_EVERY_EPOCH=False)
    fail_at = UPDATES_PER_EPOCH + 4  # in epoch 2, after epoch 1's checkpoint
    r = _nproc2(*_args(cfg), "--DIST_TIMEOUT", "3600", cwd=tmp_path,
                env={**FLOAT64_ENV, "ACCUVQA_FAIL_AT": f"1:{fail_at}"})
    assert r.returncode == 1, r.stderr[-3000:]  # the failed process's exit code (an uncaught error)
    run_dir = tmp_path / "ck/ckpt_crash"
    last_line = r.stderr.strip().splitlines()[-1]
    assert last_line == (f"accuvqa: error: rank 1 of 2: RuntimeError: failure drill (ACCUVQA_FAIL_AT): rank 1 fails "
                         f"at update {fail_at}; the other processes were stopped; the last good checkpoint is "
                         f"{run_dir}/epoch1.pkl; continue with --RESUME True (on any number of processes)")
    assert "accuvqa: error: rank 0 of 2: a collective operation failed (" in r.stderr
    assert "Timed out" not in r.stderr  # noticed, not waited for
    # the last good checkpoint is intact: named by latest.json, loads, and holds epoch 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch1.pkl", "latest.json"]
    assert json.loads((run_dir / "latest.json").read_text())["checkpoint"] == "epoch1.pkl"
    state = load_checkpoint(run_dir / "epoch1.pkl")
    assert (state["epoch"], state["step"]) == (1, UPDATES_PER_EPOCH)
    # ... and the run goes on in one process to the uninterrupted run's model
    with float64_training():
        summary = train(cfg.replace(RESUME=True))
        assert (summary["updates"], summary["updates_run"]) == (2 * UPDATES_PER_EPOCH, UPDATES_PER_EPOCH)
        _assert_outputs_match(_val_logits(cfg, run_dir / "epoch2.pkl"), uninterrupted)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_its_signal(layout, tmp_path):
    # DIST_TIMEOUT (3600 s) far above the run's deadline (run_cli's 300 s): the job ends on the death, not a timeout
    cfg = _cfg(layout, tmp_path, "killed", EVAL_EVERY_EPOCH=False)
    r = _nproc2(*_args(cfg), "--DIST_TIMEOUT", "3600", cwd=tmp_path, env={"ACCUVQA_FAIL_AT": "1:3:kill"})
    assert r.returncode == 128 + signal.SIGKILL, r.stderr[-3000:]
    assert "Timed out" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "accuvqa: error: rank 1 of 2 was killed by SIGKILL (often the out-of-memory killer, see dmesg); the other "
        "processes were stopped; the last good checkpoint is none")
    assert not (tmp_path / "ck/ckpt_killed").exists()


def _hung_peer_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 1 joins the group, then never enters the collective that rank 0 waits in."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    rt = setup_runtime(load_config(overrides={"DIST_TIMEOUT": 2, "NUM_THREADS": 1, "BATCH_SIZE": 2}))
    result = Path(out_dir) / "rank0.json"
    if rank == 1:
        _wait_for_file(result)
        return
    started = time.monotonic()
    try:
        with rank_failures(lambda: "ck/epoch3.pkl"):
            gather("answers", rt)
        error = None
    except PeerFailure as e:
        error = str(e)
    result.write_text(json.dumps({"error": error, "seconds": time.monotonic() - started}))


@pytest.mark.slow
def test_a_hung_peer_fails_the_collective_after_dist_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_hung_peer_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = json.loads((tmp_path / "rank0.json").read_text())
    # it waited DIST_TIMEOUT (2 s) at least: a lower bound no load can break; what ended the wait is in the message
    assert got["error"] is not None and got["seconds"] >= 2.0, got
    assert got["error"].startswith("rank 0 of 2: a collective operation failed (Timed out waiting 2000ms")
    assert got["error"].endswith("hung for DIST_TIMEOUT seconds (its own message and the launcher's summary say "
                                 "which); the last good checkpoint is ck/epoch3.pkl")


def _wait_for_file(path: Path, deadline: float = DEADLINE) -> None:
    """Poll until `path` exists; RuntimeError after `deadline` seconds (a hang, never a speed bound)."""
    give_up = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > give_up:
            raise RuntimeError(f"{path} did not appear within {deadline} s")
        time.sleep(0.01)


def _train_worker(rank: int, port: int, overrides: dict, out_dir: str) -> None:
    """train() as torchrun runs it, recording which process writes checkpoints and, on the other process, which
    checkpoint files exist when it enters and when it leaves each barrier.

    The first process writes its n-th checkpoint only once the other has entered its n-th barrier (it leaves a
    file `rank1_waits<n>` on the way in): a process that did not wait for the file would leave that barrier
    without it; one that never waited would leave the first process waiting (and this test failing at DEADLINE).
    """
    import accuvqa.train as train_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    signals = Path(out_dir)
    run_dir = Path(overrides["CKPTS_PATH"]) / f"ckpt_{overrides['VERSION']}"
    writes, barriers = [], []
    real_save, real_barrier = train_module.save_run_checkpoint, dist.barrier

    def checkpoints() -> list[str]:
        return sorted(p.name for p in run_dir.glob("*.pkl")) if run_dir.is_dir() else []

    def save(cfg, path, state):
        writes.append(path.name)
        _wait_for_file(signals / f"rank1_waits{len(writes)}")
        return real_save(cfg, path, state)

    def barrier(*args, **kwargs):
        if rank == 0:
            return real_barrier(*args, **kwargs)
        entered = checkpoints()
        (signals / f"rank1_waits{len(barriers) + 1}").touch()
        real_barrier(*args, **kwargs)
        barriers.append({"entered": entered, "left": checkpoints()})

    train_module.save_run_checkpoint = save
    dist.barrier = barrier
    summary = train_module.train(load_config(overrides=overrides))
    on_disk = Path(summary["checkpoint"]).is_file()  # when train() returns, its last checkpoint exists
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"writes": writes, "barriers": barriers,
                                                             "on_disk": on_disk}))
    end_process_group()


@pytest.mark.slow
def test_under_torchrun_only_the_first_process_writes_checkpoints_and_all_wait_for_them(layout, tmp_path):
    cfg = _cfg(layout, tmp_path, "ranks", EVAL_EVERY_EPOCH=False, CKPT_EVERY_STEPS=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {k: getattr(cfg, k) for k in dict.fromkeys([*TINY, *RUN, "DATASET_PATH", "FEATURE_PATH",
                                                              "CKPTS_PATH", "RESULT_PATH", "VERSION",
                                                              "EVAL_EVERY_EPOCH", "CKPT_EVERY_STEPS"])}
    mp.start_processes(_train_worker, args=(port, overrides, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = ["step5.pkl", "step10.pkl", "epoch1.pkl", "step15.pkl", "step20.pkl", "epoch2.pkl"]
    assert ranks[0]["writes"] == names
    assert ranks[1]["writes"] == []
    # the other process waited for each checkpoint: absent when it entered the barrier, on disk when it left
    for name, seen in zip(names, ranks[1]["barriers"]):
        assert name not in seen["entered"] and name in seen["left"], (name, seen)
    assert len(ranks[1]["barriers"]) == len(names)  # train()'s barriers, before end_process_group's
    assert ranks[0]["on_disk"] and ranks[1]["on_disk"]


def test_a_batch_size_that_does_not_split_over_the_processes_is_one_error_before_any_process_waits(
        layout, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"^BATCH_SIZE \(5\) must be divisible by the number of processes \(2\)"):
        train(_cfg(layout, tmp_path, "odd", BATCH_SIZE=5))
    assert not dist.is_initialized()  # it did not join (and wait for) a process group
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match=r"^BATCH_SIZE \(5\) must be divisible by the number of processes \(2\)"):
        cli_run(["train", "--nproc", "2", *_args(_cfg(layout, tmp_path, "odd", BATCH_SIZE=5))])  # before starting any


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_a_clear_error(nproc):
    with pytest.raises(ConfigError, match=rf"^--nproc must be at least 1 \(the number of processes to train with\), "
                                          rf"got {nproc}$"):
        cli_run(["train", "--nproc", nproc])


def test_the_launched_processes_get_the_command_line_less_nproc():
    assert without_nproc(["train", "--nproc", "2", "--BATCH_SIZE", "8", "--nproc=4", "--VERSION", "a"]) == [
        "train", "--BATCH_SIZE", "8", "--VERSION", "a"]


@pytest.mark.parametrize("value", ["1", "x:3", "1:3:explode", "1:2:3:4"])
def test_a_malformed_failure_drill_is_named(value, monkeypatch):
    monkeypatch.setenv("ACCUVQA_FAIL_AT", value)
    with pytest.raises(ConfigError, match=rf"^ACCUVQA_FAIL_AT='{value}': expected RANK:UPDATE or RANK:UPDATE:kill"):
        setup_runtime(load_config(overrides={"NUM_THREADS": 1}))
