"""`accuvqa train --nproc N`: the same command in N processes on this machine, through torchrun's
launcher; and the command-line rewriting it needs (an option taken off a command line)."""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from accuvqa.checkpoint import latest_checkpoint
from accuvqa.config import Config, check_batch_split
from accuvqa.errors import AccuvqaError, ConfigError
from accuvqa.runtime import rank_and_world_size


class JobFailed(AccuvqaError):
    """A process of a job started by `--nproc` failed: the job ends with that process's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """The command line less `option VALUE` (or `option=VALUE`), wherever it stands."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line less its `--nproc N` (or `--nproc=N`): what each launched process runs."""
    return without_option(argv, "--nproc")


def launch(nproc: int, argv: Sequence[str], cfg: Config, run_here: Callable[[list[str]], int]) -> int:
    """`accuvqa train --nproc N ...`: the same command in N processes on this machine, through
    torchrun's launcher (`torchrun --standalone --nproc_per_node N -m accuvqa ...`); with N = 1,
    `run_here(argv)` (the command line's runner) runs it in this process.

    When a process fails, the launcher stops the others (SIGTERM, SIGKILL 30 s later) and this
    raises JobFailed naming the process that failed first, how, and the last good checkpoint.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (the number of processes to train with), got {nproc}")
    if rank_and_world_size()[1] > 1:
        raise ConfigError("--nproc starts its own processes: under torchrun (or another launcher) leave it out")
    check_batch_split(cfg, nproc)
    if nproc == 1:
        return run_here(list(argv))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    # torchrun sets 1 thread per process (with a warning) when OMP_NUM_THREADS is unset: share the cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    args = parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "accuvqa", *argv])
    try:
        torchrun(args)
    except SignalException as e:  # the launcher was signalled: the processes got the same signal
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            name = failure.signal_name()
            how = f"rank {rank} of {nproc} was killed by {name}" + (
                " (often the out-of-memory killer, see dmesg)" if name == "SIGKILL" else "")
            code = 128 - failure.exitcode
        else:
            said = failure.message if isinstance(failure.message, str) and failure.message.startswith("rank ") else ""
            how = said or f"rank {rank} of {nproc} exited with code {failure.exitcode} (its message is above)"
            code = failure.exitcode
        last = latest_checkpoint(cfg.CKPTS_PATH, cfg.run_version)
        raise JobFailed(f"{how}; the other processes were stopped; the last good checkpoint is {last or 'none'}"
                        + ("; continue with --RESUME True (on any number of processes)" if last else ""),
                        code) from None
    return 0
