"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class LMError(Exception):
    """An expected failure: bad input, missing file, foreign checkpoint. Exit code 1."""

    exit_code = 1


class ConfigError(LMError):
    """A flag or config value out of range. Exit code 2, like argparse's usage errors."""

    exit_code = 2


class DataError(LMError):
    """A corpus that is missing, empty or unreadable."""


class CheckpointError(LMError):
    """A checkpoint that is missing, truncated, corrupt, foreign or too new."""
