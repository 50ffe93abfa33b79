"""Where a run executes: device, threads, seeds, the process group under torchrun, mixed precision, signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from accuvqa.config import Config, check_batch_split
from accuvqa.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs: device and its place among data-parallel processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and writes files."""
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, set threads and seeds, and join the process group under torchrun."""
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
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
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    check_batch_split(cfg, world_size)
    torch.manual_seed(cfg.SEED)
    np.random.seed(cfg.SEED % 2**32)
    return Runtime(device=device, rank=rank, world_size=world_size)


def mixed_precision(cfg: Config, device: torch.device) -> dict[str, Any]:
    """GradientAccumulator arguments for AMP: autocast dtype, and a GradScaler for fp16."""
    if cfg.AMP == "off":
        return {}
    if cfg.AMP == "fp16":
        if device.type != "cuda":
            raise ConfigError("AMP fp16 needs a CUDA device (gradient scaling); on CPU use AMP bf16 or off")
        return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler("cuda")}
    return {"autocast_dtype": torch.bfloat16}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's model inputs and targets moved to `device` (its `index` stays behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class StopRequest:
    """SIGTERM / SIGINT during training: the first asks the loop to stop after the current update
    (it then saves a resumable checkpoint); a second one stops at once (KeyboardInterrupt).

    Used as a context manager around the loop; handlers are installed only in the main thread.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
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
