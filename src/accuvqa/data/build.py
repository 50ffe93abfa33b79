"""Building a prepared store: one rule for when a store is current, one way to write one.

Both stores (the question arrays, `data/question_store.py`; the packed features,
`data/feature_store.py`) are folders built from source files (JSON, per-image `.npz`) and read
instead of them. They share:
- **where**: beside the sources (`DATASET_PATH`, `FEATURE_PATH`), or under `STORE_PATH` when that
  key names a writable folder (for data on a read-only filesystem);
- **when current**: `meta.json` records the store's `plan` (format and the keys that shape it) and
  the state of each source (a file's size and modification time, a folder's listing). The store is
  current when its plan is the one asked for and every source present *now* is as it was. A source
  moved away leaves the store current: after `accuvqa prepare` the JSON and `.npz` files may go;
- **how written**: into `<store>.partial/` (its `plan.json` first, so an interrupted build of the
  same plan resumes), every file fsynced, then renamed into place;
- **who writes**: the first process to take `<store>.lock` builds; the others wait on the lock,
  then find the store current. One log line says which.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic
from accuvqa.runlog import progress

log = logging.getLogger(__name__)

STORE_KEY = "STORE_PATH"  # the config key that moves the stores to a writable folder


def store_home(store_path: str, source_dir: str | Path) -> Path:
    """Where the stores built from `source_dir` live: `source_dir` itself, or with STORE_PATH a folder
    under it named for `source_dir` (its name and a hash of its full path, so datasets never collide)."""
    source_dir = Path(source_dir)
    if not store_path:
        return source_dir
    tag = hashlib.sha256(str(source_dir.resolve()).encode()).hexdigest()[:8]
    return Path(store_path) / f"{source_dir.name}-{tag}"


def file_state(path: Path) -> list[int] | None:
    """[size, modification time in ns] of a source file; None when it is absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def folder_state(folder: Path, suffix: str = ".npz", recursive: bool = False) -> dict[str, Any] | None:
    """{"files", "hash"} of the `suffix` files in a source folder, or in it and its subfolders when
    `recursive` (paths relative to it, sizes, modification times); None when the folder is absent or holds none."""
    try:
        if recursive:
            entries = sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
                             for path in folder.rglob(f"*{suffix}") if path.is_file())
        else:
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(folder) if e.name.endswith(suffix))
    except OSError:
        return None
    if not entries:
        return None
    digest = hashlib.sha256()
    for name, size, mtime in entries:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return {"files": len(entries), "hash": digest.hexdigest()[:32]}


def read_meta(store: Path) -> dict[str, Any] | None:
    """A built store's meta.json; None when there is none or it cannot be read."""
    try:
        meta = json.loads((store / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def why_stale(store: Path, plan: dict[str, Any], sources: dict[str, Any]) -> str | None:
    """None when the store at `store` is current for `plan` and `sources` (see the module docstring);
    otherwise why not, in words."""
    meta = read_meta(store)
    if meta is None:
        return "it is not built yet" if not store.exists() else "its meta.json cannot be read"
    if meta.get("plan") != plan:
        return "it was built for other settings (format, or the keys that shape it)"
    built = meta.get("sources", {})
    changed = [name for name, now in sources.items() if now is not None and built.get(name) != now]
    if changed:
        return f"{Path(changed[0]).name} changed since it was built" + (
            f" (and {len(changed) - 1} more source(s))" if len(changed) > 1 else "")
    return None


class Partial:
    """A store being written in `<store>.partial/`: resumed when it was started for the same plan and
    sources, else started afresh."""

    def __init__(self, final: Path, plan: dict[str, Any], sources: dict[str, Any]) -> None:
        self.final, self.plan, self.sources = final, plan, sources
        self.path = final.with_name(final.name + ".partial")
        started_for = {"plan": plan, "sources": sources}
        try:
            self.resumed = json.loads((self.path / "plan.json").read_text()) == started_for
        except (OSError, ValueError):
            self.resumed = False
        if not self.resumed:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            write_json_atomic(self.path / "plan.json", started_for)

    def finish(self, **meta: Any) -> Path:
        """fsync every file, write meta.json, and rename the folder into place (replacing a stale store)."""
        for item in self.path.iterdir():
            if item.is_file():
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        write_json_atomic(self.path / "meta.json", {"plan": self.plan, "sources": self.sources, **meta})
        (self.path / "plan.json").unlink()
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final


def ensure_store(final: Path, plan: dict[str, Any], sources: Callable[[], dict[str, Any]],
                 build: Callable[[Partial], Path], what: str) -> Path:
    """`final` when current; otherwise built by `build(partial)` in this process, or waited for
    while another process builds it. DataError naming STORE_PATH when its folder cannot be written."""
    now = sources()
    why = why_stale(final, plan, now)
    if why is None:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.with_name(final.name + ".lock"), "a")
    except OSError as e:
        raise _unwritable(final, what, e) from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the %s %s", what, final)
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = sources()
            why = why_stale(final, plan, now)
            if why is None:
                return final
        log.info("building the %s %s (%s; accuvqa prepare builds it ahead of time)", what, final, why)
        try:
            return build(Partial(final, plan, now))
        except OSError as e:
            raise _unwritable(final, what, e) from e


def _unwritable(final: Path, what: str, e: OSError) -> DataError:
    """The one-line error for a store that cannot be written: the key to set, or the space to free."""
    if e.errno == errno.ENOSPC:
        return DataError(f"no space left on the device while writing the {what} {final}: free some space, or set "
                         f"{STORE_KEY} to a folder on a disk with room (the build resumes where it stopped)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DataError(f"cannot write the {what} {final} ({os.strerror(e.errno)}): set {STORE_KEY} to a "
                         f"writable folder (the data folders may stay read-only)")
    return DataError(f"cannot write the {what} {final}: {e}")


def build_progress(verbose: bool) -> Callable[[Sequence, str], Iterable]:
    """The progress a build shows: a bar on a terminal, a line per tenth of the work elsewhere (none
    unless `verbose`)."""
    return lambda items, desc: progress(items, desc=desc, every=max(1, len(items) // 10), disable=not verbose)
