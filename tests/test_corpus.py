import json
import random
import re
import subprocess
import sys

import pytest

from lm import corpus as corpus_module
from lm.corpus import HELD_OUT, DataWarning, open_corpus
from lm.config import TokenizerConfig
from lm.data import corpus_stats, token_stream, word_count
from lm.errors import ConfigError, DataError
from lm.tokenizer import Tokenizer
from lm.train import build_config

from conftest import REPO


@pytest.mark.parametrize("name", ["wikitext-2", "ptb"])
def test_standard_token_counts_and_vocabulary(name, mirror, monkeypatch):
    """The counts a comparable perplexity needs (ANCHORS.md), from the registry entry."""
    if mirror is None:
        pytest.skip("no local corpus mirror (set LM_CORPORA)")
    monkeypatch.setenv("LM_CORPORA", str(mirror))
    corpus = open_corpus(name)
    cfg = build_config({"data": {"corpus": name}})
    assert cfg.tokenizer.text == "tokenized"  # the registry keeps benchmark streams as they are
    stats = corpus_stats(corpus, Tokenizer.train(corpus.lines("train"), cfg.tokenizer))
    standard = {"wikitext-2": ({"train": 2088628, "valid": 217646, "test": 245569}, 33278),
                "ptb": ({"train": 929589, "valid": 73760, "test": 82430}, 10000)}[name]
    assert (stats["tokens"], stats["vocab"]) == standard
    assert corpus.expected == {"tokens": standard[0], "vocab": standard[1]}


def test_cli_corpus_info_json_reports_the_standard_counts(mirror, tmp_path):
    if mirror is None:
        pytest.skip("no local corpus mirror (set LM_CORPORA)")
    out = subprocess.run([sys.executable, "-m", "lm", "corpus", "info", "ptb", "--json"], cwd=REPO,
                         env={"LM_CORPORA": str(mirror), "LM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
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


def test_cr_only_line_endings_read_as_lines(tmp_path):
    """Classic Mac files end lines with a lone CR: six lines, not one (which would leave
    nothing to hold out)."""
    f = tmp_path / "cr.txt"
    f.write_bytes(b"the cat sat\ron the mat\rthe dog ran\raway from it\rand more\rlines here\r")
    c = open_corpus(str(f), held_out=0.2)
    assert [*c.lines("train"), *c.lines("valid"), *c.lines("test")] == [
        "the cat sat", "on the mat", "the dog ran", "away from it", "and more", "lines here"]
    assert list(c.lines("test")) == ["lines here"]


def test_lf_crlf_and_cr_mix_and_no_other_separator_ends_a_line(tmp_path):
    """CR CR LF is an empty line after the first CR; vertical tab, form feed, the
    separators \x1c-\x1e, NEL (U+0085) and U+2028/U+2029 stay inside their line."""
    f = tmp_path / "mix.txt"
    inside = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    f.write_bytes(f"one\ntwo\r\nthree\rfour\r\r\n{inside}\n\rlast\r".encode())
    assert list(corpus_module._read_lines(f)) == ["one", "two", "three", "four", "", inside, "", "last"]


@pytest.mark.parametrize("limit", [4, 5, 8])
def test_line_ends_split_across_reads_are_found(tmp_path, monkeypatch, limit):
    """Reads come in blocks of about MAX_LINE_BYTES: with tiny blocks every CRLF, CR CR
    and CR LF lands on a block boundary somewhere, and each must still end one line."""
    monkeypatch.setattr(corpus_module, "MAX_LINE_BYTES", limit)
    ends = [b"\n", b"\r\n", b"\r"]
    text = b"".join(b"ab"[: i % 3] + ends[i % 3] + b"xyz"[: i % 4] + ends[(i * 7) % 3] for i in range(60))
    (tmp_path / "f.txt").write_bytes(text)
    assert list(corpus_module._raw_lines(tmp_path / "f.txt")) == text.splitlines()


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


def _three_splits(d, text=b"hello world\n"):
    for s in ("train", "valid", "test"):
        (d / f"{s}.txt").write_bytes(text)


def test_invalid_utf8_is_replaced_and_reported_or_refused_with_strict(tmp_path):
    _three_splits(tmp_path)
    (tmp_path / "valid.txt").write_bytes(b"fine line\ncaf\xe9 and \xff\xfe here\n")
    c = open_corpus(str(tmp_path))
    with pytest.warns(DataWarning, match=r"3 invalid UTF-8 byte\(s\) replaced .* first on line 2"):
        lines = list(c.lines("valid"))
    assert lines == ["fine line", "caf\ufffd and \ufffd\ufffd here"]
    with pytest.raises(DataError, match="not valid UTF-8: line 2"):
        list(open_corpus(str(tmp_path), strict=True).lines("valid"))


def test_each_held_out_split_reports_the_bad_bytes_in_its_own_lines(tmp_path):
    """One file, three splits: a split's read warns about its own lines (line numbers
    in the file), however early it stops; lines of other splits are not even decoded."""
    f = tmp_path / "mine.txt"
    f.write_bytes(b"caf\xe9 one\n" + b"fine\n" * 16 + b"\xff\xfe two\n" + b"fine\n" * 2)  # 20 lines
    c = open_corpus(str(f), held_out=0.1)  # train 16, valid 2, test 2
    with pytest.warns(DataWarning, match=r"mine.txt \(train split\): 1 invalid UTF-8 byte\(s\) replaced .* first on line 1;"):
        assert len(list(c.lines("train"))) == 16
    with pytest.warns(DataWarning, match=r"mine.txt \(valid split\): 2 invalid UTF-8 byte\(s\) replaced .* first on line 18;"):
        assert list(c.lines("valid")) == ["fine", "\ufffd\ufffd two"]
    assert c.found == {"train": [{"file": 0, "bad": 1, "line": 1, "byte": 3, "long": 0}],
                       "valid": [{"file": 0, "bad": 2, "line": 18, "byte": 0, "long": 0}]}
    strict = open_corpus(str(f), held_out=0.1, strict=True)
    assert list(strict.lines("test")) == ["fine", "fine"]  # its lines are valid
    with pytest.raises(DataError, match="not valid UTF-8: line 18, byte 0"):
        list(strict.lines("valid"))


def test_strict_refusal_while_training_subwords_is_the_one_line_error(tmp_path):
    """SentencePiece reads the lines itself and would wrap the refusal in its own
    INTERNAL error."""
    _three_splits(tmp_path, "".join(f"the cat {i} sat on the mat .\n" for i in range(50)).encode() + b"caf\xe9\n")
    strict = open_corpus(str(tmp_path), strict=True)
    with pytest.raises(DataError) as e:
        Tokenizer.train(strict.lines("train"), TokenizerConfig(kind="bpe", vocab_size=320))
    assert str(e.value).startswith(f"{tmp_path / 'train.txt'} is not valid UTF-8: line 51, byte 3")


def test_binary_file_is_refused(tmp_path):
    _three_splits(tmp_path)
    (tmp_path / "train.txt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="binary"):
        list(open_corpus(str(tmp_path)).lines("train"))


def test_utf8_bom_is_dropped_and_utf16_or_utf32_files_get_a_conversion_hint(tmp_path):
    text = "the cat sat .\nthe dog ran .\n"
    _three_splits(tmp_path)
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Notepad saves UTF-8
    assert list(open_corpus(str(tmp_path)).lines("train")) == ["the cat sat .", "the dog ran ."]
    for encoding, name in (("utf-16", "UTF-16"), ("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
                           ("utf-32", "UTF-32")):
        (tmp_path / "train.txt").write_bytes(text.encode(encoding))
        with pytest.raises(DataError, match=rf"is {name} text, and lm reads UTF-8: .*iconv -f {name} -t UTF-8"):
            list(open_corpus(str(tmp_path)).lines("train"))


def test_huge_line_without_newline_is_read_in_pieces_cut_at_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "MAX_LINE_BYTES", 64)
    words = [f"w{i}" for i in range(300)]
    (tmp_path / "big.txt").write_text(" ".join(words))  # one line, no newline at all
    with pytest.warns(DataWarning, match="big.txt: 1 line\\(s\\) longer than 64 bytes were cut"):
        pieces = list(corpus_module._read_lines(tmp_path / "big.txt"))
    assert len(pieces) > 10 and all(len(p.encode()) <= 64 for p in pieces)
    assert " ".join(pieces).split() == words  # no word was split or lost


def test_empty_splits_are_clear_errors(tmp_path):
    _three_splits(tmp_path)
    c = open_corpus(str(tmp_path))
    tok = Tokenizer.train(c.lines("train"))
    (tmp_path / "test.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        token_stream(c, "test", tok)
    (tmp_path / "train.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no words"):
        Tokenizer.train(c.lines("train"))


def test_word_count_of_raw_text_is_what_a_word_level_model_scores(tmp_path):
    """word_ppl divides a subword model's log-likelihood by word_count: on raw prose
    that must be a word-level model's token count on the same text (WikiText-split
    words, one <eos> per line), lowercased or not, or the two are not comparable."""
    rng = random.Random(0)
    vocab = "Blue a red the ran house mat, it's Don't go! (see) 3.5 well-known U.S. mat. The".split()
    _three_splits(tmp_path, "".join(" ".join(rng.choices(vocab, k=12)) + "\n" for _ in range(200)).encode())
    c = open_corpus(str(tmp_path))
    whitespace_words = sum(len(line.split()) + 1 for line in c.lines("valid"))
    for lowercase in (False, True):
        word = Tokenizer.train(c.lines("train"), TokenizerConfig(lowercase=lowercase))
        bpe = Tokenizer.train(c.lines("train"), TokenizerConfig(kind="bpe", vocab_size=320, lowercase=lowercase))
        assert word.text == bpe.text == "raw"
        n = word_count(c, "valid", bpe)
        assert n == token_stream(c, "valid", word, cache=False).numel() > whitespace_words
    assert word_count(c, "valid") == whitespace_words  # no tokenizer: text taken as already split


def test_registered_corpus_without_mirror_falls_back_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_CORPORA", str(tmp_path))  # empty mirror
    monkeypatch.chdir(tmp_path)
    c = open_corpus("wikitext-2")
    assert c.where == "hub:Salesforce/wikitext/wikitext-2-v1"
    assert c.hub["splits"]["valid"] == "validation"


def test_hub_corpus_reads_rows_as_lines_and_fails_offline_with_the_mirror_hint(monkeypatch, tmp_path, capsys):
    """The hub path with a stand-in for `datasets` (no network here): rows split into
    lines, the split name mapped, and a failure one DataError naming what to set."""
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        if fail:
            raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\nmore detail")
        return iter([{"text": " = Title = \n"}, {"text": ""}, {"text": "one\ntwo\n"}])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    monkeypatch.setenv("LM_CORPORA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    c = open_corpus("wikitext-2")
    fail = False
    assert list(c.lines("valid")) == [" = Title = ", "", "one", "two"]
    assert calls == [("Salesforce/wikitext", "wikitext-2-v1", "validation", True)]
    assert "from the Hugging Face hub" in capsys.readouterr().err
    fail = True
    with pytest.raises(DataError, match=rf"ConnectionError: Couldn't reach .*\); LM_CORPORA={tmp_path} holds no "
                                        r"wikitext-2/train.txt, valid.txt and test.txt") as e:
        list(c.lines("train"))
    assert "\n" not in str(e.value)
    monkeypatch.delenv("LM_CORPORA")
    with pytest.raises(DataError, match="with no internet, set LM_CORPORA to a directory holding wikitext-2/"):
        list(c.lines("test"))


def test_a_quoted_glob_reads_the_files_it_matches_in_path_order(tmp_path):
    (tmp_path / "b.md").write_text("".join(f"b{i}\n" for i in range(50)))
    (tmp_path / "a.md").write_text("".join(f"a{i}\n" for i in range(50)))
    (tmp_path / "skip.txt").write_text("not matched\n")
    c = open_corpus(str(tmp_path / "*.md"), held_out=0.1)
    lines = [*c.lines("train"), *c.lines("valid"), *c.lines("test")]
    assert lines == [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)]  # a.md first, held out at the end
    assert len(list(c.lines("test"))) == 10
    with pytest.raises(DataError, match=r"'.*\*\.rst' matches no file: check the pattern"):
        open_corpus(str(tmp_path / "*.rst"))


def test_users_own_registry_entry_points_at_a_path(tmp_path, monkeypatch):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    (tmp_path / "corpora" / "mine.toml").write_text('description = "my notes"\npath = "../texts"\n')
    monkeypatch.chdir(tmp_path)
    c = open_corpus("mine", held_out=0.1)
    assert c.name == "mine" and len(list(c.lines("test"))) == 10 and len(list(c.lines("train"))) == 80


@pytest.mark.parametrize("entry, says", [("path = 5", 'path must be a "string", got 5'),
                                         ("defaults = 5", "defaults must be a [defaults] table, got 5")])
def test_a_mistyped_registry_entry_is_a_one_line_error_naming_its_file(tmp_path, monkeypatch, entry, says):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "mine.toml").write_text(entry + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"registry entry .*mine.toml: {re.escape(says)}"):
        open_corpus("mine")


def test_corpus_info_splits_a_file_as_train_would_with_held_out(tmp_path, capsys):
    from lm.cli import main

    (tmp_path / "notes.txt").write_text("".join(f"line number {i} of my notes\n" for i in range(200)))
    counts = {}
    for held in (None, "0.2"):
        assert main(["corpus", "info", str(tmp_path / "notes.txt"), "--json"] + (["--held-out", held] if held else [])) == 0
        counts[held] = json.loads(capsys.readouterr().out)["tokens"]
    assert counts[None]["valid"] == 10 * 7 and counts["0.2"]["valid"] == 40 * 7  # 5% and 20% of 200 lines of 6 words


def test_a_broken_registry_entry_breaks_only_the_commands_that_use_it(tmp_path, monkeypatch, capsys):
    """corpora/bad2.toml with `path = 5` once failed lm train on a plain file, lm eval and
    lm corpus list: an entry is read when it is used, and the list shows its problem."""
    from lm.cli import main

    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "bad2.toml").write_text("path = 5\n")
    (tmp_path / "corpora" / "bad3.toml").write_text("this is not toml\n")
    (tmp_path / "notes.txt").write_text("".join(f"line {i} of notes\n" for i in range(100)))
    monkeypatch.chdir(tmp_path)
    assert len(list(open_corpus(str(tmp_path / "notes.txt")).lines("test"))) == 5
    assert build_config({"data": {"corpus": str(tmp_path / "notes.txt")}}).data.corpus.endswith("notes.txt")
    assert main(["corpus", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r'^bad2 +\(broken: path must be a "string", got 5\)$', out, re.M)
    assert re.search(r"^bad3 +\(broken: .*not valid TOML", out, re.M)
    assert re.search(r"^wikitext-2 +WikiText-2 v1", out, re.M)
    assert main(["corpus", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bad2"]["description"] == '(broken: path must be a "string", got 5)'
    with pytest.raises(ConfigError, match='bad2.toml: path must be a "string", got 5'):
        open_corpus("bad2")
    with pytest.raises(ConfigError, match='bad2.toml: path must be a "string"'):
        build_config({"data": {"corpus": "bad2"}})


def test_a_registry_entry_with_an_unknown_key_or_a_missing_path_names_its_file(tmp_path, monkeypatch):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "typo.toml").write_text('pth = "../texts"\n')
    (tmp_path / "corpora" / "gone.toml").write_text('path = "/nonexistent/x"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        open_corpus("typo")
    assert str(e.value) == (f"corpus registry entry {tmp_path / 'corpora' / 'typo.toml'}: unknown key(s) pth; the known "
                            "keys are description, path, mirror, tokens, vocab, hub, defaults")
    with pytest.raises(DataError) as e:
        open_corpus("gone")
    assert str(e.value) == (f"corpus 'gone': its registry entry {tmp_path / 'corpora' / 'gone.toml'} has path = "
                            "'/nonexistent/x', and /nonexistent/x does not exist: fix the path there "
                            "(a relative path is relative to the TOML file)")


def test_bad_byte_warnings_name_the_file_and_the_split_each_refers_to(tmp_path):
    """A Latin-1 file read for two splits gave two warnings ("line 7", "line 390") that
    did not say which split each was about; a cache hit says the same again."""
    import warnings

    f = tmp_path / "latin.txt"
    lines = [f"line {i} here" for i in range(1, 401)]
    lines[6], lines[389] = "caf\xe9 na\xefve", "d\xe9j\xe0 vu"
    f.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    c = open_corpus(str(f))  # 400 lines: train 1-360, valid 361-380, test 381-400
    tok = Tokenizer.train([line for line in c.lines("valid")])
    for _ in range(2):  # built, then replayed from the token cache
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            for split in ("train", "valid", "test"):
                token_stream(c, split, tok)
        assert [str(w.message) for w in got] == [
            f"{f} (train split): 2 invalid UTF-8 byte(s) replaced by U+FFFD, first on line 7; pass --strict to "
            "refuse such files",
            f"{f} (test split): 2 invalid UTF-8 byte(s) replaced by U+FFFD, first on line 390; pass --strict to "
            "refuse such files"]


def test_a_folder_with_split_files_names_the_text_files_it_does_not_read(tmp_path):
    _three_splits(tmp_path)
    (tmp_path / "extra.txt").write_text("seven hundred kilobytes of text\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "notes.txt").write_text("more\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    with pytest.warns(DataWarning) as got:
        c = open_corpus(str(tmp_path))
    assert [str(w.message) for w in got] == [
        f"{tmp_path}: train.txt, valid.txt, test.txt are its train/valid/test splits, so 2 other text file(s) in it "
        "are not read: extra.txt, more/notes.txt. Add their text to the split files, or move those out of the "
        "folder to have all of it read and a fraction held out"]
    assert list(c.lines("train")) == ["hello world"]


def test_a_double_star_glob_is_recursive_and_a_tiny_split_is_named_with_the_fix(tmp_path):
    import warnings

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "top.txt").write_text("".join(f"top {i} line here\n" for i in range(10)))
    (tmp_path / "a" / "one.txt").write_text("".join(f"one {i} line here\n" for i in range(200)))
    (tmp_path / "a" / "b" / "two.txt").write_text("".join(f"two {i} line here\n" for i in range(190)))
    c = open_corpus(str(tmp_path / "**" / "*.txt"))
    assert c.files == [tmp_path / "a" / "b" / "two.txt", tmp_path / "a" / "one.txt", tmp_path / "top.txt"]
    tok = Tokenizer.train(c.lines("train"))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert token_stream(c, "test", tok, cache=False).numel() == 20 * 5  # 5% of 400 lines
    assert got == []
    only_top = open_corpus(str(tmp_path / "*.txt"), held_out=0.1)  # 10 lines: 1 held out for test
    tok = Tokenizer.train(only_top.lines("train"))
    with pytest.warns(DataWarning) as got:
        assert token_stream(only_top, "test", tok).numel() == 5
    assert [str(w.message) for w in got] == [
        f"the test split of {tmp_path / '*.txt'} has only 5 token(s): a perplexity on it means little; add text, "
        "raise --held-out, or check what the corpus matches (a quoted glob's '**' matches folders recursively)"]


@pytest.mark.parametrize("size", [330_000, 1_500_000])
def test_a_file_with_no_newline_holds_out_five_percent_of_its_text(tmp_path, monkeypatch, size):
    """A 3.3 MB file with no newline, cut into 1 MiB pieces, held out a whole piece as
    valid (32% of the text); a 1.5 MB one (2 pieces) was refused as having 2 lines. Here
    at a 100 kB cut for speed: valid and test each hold about 5% of the words."""
    import warnings

    monkeypatch.setattr(corpus_module, "MAX_LINE_BYTES", 100_000)
    rng = random.Random(0)
    words = [rng.choice(["the", "cat", "sat", "on", "a", "mat", "."]) for _ in range(size // 3)]
    f = tmp_path / "one-line.txt"
    f.write_text(" ".join(words))
    c = open_corpus(str(f))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        parts = {s: [w for line in c.lines(s) for w in line.split()] for s in ("train", "valid", "test")}
    assert parts["train"] + parts["valid"] + parts["test"] == words  # nothing lost, in order
    for s in ("valid", "test"):
        assert 0.04 < len(parts[s]) / len(words) <= 0.055, (s, len(parts[s]) / len(words))
    assert f"longer than {c.piece_bytes:,} bytes were cut" in str(got[0].message)
    assert c.describe("valid") == f"{f} valid split (the 5% before the last 5% of its text)"


def test_ordinary_lines_are_held_out_by_line_as_before(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("".join(f"paragraph {i} " + "word " * (i % 50) + "\n" for i in range(1000)))
    c = open_corpus(str(f))
    assert c.piece_bytes is None and c.bounds["test"] == (950, 1000) and c.bounds["valid"] == (900, 950)


def test_text_too_small_to_hold_out_says_what_it_needs(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("hello world")  # no newline
    with pytest.raises(DataError) as e:
        open_corpus(str(f))
    assert str(e.value) == (f"{f} is too small to hold out valid and test text: it has 1 line(s), 11 bytes. A corpus "
                            "with no valid/test files needs at least 3 lines (one each for train, valid and test; "
                            "hundreds make a useful corpus), or give a directory with train.txt, valid.txt and test.txt")
