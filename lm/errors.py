"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

import shlex
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


UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of the encodings Windows tools call "Unicode", longest first.
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def refuse_non_utf8(path: Path, data: bytes, error: type[LMError] = LMError) -> None:
    """Raise ``error`` with a one-line fix when a file's bytes (``data``: all of them, or
    its first few KB) are UTF-16 or UTF-32 text (a byte-order mark, or ASCII text with
    every other byte NUL) or binary data (NUL bytes): lm reads UTF-8, and either would
    otherwise read as garbage."""
    head = data[:8192]
    name = next((n for bom, n in _WIDE_BOMS if head.startswith(bom)), None)
    if name is None and b"\x00" in data:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if len(head) >= 16 and min(even, odd) == 0 and max(even, odd) >= len(head) // 4:
            name = "UTF-16BE" if even else "UTF-16LE"
        else:
            raise error(f"{path} looks like a binary file (it has NUL bytes), not UTF-8 text")
    if name is not None:
        raise error(f"{path} is {name} text, and lm reads UTF-8: convert it first, "
                    f"e.g. iconv -f {name} -t UTF-8 {shlex.quote(str(path))} > {shlex.quote(Path(path).stem + '.utf8.txt')}")
