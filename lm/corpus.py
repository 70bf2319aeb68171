"""Text sources: named corpora from the registry, local files and folders, hub datasets.

A corpus yields lines of text per split (``train``, ``valid``, ``test``) and never
tensors. Named corpora live in ``corpora/NAME.toml`` and resolve, in order, to a local
mirror directory (``$LM_CORPORA/<mirror>``, then ``corpora/<mirror>``) holding
``{train,valid,test}.txt``, or to the Hugging Face hub through ``datasets`` (streamed).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sys
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lm.config import check_registry_entry
from lm.errors import UTF8_BOM, ConfigError, DataError, open_input, refuse_non_utf8

SPLITS = ("train", "valid", "test")
HELD_OUT = 0.05  # fraction of lines held out for valid and for test when none is given
MAX_LINE_BYTES = 1 << 20  # longer lines are read in pieces cut at whitespace
MIN_PIECE_BYTES = 1 << 14  # a line longer than this and than half the held-out share makes a held-out corpus cut lines
_SPLIT_NAMES = {  # file names accepted in a corpus directory, per split
    "train": ("train.txt", "wiki.train.tokens", "ptb.train.txt"),
    "valid": ("valid.txt", "validation.txt", "wiki.valid.tokens", "ptb.valid.txt"),
    "test": ("test.txt", "wiki.test.tokens", "ptb.test.txt"),
}


def registry_dirs() -> list[Path]:
    """Where corpus entries are looked up: ./corpora, then the source checkout's."""
    dirs = [Path.cwd() / "corpora", Path(__file__).resolve().parent.parent / "corpora"]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


class Registry(Mapping):
    """The registered corpora, name -> entry (the parsed TOML plus ``_file``). An entry
    is read and checked only when it is looked up (``registry()[name]``, ``.get``), so
    one broken file breaks only the commands that use it; ``items()`` and ``values()``
    list every entry for ``lm corpus list``, a broken one as ``{"_file", "_error",
    "description"}`` with its one-line problem instead of raising."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, name: str) -> dict:
        return load_registry_entry(self.files[name])

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def _listed(self, name: str) -> dict:
        try:
            return self[name]
        except (ConfigError, DataError) as e:
            problem = str(e).removeprefix(f"corpus registry entry {self.files[name]}").lstrip(": ")
            return {"_file": str(self.files[name]), "_error": problem, "description": f"(broken: {problem})"}

    def values(self):  # type: ignore[override]
        return [self._listed(n) for n in self]

    def items(self):  # type: ignore[override]
        return [(n, self._listed(n)) for n in self]


def registry() -> Registry:
    """All registered corpora (``corpora/NAME.toml``; ./corpora wins over the checkout's),
    each read only when looked up: see ``Registry``."""
    files: dict[str, Path] = {}
    for d in reversed(registry_dirs()):
        for f in sorted(d.glob("*.toml")):
            files[f.stem] = f
    return Registry(dict(sorted(files.items())))


def load_registry_entry(f: Path) -> dict:
    """One registry file, parsed and checked; errors name the file."""
    try:
        entry = tomllib.loads(f.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corpus registry entry {f} is not valid TOML: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read corpus registry entry {f}: {e.strerror or e}") from None
    return check_registry_entry(entry, f) | {"_file": str(f)}


def mirror_dirs() -> list[Path]:
    out = []
    if os.environ.get("LM_CORPORA"):
        out.append(Path(os.environ["LM_CORPORA"]).expanduser())
    out.extend(d for d in registry_dirs())
    return out


@dataclass
class Corpus:
    """A named source of lines per split."""

    name: str
    where: str  # human-readable origin, for messages and `corpus info`
    expected: dict = field(default_factory=dict)  # registry's standard counts, if any
    strict: bool = False  # refuse invalid UTF-8 instead of replacing it
    found: dict = field(default_factory=dict)  # split -> what its last full read repaired
    shared_files = False  # whether one file feeds several splits (warnings then name the split)
    piece_bytes: int | None = None  # lines longer than this are cut (None: MAX_LINE_BYTES)

    def lines(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def replay(self, split: str, found: list[dict]) -> None:
        """Say again what a read of ``split`` repaired (``found``: ``self.found[split]``
        after that read), or refuse it if ``strict``: a cache that skips the read must
        leave the user told, and refused, exactly as the read would have."""
        files = self._files(split)
        for f in found:
            i = f.get("file", 0)
            _report(files[i] if 0 <= i < len(files) else Path(self.where), f, self.strict,
                    split if self.shared_files else None)

    def _files(self, split: str) -> list[Path]:
        return []

    def describe(self, split: str) -> str:
        """What ``split`` of this corpus is, for people: ``lm eval`` names what it scored."""
        return f"{self.name} {split} ({self.where})"

    def _read(self, split: str, parts: list[tuple[int, Path, int, int | None]]) -> Iterator[str]:
        """The lines of ``parts`` (file index, path, first line, end line or None), then,
        once all are read, what the read repaired in ``self.found[split]``."""
        self.found.pop(split, None)
        found = []
        for i, path, start, stop in parts:
            rec: dict = {}
            yield from _read_lines(path, self.strict, rec, start, stop, split if self.shared_files else None,
                                   self.piece_bytes)
            if rec:
                found.append({"file": i, **rec})
        self.found[split] = found

    def fingerprint(self, split: str) -> str:
        """Content hash of a split, for caches keyed on content rather than paths."""
        raise NotImplementedError


class SplitFiles(Corpus):
    """One text file per split."""

    def __init__(self, name: str, files: dict[str, Path], where: str, expected: dict | None = None):
        super().__init__(name, where, expected or {})
        self.files = files

    def lines(self, split: str) -> Iterator[str]:
        return self._read(split, [(0, self.files[split], 0, None)])

    def _files(self, split: str) -> list[Path]:
        return [self.files[split]]

    def describe(self, split: str) -> str:
        return f"{self.name} {split} ({self.files[split]})"

    def fingerprint(self, split: str) -> str:
        return _hash_files([self.files[split]])


class HeldOutFiles(Corpus):
    """Files with no split of their own: their lines in order, the last ``HELD_OUT``
    fraction becoming test and the fraction before it valid (contiguous blocks, so that
    no held-out sentence has its neighbours in training)."""

    shared_files = True

    def __init__(self, name: str, files: list[Path], where: str, held_out: float = HELD_OUT):
        super().__init__(name, where)
        self.files = files
        stats = [_line_stats(f) for f in files]
        self.counts = [c for c, _ in stats]
        n, longest = sum(self.counts), max((m for _, m in stats), default=0)
        total = sum(f.stat().st_size for f in files)
        target = total * held_out  # bytes each of valid and test should hold
        if n < 3 or longest > max(MIN_PIECE_BYTES, target / 2):
            # A few huge lines (a file with no newline): held out by lines, valid or test
            # would be a whole 1 MiB piece (32% of a 3.3 MB file) or nothing at all. Cut
            # them at whitespace into pieces of a twentieth of the held-out share, and hold
            # out as many pieces from the end as make the share: the fraction held out is
            # then one of the text, within a twentieth.
            self.piece_bytes = min(MAX_LINE_BYTES, max(64, int(target / 20)))
            sizes = [[len(line) + 1 for line in _raw_lines(f, limit=self.piece_bytes)] for f in files]
            self.counts = [len(x) for x in sizes]
            n = sum(self.counts)
        if n < 3:
            raise DataError(f"{where} is too small to hold out valid and test text: it has {n} line(s), "
                            f"{total:,} bytes. A corpus with no valid/test files needs at least 3 lines (one each "
                            "for train, valid and test; hundreds make a useful corpus), or give a directory with "
                            "train.txt, valid.txt and test.txt")
        held = max(1, int(n * held_out))
        valid, test = n - 2 * held, n - held  # where valid and test start
        if self.piece_bytes:  # as many pieces from the end as hold `target` bytes, for each
            lengths = [x for f in sizes for x in f]
            test = _start_of_last(lengths, n, target)
            valid = _start_of_last(lengths, test, target)
            if not 0 < valid < test < n:
                valid, test = n - 2 * held, n - held
        self.held_out = held_out
        self.bounds = {"train": (0, valid), "valid": (valid, test), "test": (test, n),
                       "all": (0, n)}  # "all": the whole text, as `lm eval --corpus FILE` scores it

    def lines(self, split: str) -> Iterator[str]:
        lo, hi = self.bounds[split]
        parts, first = [], 0  # first: the stream's line number of each file's first line
        for i, (f, n) in enumerate(zip(self.files, self.counts)):
            if first < hi and first + n > lo:
                parts.append((i, f, max(lo - first, 0), min(hi - first, n)))
            first += n
        return self._read(split, parts)

    def _files(self, split: str) -> list[Path]:
        return self.files

    def describe(self, split: str) -> str:
        what = "file" if len(self.files) == 1 and Path(self.where).is_file() else "text"
        if split == "all":
            return f"{self.where} (whole {what})"
        pct = f"{self.held_out:.0%}" if round(self.held_out * 100, 6).is_integer() else f"{self.held_out:.1%}"
        first = 1 - 2 * self.held_out
        part = {"train": f"the first {first:.0%}" if round(first * 100, 6).is_integer() else f"the first {first:.1%}",
                "valid": f"the {pct} before the last {pct}", "test": f"the last {pct}"}[split]
        return f"{self.where} {split} split ({part} of its {'text' if self.piece_bytes else 'lines'})"

    def fingerprint(self, split: str) -> str:
        cut = f"-{self.piece_bytes}" if self.piece_bytes else ""
        return _hash_files(self.files) + f"-{self.bounds[split][0]}-{self.bounds[split][1]}{cut}"


class HubCorpus(Corpus):
    """A Hugging Face hub dataset read with ``streaming=True`` (needs internet)."""

    def __init__(self, name: str, hub: dict, expected: dict | None = None):
        where = f"hub:{hub['path']}" + (f"/{hub['name']}" if hub.get("name") else "")
        super().__init__(name, where, expected or {})
        self.hub = hub

    def lines(self, split: str) -> Iterator[str]:
        try:
            import datasets  # imported here: training from local files never needs it
        except ImportError:
            raise DataError("reading from the Hugging Face hub needs `pip install datasets`") from None
        self.found.pop(split, None)
        column = self.hub.get("text_column", "text")
        # Said first: with no network the hub client retries for about 25 s before failing.
        print(f"lm: reading {self.name} ({split}) from the Hugging Face hub, {self.where}; "
              "a local mirror (LM_CORPORA) skips this", file=sys.stderr)
        try:
            ds = datasets.load_dataset(self.hub["path"], self.hub.get("name"),
                                       split=self.hub.get("splits", {}).get(split, split),
                                       streaming=True)
            for row in ds:
                text = row[column]
                yield from (text[:-1] if text.endswith("\n") else text).split("\n")
            self.found[split] = []  # text from the hub is already decoded: nothing repaired
        except DataError:
            raise
        except Exception as e:  # network, auth, missing dataset: all end the same way
            files = f"{self.name}/train.txt, valid.txt and test.txt"
            mirror = os.environ.get("LM_CORPORA")
            hint = (f"LM_CORPORA={mirror} holds no {files}: point it at a mirror that does" if mirror
                    else f"with no internet, set LM_CORPORA to a directory holding {files}")
            raise DataError(f"could not read {self.where} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None

    def fingerprint(self, split: str) -> str:
        h = hashlib.sha256(repr(sorted(self.hub.items())).encode()).hexdigest()[:16]
        return f"{h}-{split}"


def open_corpus(spec: str, strict: bool = False, held_out: float = HELD_OUT) -> Corpus:
    """A corpus from a registered name, a directory, a file or a glob. Files without
    valid/test splits of their own hold out ``held_out`` of their lines for each."""
    entries = registry()
    corpus = _from_entry(spec, entries[spec], held_out) if spec in entries else _open_path(spec, held_out)
    corpus.strict = strict
    return corpus


def _open_path(spec: str, held_out: float, name: str | None = None) -> Corpus:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = {s: _find_split(path, s) for s in SPLITS}
        if files["train"]:
            missing = [s for s in SPLITS if not files[s]]
            if missing:
                raise DataError(f"{path} has a train file but no {' or '.join(missing)} file: "
                                f"add {', '.join(m + '.txt' for m in missing)}, or remove train.txt "
                                "to have a fraction held out automatically")
            _warn_unread(path, files, _text_files(path))
            return SplitFiles(name or path.name, files, str(path))
        texts = _text_files(path)
        if not texts:
            raise DataError(f"{path} holds no .txt files: put your text in .txt files there")
        return HeldOutFiles(name or path.name, texts, str(path), held_out)
    if path.is_file():
        return HeldOutFiles(name or path.stem, [path], str(path), held_out)
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches and any(ch in spec for ch in "*?["):
        return HeldOutFiles(name or path.stem.replace("*", "") or "glob", matches, spec, held_out)
    if any(ch in spec for ch in "*?["):
        raise DataError(f"{spec!r} matches no file: check the pattern (quote it, so that lm sees it "
                        "rather than the shell), or give a directory")
    names = ", ".join(registry()) or "none"
    raise DataError(f"corpus {spec!r} not found: not a registered name ({names}), "
                    "nor an existing file or directory")


def _start_of_last(lengths: list[int], end: int, target: float) -> int:
    """The first of the lines ending at ``end`` that together hold ``target`` bytes."""
    start, acc = end, 0
    while start > 0 and acc < target:
        start -= 1
        acc += lengths[start]
    return start


def _text_files(path: Path) -> list[Path]:
    """The text files in a folder, recursively, sorted by path, hidden ones skipped."""
    texts = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".tokens", ""))
    return [p for p in texts if not any(part.startswith(".") for part in p.relative_to(path).parts)]


def _warn_unread(path: Path, files: dict[str, Path], texts: list[Path]) -> None:
    """Say once which text files a folder with split files leaves unread."""
    unread = [p for p in texts if p not in files.values()]
    if unread:
        names = ", ".join(str(p.relative_to(path)) for p in unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        warnings.warn(f"{path}: {', '.join(f.name for f in files.values())} are its train/valid/test splits, so "
                      f"{len(unread)} other text file(s) in it are not read: {names}. Add their text to the split "
                      "files, or move those out of the folder to have all of it read and a fraction held out",
                      DataWarning, stacklevel=3)


def _from_entry(name: str, entry: dict, held_out: float) -> Corpus:
    expected = {"tokens": entry.get("tokens", {}), "vocab": entry.get("vocab")}
    if "path" in entry:  # a user's own entry: a directory, file or glob on this machine
        target = Path(entry["_file"]).parent / Path(entry["path"]).expanduser()
        if not any(ch in entry["path"] for ch in "*?[") and not target.exists():
            raise DataError(f"corpus {name!r}: its registry entry {entry['_file']} has path = "
                            f"{entry['path']!r}, and {target} does not exist: fix the path there "
                            "(a relative path is relative to the TOML file)")
        corpus = _open_path(str(target), held_out, name)
        corpus.expected = expected
        return corpus
    mirror = entry.get("mirror", name)
    for root in mirror_dirs():
        d = root / mirror
        files = {s: _find_split(d, s) for s in SPLITS}
        if all(files.values()):
            return SplitFiles(name, files, str(d), expected)
    if "hub" in entry:
        return HubCorpus(name, entry["hub"], expected)
    raise DataError(f"corpus {name!r} has no local copy (looked in "
                    f"{', '.join(str(r / mirror) for r in mirror_dirs())}) and no hub source in "
                    f"{entry['_file']}: set LM_CORPORA to a directory holding {mirror}/")


def _find_split(d: Path, split: str) -> Path | None:
    for fname in _SPLIT_NAMES[split]:
        if (d / fname).is_file():
            return d / fname
    return None


class DataWarning(UserWarning):
    """Something in the data was repaired (bad bytes replaced, long lines cut)."""


def _raw_lines(path: Path, cut: list[int] | None = None, limit: int | None = None) -> Iterator[bytes]:
    """Lines of a file as bytes, without their LF, CRLF or CR endings (``bytes.splitlines``
    knows only those three: form feeds, U+0085 and U+2028 stay inside a line). A line
    longer than ``MAX_LINE_BYTES`` comes out in pieces cut at whitespace, so memory stays
    flat; the index of the first piece of each such line goes into ``cut``. Each read tops
    the unfinished line up to ``MAX_LINE_BYTES`` + 1 bytes, so a block with no line end in
    it is a line to cut."""
    limit = limit or MAX_LINE_BYTES
    with open_input(path, DataError) as f:
        head = f.read(8192)
        refuse_non_utf8(path, head, DataError)
        f.seek(len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0)  # as Notepad saves UTF-8
        tail = b""  # the unfinished line: at most `limit` bytes, then perhaps a held CR
        n, cutting = 0, False  # pieces so far; whether the unfinished line was cut already
        while block := f.read(limit + 1 - len(tail) + tail.endswith(b"\r")):
            data = tail + block
            held = data.endswith(b"\r")  # perhaps a CRLF cut by the read: decided next time
            end = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - held))
            if end >= 0:  # no complete line here is longer than `limit`: see the read size
                lines = data[: end + 1].splitlines()
                n, cutting = n + len(lines), False
                yield from lines
                data = data[end + 1 :]
            while len(data) - held > limit:  # an unfinished line already too long: cut it
                if not cutting and cut is not None:
                    cut.append(n)
                n, cutting = n + 1, True
                at = max(data.rfind(b" ", 0, limit + 1), data.rfind(b"\t", 0, limit + 1))
                if at > 0:  # the whitespace goes; the partial word starts the next piece
                    yield data[:at]
                    data = data[at + 1 :]
                else:  # no whitespace at all: cut anywhere
                    yield data[:limit]
                    data = data[limit:]
            tail = data
        if tail:
            yield tail.removesuffix(b"\r")


def _read_lines(path: Path, strict: bool = False, found: dict | None = None, start: int = 0,
                stop: int | None = None, split: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Lines ``start`` to ``stop`` (0-based, ``stop`` excluded; all by default) of a UTF-8
    text file; the lines before ``start`` are not decoded. Invalid bytes become U+FFFD with
    one warning saying how many and where, or, with ``strict``, stop the read with the
    location. What the read repaired also goes into ``found`` (see ``_report``), so that
    a cache of what was read can say it again."""
    bad = first_bad = first_byte = 0
    cut: list[int] = []
    for lineno, raw in itertools.islice(enumerate(_raw_lines(path, cut, limit), 1), start, stop):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise DataError(_not_utf8(path, lineno, e.start)) from None
            line = raw.decode("utf-8", "replace")
            bad += len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
            if not first_bad:
                first_bad, first_byte = lineno, e.start
        yield line
    long_lines = sum(1 for i in cut if i >= start and (stop is None or i < stop))
    rec = {"bad": bad, "line": first_bad, "byte": first_byte, "long": long_lines} if bad or long_lines else {}
    if long_lines and limit and limit != MAX_LINE_BYTES:
        rec["limit"] = limit
    if found is not None:
        found.update(rec)
    _report(path, rec, strict, split)


def _report(path: Path, found: dict, strict: bool, split: str | None = None) -> None:
    """Warn about what reading ``path`` repaired (``found``: ``bad`` invalid UTF-8 bytes
    replaced, the first on line ``line`` at byte ``byte``; ``long`` lines cut), or refuse
    it as ``strict`` asks. A read and a cache hit both end here, so both say the same;
    the warnings come from one place, so a message repeated in one process shows once."""
    where = f"{path} ({_SPLIT_LABEL.get(split, split)})" if split else str(path)  # one file may feed every split
    if found.get("bad"):
        if strict:
            raise DataError(_not_utf8(path, found.get("line", 0), found.get("byte", 0)))
        warnings.warn(f"{where}: {found['bad']} invalid UTF-8 byte(s) replaced by U+FFFD, first on line "
                      f"{found.get('line', 0)}; pass --strict to refuse such files", DataWarning)
    if found.get("long"):
        warnings.warn(f"{where}: {found['long']} line(s) longer than {found.get('limit', MAX_LINE_BYTES):,} bytes were cut "
                      "at whitespace (each piece ends in <eos>)", DataWarning)


_SPLIT_LABEL = {"train": "train split", "valid": "valid split", "test": "test split", "all": "whole text"}


def _not_utf8(path: Path, line: int, byte: int) -> str:
    return (f"{path} is not valid UTF-8: line {line}, byte {byte} of the line (drop --strict to "
            "replace bad bytes, or convert the file, e.g. iconv -f latin1 -t utf-8)")


def _line_stats(path: Path, limit: int | None = None) -> tuple[int, int]:
    """(lines, bytes in the longest) of a file, a line longer than ``limit`` counted in pieces."""
    n = longest = 0
    for line in _raw_lines(path, limit=limit):
        n, longest = n + 1, max(longest, len(line))
    return n, longest


_HASHES: dict[tuple, str] = {}  # (path, size, mtime) of the files -> content hash


def _hash_files(paths: list[Path]) -> str:
    """sha256 of the files' contents. Remembered per (path, size, mtime) so that the
    several caches keyed on one split (tokenizer, tokens) read it once per process."""
    try:
        sig = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    except OSError as e:
        raise DataError(f"cannot read {e.filename}: {e.strerror}") from None
    if sig not in _HASHES:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _HASHES[sig] = h.hexdigest()[:16]
    return _HASHES[sig]
