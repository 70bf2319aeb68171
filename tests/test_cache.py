"""The on-disk token cache: built once, reused, rebuilt when content or tokenizer change."""
import json

import numpy as np
import pytest
import torch

from lm import data
from lm.config import TokenizerConfig
from lm.corpus import DataWarning, open_corpus
from lm.errors import DataError

from conftest import write_corpus


def _entries(kind="bin"):
    return sorted(data.cache_dir().glob(f"*.{kind}"))


def test_cache_is_reused_and_equals_direct_encoding(tmp_path):
    c = open_corpus(str(write_corpus(tmp_path / "c1")))
    tok = data.load_tokenizer(c, TokenizerConfig())
    first = data.token_stream(c, "train", tok)
    built = set(_entries())
    direct = np.concatenate([np.asarray(ids) for ids in tok.encode_lines(c.lines("train"))])
    assert torch.equal(first, torch.from_numpy(direct))
    again = data.token_stream(c, "train", tok)
    assert torch.equal(first, again) and set(_entries()) == built  # nothing rebuilt
    arr = data.token_array(c, "train", tok)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16


def test_changed_content_or_tokenizer_builds_a_new_entry(tmp_path):
    d = write_corpus(tmp_path / "c2")
    c = open_corpus(str(d))
    tok = data.load_tokenizer(c, TokenizerConfig())
    before = data.token_stream(c, "valid", tok)
    n = len(_entries())
    with open(d / "valid.txt", "a") as f:
        f.write("the cat sat on the mat .\n")
    after = data.token_stream(c, "valid", tok)
    assert after.numel() == before.numel() + 8 and len(_entries()) == n + 1
    capped = data.load_tokenizer(c, TokenizerConfig(vocab_size=10))
    assert capped.vocab_size == 10 and capped.fingerprint != tok.fingerprint
    small = data.token_stream(c, "valid", capped)
    assert small.numel() == after.numel() and int(small.max()) < 10 and len(_entries()) == n + 2


def test_tokenizer_is_cached_by_training_content_and_config(tmp_path):
    d = write_corpus(tmp_path / "c3")
    c = open_corpus(str(d))
    a = data.load_tokenizer(c, TokenizerConfig())
    models = set(_entries("model"))
    b = data.load_tokenizer(c, TokenizerConfig())
    assert a.fingerprint == b.fingerprint and set(_entries("model")) == models
    with open(d / "train.txt", "a") as f:
        f.write("a brand new sentence\n")
    c2 = data.load_tokenizer(c, TokenizerConfig())
    assert "brand" in c2.word_to_id and "brand" not in a.word_to_id


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    c = open_corpus(str(write_corpus(tmp_path / "c4")))
    tok = data.load_tokenizer(c, TokenizerConfig())
    good = data.token_stream(c, "test", tok)
    entry = [p for p in _entries() if p.name.startswith("c4.test.")][0]
    entry.write_bytes(b"\x01")  # odd size: cannot be uint16 tokens
    assert torch.equal(data.token_stream(c, "test", tok), good)


def test_a_new_version_of_the_raw_text_rules_builds_a_new_entry(tmp_path, monkeypatch):
    c = open_corpus(str(write_corpus(tmp_path / "c5")))
    tok = data.load_tokenizer(c, TokenizerConfig())
    data.token_stream(c, "valid", tok)
    n, models = len(_entries()), len(_entries("model"))
    monkeypatch.setattr(data, "RULES", data.RULES + 1)  # what a change to lm.text must do
    tok2 = data.load_tokenizer(c, TokenizerConfig())
    data.token_stream(c, "valid", tok2)
    assert len(_entries()) == n + 1 and len(_entries("model")) == models + 1


def _latin1_corpus(d):
    write_corpus(d)
    with open(d / "train.txt", "ab") as f:
        f.write(b"the caf\xe9 sat .\n")  # latin-1, as old Windows editors save it
    return d


def test_a_cache_hit_repeats_the_repair_warning_and_strict_still_refuses(tmp_path, monkeypatch):
    """The cache key leaves --strict out and a hit never reads the text, so the entry's
    record of what the read repaired is what warns again, or refuses."""
    d = _latin1_corpus(tmp_path / "c6")
    c = open_corpus(str(d))
    message = r"train\.txt: 1 invalid UTF-8 byte\(s\) replaced by U\+FFFD, first on line 402"
    with pytest.warns(DataWarning, match=message):
        tok = data.load_tokenizer(c, TokenizerConfig())
        first = data.token_stream(c, "train", tok)
    valid = data.token_stream(c, "valid", tok)  # clean: no warning
    entries = set(_entries()) | set(_entries("model"))
    monkeypatch.setattr(c, "lines", lambda split: pytest.fail("a cache hit read the text"))
    with pytest.warns(DataWarning, match=message):  # the tokenizer's hit says it
        tok = data.load_tokenizer(c, TokenizerConfig())
    with pytest.warns(DataWarning, match=message):  # and the stream's
        assert torch.equal(data.token_stream(c, "train", tok), first)
    assert set(_entries()) | set(_entries("model")) == entries  # hits, not rebuilds
    strict = open_corpus(str(d), strict=True)
    monkeypatch.setattr(strict, "lines", lambda split: pytest.fail("a cache hit read the text"))
    refusal = r"train\.txt is not valid UTF-8: line 402, byte 7 of the line \(drop --strict"
    with pytest.raises(DataError, match=refusal):
        data.load_tokenizer(strict, TokenizerConfig())
    with pytest.raises(DataError, match=refusal):
        data.token_stream(strict, "train", tok)
    assert torch.equal(data.token_stream(strict, "valid", tok), valid)  # a clean split is no reason to refuse


def test_an_entry_without_its_record_is_rebuilt(tmp_path):
    """Entries written before records existed (or whose record is damaged) cannot say
    what the read repaired: they are built again, record and all."""
    d = _latin1_corpus(tmp_path / "c7")
    c = open_corpus(str(d))
    with pytest.warns(DataWarning):
        tok = data.load_tokenizer(c, TokenizerConfig())
        data.token_stream(c, "train", tok)
    entry = [p for p in _entries() if p.name.startswith("c7.train.")][0]
    entry.with_suffix(".json").write_text('{"not": "a record"}')
    with pytest.warns(DataWarning, match="first on line 402"):
        data.token_stream(c, "train", tok)
    assert json.loads(entry.with_suffix(".json").read_text()) == [
        {"file": 0, "bad": 1, "line": 402, "byte": 7, "long": 0}]
