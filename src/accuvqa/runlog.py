"""What a run records beside its checkpoints, and how long work shows progress.

Under `<RESULT_PATH>/<VERSION>/`, on the first process only:
- `config.yml`: the resolved config (loads back with `--config` to the same config);
- `log.txt`: the run's log lines (start, progress every LOG_EVERY_STEPS updates, epochs with
  their evaluations and checkpoints, warnings, how it ended), appended, never truncated;
- TensorBoard event files, when the `tensorboard` extra is installed (`pip install accuvqa[tensorboard]`).

`print_table` prints the summary a command ends with (`append_log` keeps it in log.txt too);
`progress` is a tqdm bar on a terminal and one plain line every N steps elsewhere (a log file, CI).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

import yaml

from accuvqa.config import Config
from accuvqa.files import atomic_write

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def run_dir(cfg: Config) -> Path:
    """<RESULT_PATH>/<VERSION>: where a run's metrics, config, log and events live."""
    return Path(cfg.RESULT_PATH) / cfg.run_version


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key with its meaning as a comment."""
    from accuvqa.config_doc import meaning

    lines = [f"# resolved config of run {cfg.run_version}; loads back with --config FILE"]
    for key, value in cfg.to_dict().items():
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=2**31).strip()[1:-1]  # "{K: v}"
        about = meaning(key, cfg.MODEL_USE)
        lines.append(f"{text}  # {about}" if about else text)
    return "\n".join(lines) + "\n"


def save_config(cfg: Config) -> Path:
    """Write <run dir>/config.yml atomically."""
    return atomic_write(run_dir(cfg) / "config.yml", lambda f: f.write(config_yaml(cfg).encode()))


def print_table(title: str, rows: dict[str, Any]) -> list[str]:
    """Print a title line, then `  key   value` rows: the summaries the commands print; return the lines."""
    lines = [title, *(f"  {key:<18} {value}" for key, value in rows.items())]
    print("\n".join(lines))
    return lines


def append_log(cfg: Config, lines: Iterable[str]) -> None:
    """Append timestamped lines to the run's log.txt (e.g. the summary a command prints)."""
    path = run_dir(cfg) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a") as f:
        f.writelines(f"{stamp} INFO {line}\n" for line in lines)


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class RunLog:
    """A training run's config.yml, log.txt and TensorBoard events; inert when `enabled` is False.

    Used as a context manager around the training loop: entering writes config.yml and starts
    copying the `accuvqa` loggers' lines into log.txt; leaving notes how the run ended and closes both.
    """

    def __init__(self, cfg: Config, enabled: bool, start_step: int = 0) -> None:
        self.cfg, self.enabled, self.start_step = cfg, enabled, start_step
        self.writer: Any = None
        self._handler: logging.Handler | None = None
        self._level = logging.NOTSET

    def __enter__(self) -> "RunLog":
        if not self.enabled:
            return self
        save_config(self.cfg)
        self._handler = logging.FileHandler(run_dir(self.cfg) / "log.txt", mode="a")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self._handler.setLevel(logging.INFO)
        package = logging.getLogger("accuvqa")
        package.addHandler(self._handler)
        self._level = package.level
        if not package.isEnabledFor(logging.INFO):  # log.txt is complete whatever VERBOSE says
            package.setLevel(logging.INFO)
        # an exact resume starts after its checkpoint's update: later events of the stopped run are hidden
        self.writer = _summary_writer(run_dir(self.cfg), self.start_step + 1 if self.cfg.RESUME else None)
        self.note(f"run {self.cfg.run_version} {'resumes at update ' + str(self.start_step) if self.cfg.RESUME else 'starts'}"
                  f"; config {run_dir(self.cfg) / 'config.yml'}; TensorBoard events "
                  f"{'written' if self.writer is not None else 'off (pip install accuvqa[tensorboard])'}")
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if not self.enabled:
            return
        if exc is None:
            self.note(f"run {self.cfg.run_version} finished")
        elif isinstance(exc, Exception):
            self.note(f"run {self.cfg.run_version} ended: {type(exc).__name__}: {exc}")
        else:
            self.note(f"run {self.cfg.run_version} interrupted ({type(exc).__name__})")
        if self.writer is not None:
            self.writer.close()
        package = logging.getLogger("accuvqa")
        package.removeHandler(self._handler)
        package.setLevel(self._level)
        self._handler.close()

    def note(self, message: str) -> None:
        """A line for log.txt only (the terminal shows it another way, or not at all)."""
        if self._handler is not None:
            self._handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))

    def training(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float,
                 samples_per_s: float) -> dict[str, str]:
        """One training point (every LOG_EVERY_STEPS updates): to TensorBoard and log.txt.

        `loss` is the mean training loss of the epoch so far; returns the progress bar's postfix.
        """
        if self.writer is not None:
            for tag, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("samples_per_s", samples_per_s)):
                self.writer.add_scalar(f"train/{tag}", value, step)
        self.note(f"update {step} (epoch {epoch + 1}): train loss {loss:.6g}, lr {lr:.6g}, grad norm {grad_norm:.6g}, "
                  f"{samples_per_s:.0f} samples/s")
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "samples_s": f"{samples_per_s:.0f}"}

    def evaluation(self, line: Mapping[str, Any]) -> None:
        """One evaluation's metrics line (accuracy overall and per answer type, loss) to TensorBoard."""
        if self.writer is None:
            return
        split, step = line["split"], line["step"]
        self.writer.add_scalar(f"{split}/accuracy", line["accuracy"], step)
        for answer_type, value in sorted(line["per_answer_type"].items()):
            self.writer.add_scalar(f"{split}/accuracy/{answer_type}", value, step)
        self.writer.add_scalar(f"{split}/loss", line["loss"], step)
        self.writer.flush()


class PlainProgress:
    """tqdm's interface, printing one plain line every `every` steps and at the end (no bar)."""

    def __init__(self, iterable: Iterable | None, total: int, desc: str, every: int, initial: int,
                 file: IO[str]) -> None:
        self.iterable, self.total, self.desc, self.every, self.n = iterable, total, desc, every, initial
        self.file, self.postfix, self.started = file, "", time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        """Count `n` steps; print a line when a multiple of `every` (or the end) is passed."""
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or (self.n >= self.total > before):
            print(f"{self.desc}: {self.n}/{self.total} [{time.perf_counter() - self.started:.0f} s]{self.postfix}",
                  file=self.file, flush=True)

    def set_postfix(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Values shown at the end of the next line."""
        self.postfix = "".join(f", {k} {v}" for k, v in {**(values or {}), **more}.items())

    def close(self) -> None:
        """Nothing to clear: lines stay."""


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, every: int,
             initial: int = 0, disable: bool = False, leave: bool = True, file: IO[str] | None = None) -> Any:
    """A tqdm bar when `file` (stderr) is a terminal, else PlainProgress; nothing when `disable`."""
    file = file if file is not None else sys.stderr
    total = total if total is not None else len(iterable)
    if not disable and not file.isatty():
        return PlainProgress(iterable, total, desc, max(1, every), initial, file)
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, file=file, disable=disable, leave=leave,
                dynamic_ncols=True, mininterval=0.5)
