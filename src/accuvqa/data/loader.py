"""From the prepared stores to batches: questions, dictionaries, datasets, the per-epoch batch order, the loader
(and its workers)."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from accuvqa.config import Config
from accuvqa.data.build import build_progress
from accuvqa.data.dataset import VQADataset
from accuvqa.data.feature_store import open_features
from accuvqa.data.question_store import question_store
from accuvqa.data.questions import QuestionArrays, encode_records
from accuvqa.data.layout import dataset_layout
from accuvqa.data.records import QuestionRecord, parse_splits
from accuvqa.data.vocab import Vocab, load_answer_dict, load_token_dict
from accuvqa.errors import AccuvqaError, CheckpointError, DataError, error_chain
from accuvqa.models import model_spec
from accuvqa.runtime import StopRequest

log = logging.getLogger(__name__)


def load_questions(cfg: Config, split_spec: str, need_answers: bool) -> QuestionArrays:
    """The questions of `split_spec` from the question store (built first when missing or stale)."""
    return question_store(cfg).questions(split_spec, need_answers)


def make_dataset(cfg: Config, questions: QuestionArrays | Sequence[QuestionRecord], vocab: Vocab) -> VQADataset:
    """A dataset over `questions` (from `load_questions`, or records a Python caller read itself), encoded
    with `vocab`, whose features come from the packed stores of the folders they use (built first when
    missing or stale). Its batches carry region boxes (`bbox`) when the configured model's inputs name them."""
    questions = (questions.encoded_with(vocab, cfg.MAX_TOKEN) if isinstance(questions, QuestionArrays)
                 else encode_records(questions, vocab, cfg.MAX_TOKEN))
    layout = dataset_layout(cfg)
    used = questions.folders
    folders = {f for f in used if f}
    if not folders or "" in used:  # Visual Genome's questions sit on images of other splits
        folders |= set(layout.feature_folders("vg"))
    features = open_features(cfg.FEATURE_PATH, sorted(folders), cfg.IMG_FEAT_SIZE, preload=cfg.PRELOAD,
                             store_path=cfg.STORE_PATH, progress=build_progress(cfg.VERBOSE), layout=layout)
    boxes = "bbox" in model_spec(cfg.MODEL_USE).inputs  # region boxes only for a model that reads them
    return VQADataset(cfg, questions, features, boxes=boxes, layout=layout)


def validation_set(cfg: Config, vocab: Vocab) -> VQADataset | None:
    """The val split to score after each epoch: None when training reads it (TRAIN_SPLIT names val) or
    the data has no annotated val split."""
    if "val" in parse_splits(cfg.TRAIN_SPLIT) or not question_store(cfg).annotated("val"):
        return None
    return make_dataset(cfg, load_questions(cfg, "val", need_answers=True), vocab)


def run_vocab(cfg: Config, state: dict[str, Any] | None = None, path: str | Path | None = None) -> Vocab:
    """The dictionaries a run uses: a checkpoint's own (`state`, read from `path`) when it holds them,
    else the question store's (mcan-vqa's rules, or TOKEN_DICT_PATH / ANSWER_DICT_PATH).

    When the checkpoint holds them, a TOKEN_DICT_PATH / ANSWER_DICT_PATH that differs is a
    CheckpointError naming both; an equal one is fine.
    """
    if state is None or "token_to_ix" not in state:  # a new run, or an original mcan-vqa checkpoint
        return question_store(cfg).vocab
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    stored = {"token": state.get("token_to_ix"), "answer": state.get("ans_to_ix")}
    for what, table in stored.items():
        if not isinstance(table, dict):
            raise CheckpointError(f"{where} holds no usable {what} dictionary "
                                  f"({'token_to_ix' if what == 'token' else 'ans_to_ix'} is {type(table).__name__})")
    for what, key, read in (("token", "TOKEN_DICT_PATH", load_token_dict),
                            ("answer", "ANSWER_DICT_PATH", lambda p: load_answer_dict(p)[0])):
        pinned_path = getattr(cfg, key)
        if not pinned_path:
            continue
        pinned, own = read(pinned_path), stored[what]
        if pinned != own:
            diff = next((f"{k!r} is {v} in the file, {own.get(k, 'absent')} in the checkpoint"
                         for k, v in pinned.items() if own.get(k) != v), None)
            diff = diff or next((f"{k!r} is absent from the file" for k in own if k not in pinned), "")
            raise CheckpointError(
                f"{key} {pinned_path} ({len(pinned)} {what}s) contradicts the {what} dictionary stored in "
                f"{where} ({len(own)} {what}s; {diff}); drop {key}: the checkpoint's own dictionary is used")
    return Vocab(stored["token"], stored["answer"])


def epoch_batches(n_samples: int, cfg: Config, epoch: int, rt: Any,
                  regions: np.ndarray | None = None) -> list[np.ndarray]:
    """This process's share (`rt.rank` of `rt.world_size`) of each effective batch of one epoch.

    Full batches only. The order is one permutation fixed by (SEED, epoch): it does not depend on
    the number of processes or on GRAD_ACCU_STEPS, so neither changes what is learned. With
    BUCKET_WINDOW > 1 and `regions` (each sample's region count), see `bucket_by_regions`.
    """
    gen = torch.Generator().manual_seed(cfg.SEED * 1_000_003 + epoch)
    order = torch.randperm(n_samples, generator=gen).numpy()
    share = cfg.BATCH_SIZE // rt.world_size
    n_batches = n_samples // cfg.BATCH_SIZE
    if cfg.BUCKET_WINDOW > 1 and regions is not None:
        order = bucket_by_regions(order[: n_batches * cfg.BATCH_SIZE], regions, cfg.BATCH_SIZE, cfg.BUCKET_WINDOW, gen)
    return [order[b * cfg.BATCH_SIZE + rt.rank * share: b * cfg.BATCH_SIZE + (rt.rank + 1) * share]
            for b in range(n_batches)]


def bucket_by_regions(order: np.ndarray, regions: np.ndarray, batch_size: int, window: int,
                      gen: torch.Generator) -> np.ndarray:
    """`order` (whole batches) regrouped so that a batch holds images of similar region counts.

    Each run of `window` consecutive batches of `order` is sorted by region count (stably), cut
    into batches again, and those batches are shuffled with `gen`: every sample stays in its
    window, a batch is padded to little more than its own images' regions, and big and small
    batches alternate at random. When every sample has the same count, `order` is returned as it is.
    """
    counts = np.asarray(regions)[order]
    if counts.size == 0 or counts.min() == counts.max():
        return order
    span = window * batch_size
    out = []
    for start in range(0, len(order), span):
        chunk = order[start: start + span]
        chunk = chunk[np.argsort(counts[start: start + span], kind="stable")].reshape(-1, batch_size)
        out.append(chunk[torch.randperm(len(chunk), generator=gen).numpy()].reshape(-1))
    return np.concatenate(out)


def sample_regions(dataset: VQADataset) -> np.ndarray:
    """Each sample's region count (at most IMG_FEAT_PAD_SIZE)."""
    return np.minimum(dataset.regions[dataset.question_row], dataset.pad_size)


def eval_batches(n_samples: int, batch_size: int) -> list[np.ndarray]:
    """Every sample once, in order, in batches of `batch_size` (the last one shorter)."""
    order = np.arange(n_samples)
    return [order[i: i + batch_size] for i in range(0, n_samples, batch_size)]


def batch_loader(dataset: VQADataset, batches: Sequence[np.ndarray], cfg: Config,
                 seed: int | None = None) -> Iterator[dict]:
    """Iterate over collated batches, with worker processes when NUM_WORKERS > 0.

    With workers:
    - their seeds come from `seed` (default SEED), not from the global torch RNG, so NUM_WORKERS does
      not change the random numbers the training draws (dropout);
    - a project error raised in a worker (a corrupt feature file) reaches the caller as itself: the
      same type and one-line message as with NUM_WORKERS 0;
    - a worker that dies (killed by a signal, or exits) is a DataError naming how it died, raised as
      soon as the death is noticed (SIGCHLD, or torch's liveness check every 5 s), wherever the main
      process is at that moment, so a death never hangs the run. There is no timeout on a batch: a
      worker that is alive but slow (a slow or network disk) is waited for;
    - stopping is the main process's decision: the workers ignore SIGINT (Ctrl-C reaches the whole
      process group); a worker killed by SIGTERM / SIGINT is reported when the next batch is asked
      for, not during an update, so a run stopping on that signal can finish its update and save; when
      this process received the signal too (a scheduler, or `timeout`, signalling the whole group), it
      is `GroupStop`, on which the training loop saves and stops as on the signal alone.
    """
    if cfg.NUM_WORKERS == 0:
        return (dataset[b] for b in batches)
    loader = torch.utils.data.DataLoader(
        _InWorker(dataset), sampler=batches, batch_size=None, num_workers=cfg.NUM_WORKERS,
        pin_memory=cfg.PIN_MEM, persistent_workers=False, worker_init_fn=_worker_signals,
        generator=torch.Generator().manual_seed(cfg.SEED if seed is None else seed))
    return _from_workers(loader, len(batches))


# ----------------------------------------------------------------------------- worker processes

WORKER_HINT = "rerun with NUM_WORKERS 0 to see the error in the main process"


class _RemoteTraceback(Exception):
    """The traceback of an error in a worker, kept as the cause of the error the caller sees."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class _ErrorInWorker:
    """A project error raised in a worker, sent to the main process as a value."""

    kind: type
    message: str
    traceback: str

    def exception(self) -> Exception:
        try:
            error = self.kind(self.message)
        except Exception:  # a constructor with other arguments
            error = DataError(self.message)
        error.__cause__ = _RemoteTraceback(f"\n\"\"\"\nin a data-loading worker:\n{self.traceback}\"\"\"")
        return error


class _InWorker(torch.utils.data.Dataset):
    """The dataset as the workers run it: a project error becomes a value (torch would re-raise it
    with the worker's traceback in its message)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Any) -> Any:
        try:
            return self.dataset[indices]
        except AccuvqaError as e:
            return _ErrorInWorker(type(e), str(e), "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def _worker_signals(worker_id: int) -> None:
    """worker_init_fn: Ctrl-C (SIGINT to the whole process group) leaves the workers running.

    SIGTERM keeps torch's worker handler: from the main process (ending the workers) a quiet exit,
    from anyone else death by SIGTERM. Never ignore it: the main process, when it exits, ends its
    workers with SIGTERM and waits for them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_DEATH = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]*)"
                    r"|exited unexpectedly(?: with exit code (-?\d+))?)")
_SIGNAL_NAMES = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
_SIGNAL_HINTS = {"SIGKILL": " (SIGKILL: often the out-of-memory killer, see dmesg)",
                 "SIGBUS": " (SIGBUS: often a full shared memory, /dev/shm)"}


def _death(pid: Any, signal_name: str | None, code: int | None, at: str) -> DataError:
    """The error of a worker that died: killed by a signal, or exited with `code` (None: unknown)."""
    if signal_name is not None:
        how, hint = f"was killed by signal {signal_name}", _SIGNAL_HINTS.get(signal_name, "")
    else:
        how, hint = (f"exited with code {code}" if code is not None else "exited unexpectedly"), ""
    error = DataError(f"a data-loading worker (pid {pid}) {how} {at}{hint}; {WORKER_HINT}")
    error.signal_name = signal_name  # type: ignore[attr-defined]  # GroupStop when it is the group's stop signal
    return error


def _torch_death(error: BaseException) -> tuple[str, str | None, int | None] | None:
    """(pids, signal name, exit code) from torch's RuntimeError about a dead worker (or one among its
    causes); None when it is about something else."""
    found = [m for m in (_DEATH.search(str(e)) for e in error_chain(error) if isinstance(e, RuntimeError)) if m]
    if not found:
        return None
    pids, killed_by, code = next((m for m in found if m.group(2) or m.group(3)), found[0]).groups()
    name = _SIGNAL_NAMES.get(killed_by.strip(), killed_by.strip()) if killed_by is not None else None
    return pids.strip(), name, int(code) if code is not None else None


def _found_dead(it: Any, at: str, seconds: float) -> DataError | None:
    """A worker of the DataLoader iterator `it` that is dead or dies within `seconds`, as a DataError."""
    workers = getattr(it, "_workers", None) or []  # multiprocessing.Process objects (torch internals)
    deadline = time.monotonic() + seconds
    while workers:
        for w in workers:
            code = w.exitcode
            if code is not None:
                return _death(w.pid, signal.Signals(-code).name if code < 0 else None, code if code >= 0 else None, at)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return None


def _from_workers(loader: torch.utils.data.DataLoader, n_batches: int) -> Iterator[dict]:
    """The loader's batches; errors from its workers as project errors. A worker killed by the stop signal
    that this process received too (SIGTERM / SIGINT to the whole process group) ends the batches early,
    quietly: the training loop, seeing fewer batches than asked for, saves and stops (see GroupStop)."""
    try:
        yield from _worker_batches(loader, n_batches)
    except DataError as e:
        if getattr(e, "signal_name", None) in ("SIGTERM", "SIGINT") and _stop_pending(seconds=2.0):
            log.warning("the data-loading workers were ended by the stop signal: no more batches")
            return
        raise


def _stop_pending(seconds: float) -> bool:
    """Whether this process received a stop signal, waiting up to `seconds` for its handler to run (the
    worker's death can be noticed first)."""
    deadline = time.monotonic() + seconds
    while StopRequest.received is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return StopRequest.received is not None


def _worker_batches(loader: torch.utils.data.DataLoader, n_batches: int) -> Iterator[dict]:
    """The loader's batches; errors from its workers as project errors (see `batch_loader`)."""
    done = 0
    reported = False  # a death is reported once: the other workers' exits must not report it again
    waiting = False  # in next(): no update under way
    deferred: tuple | None = None  # a death by SIGTERM / SIGINT during an update
    active = True  # False once this loader is finished: its handler, if still installed, passes through

    def where() -> str:
        return f"at batch {done + 1} of {n_batches}"

    def on_sigchld(signum: int, frame: Any) -> None:
        # torch's handler raises a RuntimeError wherever the main process is (in the model's forward,
        # in the optimizer): the same news as a DataError, except after a stop signal (see batch_loader)
        nonlocal reported, deferred
        if not active:
            return torch_handler(signum, frame)
        try:
            torch_handler(signum, frame)
        except RuntimeError as e:
            death = _torch_death(e)
            if death is None:
                raise
            if reported:
                return
            if death[1] in ("SIGTERM", "SIGINT") and not waiting:
                deferred = death
                return
            reported = True
            raise _death(*death, where()) from None

    try:
        it = iter(loader)  # starts the workers; torch sets its SIGCHLD handler (once per process)
    except RuntimeError as e:  # a worker died while they started
        death = _torch_death(e)
        if death is None:
            raise
        raise _death(*death, where()) from None
    torch_handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    ours = callable(torch_handler) and threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGCHLD, on_sigchld)
    try:
        while True:
            if deferred is not None:
                reported = True
                raise _death(*deferred, where())
            error, waiting = None, True
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:  # torch noticed the death while waiting for a batch
                death = _torch_death(e)
                if death is None:
                    raise
                # on_sigchld's error, else the exit code torch's check collected, else torch's words
                error = (next((c for c in error_chain(e) if isinstance(c, DataError)), None)
                         or _found_dead(it, where(), seconds=0.0) or _death(*death, where()))
            except (OSError, EOFError):  # the connection to a worker broke: did it die?
                try:
                    error = _found_dead(it, where(), seconds=5.0)
                except DataError as ours_first:  # on_sigchld was first
                    error = ours_first
                if error is None:
                    raise
            finally:
                waiting = False
            if error is not None:
                reported = True
                raise error  # outside the except clauses: the error does not keep torch's frames alive
            if isinstance(batch, _ErrorInWorker):
                raise batch.exception()
            done += 1
            yield batch
    finally:
        # stop the workers now, not when the garbage collector finds the iterator; a death among them
        # was reported already
        reported = True
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        active = False
        if ours and signal.getsignal(signal.SIGCHLD) is on_sigchld:
            signal.signal(signal.SIGCHLD, torch_handler)
