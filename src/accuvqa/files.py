"""Files that are never torn: atomic replacement and fsynced appends.

Failure drill (beside `ACCUVQA_FAIL_AT`, the rehearsed crash of one process in `accuvqa.runtime`):
`ACCUVQA_DISK_FULL_AFTER=<bytes>` makes every file written through `atomic_write` (checkpoints,
`latest.json`, `config.yml`, pictures) hold at most that many bytes: the write that would pass them
writes what fits, then raises OSError(ENOSPC), as a full disk does. It rehearses a full disk without
privileges (no small filesystem to mount): does the command say so in one line, and is the previous
checkpoint intact? Unset, files are written normally.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from accuvqa.errors import ConfigError

DISK_FULL_AFTER = "ACCUVQA_DISK_FULL_AFTER"  # the full-disk drill: bytes each atomically written file may hold


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one, and a
    failure (a full disk, an exception in `write`) leaves no temporary file behind.
    """
    path = Path(path)
    capacity = _disk_full_after()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f if capacity is None else _FillingDisk(f, capacity))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut
    return path


def _disk_full_after() -> int | None:
    """The ACCUVQA_DISK_FULL_AFTER drill's byte count; None when unset; ConfigError when malformed."""
    spec = os.environ.get(DISK_FULL_AFTER, "").strip()
    if not spec:
        return None
    if not spec.isdigit():
        raise ConfigError(f"{DISK_FULL_AFTER}={spec!r}: expected a number of bytes, e.g. 65536 (each file written "
                          f"atomically then fails as on a full disk once it holds that many); unset it to write "
                          f"normally")
    return int(spec)


class _FillingDisk:
    """A binary file on a device with room for `capacity` more bytes (the ACCUVQA_DISK_FULL_AFTER drill):
    the write that would pass it writes what fits, then raises OSError(ENOSPC). Everything else is the file's."""

    def __init__(self, f: IO[bytes], capacity: int) -> None:
        self._f, self._room = f, capacity

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes > self._room:
            self._f.write(view[:self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= view.nbytes
        return self._f.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as JSON through `atomic_write`."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def append_jsonl(path: str | Path, obj: Any) -> Path:
    """Append `obj` as one JSON line and fsync it (creating the folder when needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path
