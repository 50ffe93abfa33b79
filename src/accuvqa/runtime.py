"""Where a run executes: device, threads, seeds, the process group under torchrun (its timeout, its
shards, its failures), mixed precision, signals. Imports nothing of accuvqa above config; the
`--nproc` launcher is `accuvqa.launch`."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch

from accuvqa.config import Config, check_batch_split
from accuvqa.errors import AccuvqaError, ConfigError
from accuvqa.files import write_json_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")
FAIL_AT = "ACCUVQA_FAIL_AT"  # a rehearsed failure of one process: RANK:UPDATE[:kill|term|term-group] (failure_drill)
_DRILLS = ("raise", "kill", "term", "term-group")


@dataclass
class Runtime:
    """Where this process runs: device and its place among data-parallel processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    fail_at: tuple[int, str] | None = None  # (update, "raise" | "kill"): this process's rehearsed failure

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and writes files."""
        return self.rank == 0


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process, as torchrun announces them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, set threads and seeds, and join the process group under torchrun.

    A collective (gradient all-reduce, barrier, gathering predictions) that waits more than
    DIST_TIMEOUT seconds for another process fails, so a process that hangs ends the job.
    """
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)
    rank, world_size = rank_and_world_size()
    check_batch_split(cfg, world_size)  # before joining: every process says it, none waits for the others
    fail_at = _failure_drill_of(rank)
    if cfg.DEVICE == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.DEVICE)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE {cfg.DEVICE!r}: no CUDA device is available; use DEVICE cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=cfg.DIST_TIMEOUT))
    torch.manual_seed(cfg.SEED)
    np.random.seed(cfg.SEED % 2**32)
    return Runtime(device=device, rank=rank, world_size=world_size, fail_at=fail_at)


def end_process_group() -> None:
    """After a command succeeded under torchrun: wait for every process, then close the process group.

    A process that exits while another still talks to it over gloo can make that one abort
    ("terminate called without an active exception"); a failed command never gets here. A
    DistributedDataParallel model left in a reference cycle still holds the group, so it is collected
    first: the group then closes here, not at a later garbage collection.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- shards

def shard(items: Sequence[T], rt: Runtime) -> Sequence[T]:
    """This process's share of `items`: every world_size-th one from its rank (all of them in one process)."""
    return items[rt.rank::rt.world_size]


def gather(value: T, rt: Runtime) -> list[T]:
    """`value` from every process, in rank order (a collective: every process must call it)."""
    if rt.world_size == 1:
        return [value]
    values: list[Any] = [None] * rt.world_size
    torch.distributed.all_gather_object(values, value)
    return values


# ----------------------------------------------------------------------------- failures

class PeerFailure(AccuvqaError):
    """A collective could not complete: another process of the job failed, was killed, or hangs."""


def _failure_drill_of(rank: int) -> tuple[int, str] | None:
    """(update, how) when ACCUVQA_FAIL_AT names this process; ConfigError for a malformed value."""
    spec = os.environ.get(FAIL_AT, "").strip()
    if not spec:
        return None
    parts = spec.split(":")
    how = parts[2] if len(parts) == 3 else "raise"
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]) or how not in _DRILLS:
        raise ConfigError(f"{FAIL_AT}={spec!r}: expected RANK:UPDATE or RANK:UPDATE:kill (or :term, :term-group), "
                          f"e.g. 1:5 (process 1 raises an error at update 5); unset it to train normally")
    return (int(parts[1]), how) if int(parts[0]) == rank else None


def failure_drill(rt: Runtime, step: int) -> None:
    """Fail as ACCUVQA_FAIL_AT asks, at update `step` (before it runs): raise a RuntimeError, kill this process
    (SIGKILL, as the out-of-memory killer does), or send SIGTERM to it (`term`) or to its whole process group,
    loader workers included (`term-group`, as SLURM and `timeout` do). A rehearsal: does the job end (or stop
    cleanly), and does its last checkpoint resume? (docs/distributed.md)"""
    if rt.fail_at is None or rt.fail_at[0] != step:
        return
    how = rt.fail_at[1]
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how in ("term", "term-group"):
        (os.kill(os.getpid(), signal.SIGTERM) if how == "term" else os.killpg(os.getpgid(0), signal.SIGTERM))
        return
    raise RuntimeError(f"failure drill ({FAIL_AT}): rank {rt.rank} fails at update {step}")


def _is_collective_failure(error: BaseException) -> bool:
    """True for torch.distributed's errors: a peer's connection closed or reset, a collective timed out."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in ("gloo", "NCCL", "c10d")))


def _report_to_launcher(message: str, consequence: bool = False) -> None:
    """Leave `message` where torchrun's failure summary reads it (TORCHELASTIC_ERROR_FILE).

    torchrun names as root cause the failure with the earliest time, in whole seconds (the lowest
    rank on a tie): a `consequence` of another process's failure is dated one second later.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:  # atomically: torchrun may read it at any moment once a process has failed (never a torn file)
            write_json_atomic(path, {"message": message, "timestamp": int(time.time()) + int(consequence)})
        except OSError:
            pass  # the summary then says less; the message is on stderr all the same


def _first_sentence(error: BaseException) -> str:
    """torch.distributed's message without its source location: 'Connection closed by peer [host]:port'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # "[.../gloo/.../pair.cc:553] "
    return re.split(r"\.(?:\s|$)", text, maxsplit=1)[0].strip() or type(error).__name__


@contextmanager
def rank_failures(last_checkpoint: Callable[[], Any] = lambda: None) -> Iterator[None]:
    """In one process of several: the error that ends it names the process (`rank R of W: ...`) and
    reaches torchrun's failure summary; a failed collective becomes one PeerFailure naming the last
    good checkpoint (`last_checkpoint()`, which the caller gives). Outside torchrun: nothing changes."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        yield
        return
    where = f"rank {rank} of {world_size}"
    try:
        yield
    except AccuvqaError as e:
        e.args = (f"{where}: {e.args[0] if e.args else e}", *e.args[1:])
        _report_to_launcher(str(e))
        raise
    except Exception as e:
        if not _is_collective_failure(e):
            _report_to_launcher(f"{where}: {type(e).__name__}: {e}")
            raise
        error = PeerFailure(
            f"{where}: a collective operation failed ({_first_sentence(e)}): another process failed, was killed, or "
            f"hung for DIST_TIMEOUT seconds (its own message and the launcher's summary say which); "
            f"the last good checkpoint is {last_checkpoint() or 'none'}")
        _report_to_launcher(str(error), consequence=True)
        raise error from e


def mixed_precision(cfg: Config, device: torch.device) -> dict[str, Any]:
    """GradientAccumulator arguments for AMP: autocast dtype, and a GradScaler for fp16."""
    if cfg.AMP == "off":
        return {}
    if cfg.AMP == "fp16":
        if device.type != "cuda":
            raise ConfigError("AMP fp16 needs a CUDA device (gradient scaling); on CPU use AMP bf16 or off")
        return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler("cuda")}
    return {"autocast_dtype": torch.bfloat16}


def native_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's bf16 instruction sets (avx512_bf16, amx_bf16) named in `cpuinfo`; [] when none or unknown."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's model inputs and targets moved to `device` (its `index` stays behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class GroupStop(Exception):
    """A data-loading worker died of the stop signal (SIGTERM / SIGINT) that the whole process group received,
    while the loop waited for a batch: the loop saves where it stands and stops, as on the signal alone."""


class StopRequest:
    """SIGTERM / SIGINT during training: the first asks the loop to stop after the current update
    (it then saves a resumable checkpoint); a second one stops at once (KeyboardInterrupt).

    Used as a context manager around the loop; handlers are installed only in the main thread.
    `StopRequest.received` holds the signal while one is pending in this process (the loader reads it).
    """

    received: int | None = None

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        StopRequest.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        StopRequest.received = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = StopRequest.received = signum
        log.warning("%s received: finishing the current update, then saving a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def requested(self, rt: Runtime) -> bool:
        """True when a stop was asked for, in any process (all processes stop at the same update)."""
        asked = self.signum is not None
        if rt.world_size > 1:
            flag = torch.tensor([float(asked)], device=rt.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
            if asked and self.signum is None:
                self.signum = signal.SIGTERM  # another process was signalled
        return asked
