"""Corpus + tokenizer -> token streams, through an on-disk token cache.

A split is tokenized once into ``<cache>/<corpus>.<split>.<key>.bin``: raw little-endian
uint16 ids (uint32 when the vocabulary needs it) read back as a memory map. The key hashes
the split's content fingerprint, the tokenizer's bytes, the cache format and the version
of ``lm.text``'s rules, so editing the text, retraining the tokenizer or a new rule for
raw text builds a new entry, and a cache is never trusted
because of a path. The tokenizer itself is cached the same way, keyed by the training
split and the tokenizer config. Building streams the corpus in chunks: memory stays flat
whatever its size.

Beside each entry, ``<entry>.json`` records what reading the text repaired (invalid
UTF-8 bytes replaced, long lines cut; ``Corpus.found``). A hit replays it, so every run
on repaired text warns, and ``--strict`` refuses the text whether or not it is cached
(the key leaves ``strict`` out: one entry serves both). An entry without its record is
rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm.checkpoint import atomic_write
from lm.config import TokenizerConfig
from lm.corpus import SPLITS, Corpus, DataWarning
from lm.errors import DataError, LMError
from lm.text import RULES
from lm.tokenizer import Tokenizer

CACHE_FORMAT = 1
CHUNK_TOKENS = 1 << 20  # tokens encoded per write while building
MIN_SPLIT_TOKENS = 50  # a split below this gets a warning: its perplexity says little


def cache_dir() -> Path:
    """``$LM_CACHE``, else ``corpora/.cache`` in the source checkout, else ``~/.cache/lm``."""
    if os.environ.get("LM_CACHE"):
        return Path(os.environ["LM_CACHE"]).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "corpora"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path.home() / ".cache" / "lm"


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join((f"{CACHE_FORMAT}.{RULES}", *parts)).encode()).hexdigest()[:20]


def load_tokenizer(corpus: Corpus, cfg: TokenizerConfig, *, cache: bool = True) -> Tokenizer:
    """The tokenizer for ``corpus``, trained on its train split only (cached)."""
    key = _key(corpus.fingerprint("train"), json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    path = cache_dir() / f"{_safe(corpus.name)}.tokenizer.{key}.model"
    if cache and path.is_file() and (found := _load_found(path)) is not None:
        try:
            tokenizer = Tokenizer(path.read_bytes(), cfg.kind, cfg.text, cfg.lowercase)
        except Exception:  # a damaged cache entry is rebuilt, never fatal
            path.unlink(missing_ok=True)
        else:
            corpus.replay("train", found)
            tokenizer.note_if_cut(cfg)  # as training it did
            return tokenizer
    tokenizer = Tokenizer.train(corpus.lines("train"), cfg)
    if cache:
        _write_atomic(path, tokenizer.model_bytes)
        _save_found(path, corpus, "train")
    return tokenizer


def token_stream(corpus: Corpus, split: str, tokenizer: Tokenizer, *, cache: bool = True,
                 progress: bool = False, limit: int | None = None) -> torch.Tensor:
    """The standard stream of one split (each line's tokens, then one <eos>) as int64;
    with ``limit``, only its first ``limit`` tokens (the rest is never converted)."""
    ids = token_array(corpus, split, tokenizer, cache=cache, progress=progress)
    if ids.size == 0:
        raise DataError(f"the {split} split of {corpus.where} is empty: it has no lines")
    return torch.from_numpy(ids[:limit].astype(np.int64))


def token_array(corpus: Corpus, split: str, tokenizer: Tokenizer, *, cache: bool = True,
                progress: bool = False) -> np.ndarray:
    """The split's ids as stored: a read-only memory map of the cache file."""
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    if not cache:
        ids = np.concatenate([np.asarray(c, dtype) for c in _chunks(corpus, split, tokenizer)] or [np.zeros(0, dtype)])
        _warn_if_tiny(corpus, split, ids.size)
        return ids
    key = _key(corpus.fingerprint(split), tokenizer.fingerprint)
    path = cache_dir() / f"{_safe(corpus.name)}.{split}.{key}.bin"
    found = _load_found(path)
    if found is None or not path.is_file() or path.stat().st_size % dtype.itemsize:
        build(corpus, split, tokenizer, path, dtype, progress=progress)
    else:
        corpus.replay(split, found)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    ids = np.memmap(path, dtype=dtype, mode="r")
    _warn_if_tiny(corpus, split, ids.size)
    return ids


def _warn_if_tiny(corpus: Corpus, split: str, n: int) -> None:
    """A held-out split of a few tokens gives a perplexity that means nothing (a glob
    that missed the files it meant gave a 1-token test split): say so, and how to fix
    it. (A split file is as its author wrote it, and a tiny train split fails anyway.)"""
    if 0 < n < MIN_SPLIT_TOKENS and split != "train" and "all" in getattr(corpus, "bounds", {}):
        warnings.warn(f"the {split} split of {corpus.where} has only {n} token(s): a perplexity on it means "
                      "little; add text, raise --held-out, or check what the corpus matches (a quoted glob's "
                      "'**' matches folders recursively)", DataWarning)


def build(corpus: Corpus, split: str, tokenizer: Tokenizer, path: Path, dtype: np.dtype,
          *, progress: bool = False) -> int:
    """Tokenize a split into ``path`` chunk by chunk; returns the token count."""
    n = 0

    def write(f) -> None:
        nonlocal n
        with tqdm(desc=f"tokenizing {corpus.name} {split}", unit="tok", unit_scale=True,
                  disable=None if progress else True, leave=False) as bar:
            for chunk in _chunks(corpus, split, tokenizer):
                np.asarray(chunk, dtype).tofile(f)
                n += len(chunk)
                bar.update(len(chunk))

    atomic_write(path, write, error=DataError, hint="set LM_CACHE to a writable directory")
    _save_found(path, corpus, split)
    return n


def word_count(corpus: Corpus, split: str, tokenizer: Tokenizer | None = None) -> int:
    """Words plus one <eos> per line: the tokens a word-level model scores on a split,
    the denominator that makes a subword model's perplexity comparable with word models'.
    Words are counted in the text as ``tokenizer`` reads it: raw prose split the WikiText
    way first ("it's a mat." is five words: it 's a mat .), as a word-level model on raw
    text sees it. Without a tokenizer the text counts as already split."""
    lines = corpus.lines(split) if tokenizer is None else tokenizer.prepare(corpus.lines(split))
    return sum(len(line.split()) + 1 for line in lines)


def _chunks(corpus: Corpus, split: str, tokenizer: Tokenizer):
    buf: list[int] = []
    for ids in tokenizer.encode_lines(corpus.lines(split)):
        buf += ids
        if len(buf) >= CHUNK_TOKENS:
            yield buf
            buf = []
    if buf:
        yield buf


def _save_found(entry: Path, corpus: Corpus, split: str) -> None:
    """Record beside a cache entry what the read that built it repaired (after the
    entry: an entry without a record is rebuilt)."""
    if split in corpus.found:  # the read got to the end
        _write_atomic(entry.with_suffix(".json"), json.dumps(corpus.found[split]).encode())


def _load_found(entry: Path) -> list[dict] | None:
    """The record ``_save_found`` wrote, or None (none yet, or damaged)."""
    try:
        found = json.loads(entry.with_suffix(".json").read_bytes())
    except (OSError, ValueError):
        return None
    ok = isinstance(found, list) and all(
        isinstance(f, dict) and all(isinstance(v, int) for v in f.values()) for f in found)
    return found if ok else None


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, lambda f: f.write(data), hint="")
    except LMError:
        pass  # caching is an optimisation: an unwritable cache only costs time


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "corpus"


def corpus_stats(corpus: Corpus, tokenizer: Tokenizer, *, progress: bool = False) -> dict:
    """Token counts per split, vocabulary size and <unk> rates."""
    splits = {}
    for s in SPLITS:
        ids = token_array(corpus, s, tokenizer, progress=progress)
        splits[s] = {"tokens": int(ids.size), "unk": int(np.count_nonzero(ids == tokenizer.unk_id))}
    return {"corpus": corpus.name, "where": corpus.where, "vocab": tokenizer.vocab_size,
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "unk_rate": {s: round(v["unk"] / max(v["tokens"], 1), 6) for s, v in splits.items()}}
