"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from pathlib import Path
from typing import BinaryIO


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


def open_input(path: Path, error: type[LMError] = LMError) -> BinaryIO:
    """Open a user's input file for reading bytes; a missing file, a directory or an
    unreadable file raises ``error`` with a one-line message instead."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise error(f"{path} not found") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, expected a text file") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
