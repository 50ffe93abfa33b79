"""Project error types: user errors that the CLI turns into one line and exit code 2."""


class AccuvqaError(Exception):
    """Base class of every error caused by user input (config, data, checkpoints)."""


class ConfigError(AccuvqaError):
    """A bad config file, key, value or combination of values."""


class DataError(AccuvqaError):
    """A missing, malformed or inconsistent data file."""


class CheckpointError(AccuvqaError):
    """A missing, corrupt or incompatible checkpoint."""
