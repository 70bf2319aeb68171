"""The on-disk token cache: built once, reused, rebuilt when content or tokenizer change."""
import numpy as np
import torch

from lm import data
from lm.config import TokenizerConfig
from lm.corpus import open_corpus

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
