import json
import subprocess
import sys

import pytest

from lm.corpus import HELD_OUT, open_corpus
from lm.data import corpus_stats, token_stream
from lm.errors import DataError
from lm.tokenizer import Tokenizer

from conftest import REPO


@pytest.mark.parametrize("name", ["wikitext-2", "ptb"])
def test_standard_token_counts_and_vocabulary(name, mirror, monkeypatch):
    """The counts a comparable perplexity needs (ANCHORS.md), from the registry entry."""
    if mirror is None:
        pytest.skip("no local corpus mirror (set LM_CORPORA)")
    monkeypatch.setenv("LM_CORPORA", str(mirror))
    corpus = open_corpus(name)
    stats = corpus_stats(corpus, Tokenizer.train(corpus.lines("train")))
    standard = {"wikitext-2": ({"train": 2088628, "valid": 217646, "test": 245569}, 33278),
                "ptb": ({"train": 929589, "valid": 73760, "test": 82430}, 10000)}[name]
    assert (stats["tokens"], stats["vocab"]) == standard
    assert corpus.expected == {"tokens": standard[0], "vocab": standard[1]}


def test_cli_corpus_info_json_reports_the_standard_counts(mirror):
    if mirror is None:
        pytest.skip("no local corpus mirror (set LM_CORPORA)")
    out = subprocess.run([sys.executable, "-m", "lm", "corpus", "info", "ptb", "--json"], cwd=REPO,
                         env={"LM_CORPORA": str(mirror), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["tokens"] == {"train": 929589, "valid": 73760, "test": 82430} and info["vocab"] == 10000


def test_split_directory(tiny_corpus):
    c = open_corpus(str(tiny_corpus))
    assert list(c.lines("valid")) == (tiny_corpus / "valid.txt").read_text().splitlines()


def test_single_file_holds_out_contiguous_valid_and_test(tmp_path):
    lines = [f"line {i}" for i in range(200)]
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(lines) + "\n")
    c = open_corpus(str(f))
    parts = {s: list(c.lines(s)) for s in ("train", "valid", "test")}
    assert parts["train"] + parts["valid"] + parts["test"] == lines
    assert len(parts["test"]) == len(parts["valid"]) == int(200 * HELD_OUT)


def test_folder_of_txt_files_is_one_stream(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("three\nfour\nfive\n")
    c = open_corpus(str(tmp_path))
    got = [l for s in ("train", "valid", "test") for l in c.lines(s)]
    assert got == ["one", "two", "three", "four", "five"]


def test_crlf_line_endings_read_as_lines(tmp_path):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.txt").write_bytes(b"a b\r\nc\r\n")
    assert list(open_corpus(str(tmp_path)).lines("train")) == ["a b", "c"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no .txt files"),
    (lambda p: (p.mkdir(), (p / "train.txt").write_text("x\n")), "no valid or test file"),
    (lambda p: p.write_text("just one line\n"), "at least 3 lines"),
])
def test_bad_sources_say_what_to_do(tmp_path, setup, message):
    path = tmp_path / "src"
    setup(path)
    with pytest.raises(DataError, match=message):
        open_corpus(str(path))


def test_non_utf8_and_empty_splits_are_clear_errors(tmp_path):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.txt").write_text("hello world\n")
    (tmp_path / "valid.txt").write_bytes(b"caf\xe9\n")
    c = open_corpus(str(tmp_path))
    tok = Tokenizer.train(c.lines("train"))
    with pytest.raises(DataError, match="not UTF-8"):
        token_stream(c, "valid", tok)
    (tmp_path / "test.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        token_stream(c, "test", tok)
    (tmp_path / "train.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no words"):
        Tokenizer.train(c.lines("train"))


def test_registered_corpus_without_mirror_falls_back_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_CORPORA", str(tmp_path))  # empty mirror
    monkeypatch.chdir(tmp_path)
    c = open_corpus("wikitext-2")
    assert c.where == "hub:Salesforce/wikitext/wikitext-2-v1"
    assert c.hub["splits"]["valid"] == "validation"
