"""Project error types: user errors that the CLI turns into one line and exit code 2."""

from __future__ import annotations

from typing import Iterator


class AccuvqaError(Exception):
    """Base class of every error caused by user input (config, data, checkpoints)."""

    exit_code = 2  # what the command exits with


class Stopped(AccuvqaError):
    """A run stopped on request (SIGTERM / SIGINT) after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for a death by that signal


class ConfigError(AccuvqaError):
    """A bad config file, key, value or combination of values."""


class DataError(AccuvqaError):
    """A missing, malformed or inconsistent data file."""


class CheckpointError(AccuvqaError):
    """A missing, corrupt or incompatible checkpoint."""


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and its causes and contexts, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
