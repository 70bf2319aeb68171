import re

import numpy as np
import pytest
import sentencepiece as spm

from lm.config import TokenizerConfig
from lm.errors import DataError
from lm.tokenizer import EOS, UNK, Tokenizer

LINES = ["the cat sat on the mat", "", "the dog sat <unk> the log", "the the cat"]


def test_standard_stream_one_eos_per_line_blank_lines_included():
    tok = Tokenizer.train(LINES)
    ids = np.concatenate(list(tok.encode_lines(LINES)))
    assert len(ids) == sum(len(l.split()) for l in LINES) + len(LINES)
    assert (ids == tok.eos_id).sum() == len(LINES)


def test_vocabulary_is_training_words_plus_eos_in_frequency_order():
    tok = Tokenizer.train(LINES)
    words = {w for l in LINES for w in l.split()} - {UNK}
    # <unk> and <eos> plus every distinct word: the standard "distinct + <eos>" count
    assert tok.vocab_size == len(words) + 2
    assert tok.words[tok.unk_id] == UNK and tok.words[tok.eos_id] == EOS
    assert tok.words[2] == "the"  # most frequent first: the adaptive head relies on it


def test_unknown_words_map_one_for_one_never_merged():
    tok = Tokenizer.train(LINES)
    ids = tok.encode_line("the zebra quokka <unk> <unk> cat")
    assert ids == [tok.word_to_id["the"]] + [tok.unk_id] * 4 + [tok.word_to_id["cat"]]


def test_table_encoding_equals_sentencepiece_where_all_words_known():
    tok = Tokenizer.train(LINES)
    line = "the cat sat on the log"
    assert tok.encode_line(line) == tok.sp.encode(line)


def test_bytes_round_trip_encodes_identically():
    tok = Tokenizer.train(LINES)
    again = Tokenizer.from_dict(tok.to_dict())
    assert again.words == tok.words
    assert again.encode_line("the dog sat xyz") == tok.encode_line("the dog sat xyz")
    assert again.fingerprint == tok.fingerprint


def test_vocab_size_cap_and_min_count_keep_most_frequent():
    lines = ["a a a a b b b c c d"]
    capped = Tokenizer.train(lines, TokenizerConfig(vocab_size=4))
    assert capped.words[2:] == ["a", "b"]
    assert capped.encode_line("c d") == [capped.unk_id] * 2
    counted = Tokenizer.train(lines, TokenizerConfig(min_count=2))
    assert counted.words[2:] == ["a", "b", "c"]


def test_decode_joins_words_and_turns_eos_into_newlines():
    tok = Tokenizer.train(LINES)
    ids = [i for ids in tok.encode_lines(["the cat", "the dog"]) for i in ids]
    assert tok.decode(ids) == "the cat\nthe dog\n"


def test_special_pieces_and_normalization_identity():
    tok = Tokenizer.train(["Ｆｕｌｌ width ﬁ ligature"])
    # identity normalization: NFKC would have folded these into ASCII
    assert "Ｆｕｌｌ" in tok.word_to_id and "ﬁ" in tok.word_to_id
    assert isinstance(spm.SentencePieceProcessor(model_proto=tok.model_bytes).get_piece_size(), int)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_open_vocabulary_keeps_unk_and_eos_one_for_one(kind):
    lines = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird") for v in ("red", "old")] * 20
    tok = Tokenizer.train(lines, TokenizerConfig(kind=kind, vocab_size=320))
    assert tok.subword and tok.vocab_size <= 320
    ids = tok.encode_line("the zebra <unk> <unk> sat")
    assert ids.count(tok.unk_id) == 2  # only the corpus's own <unk>: bytes cover the rest
    assert tok.decode(ids).split() == ["the", "zebra", "<unk>", "<unk>", "sat"]
    assert list(tok.encode_lines(["a b", ""]))[1] == [tok.eos_id]
    again = Tokenizer.from_dict(tok.to_dict())
    assert again.kind == kind and again.encode_line("the zebra sat") == tok.encode_line("the zebra sat")


PROSE = ["Hello, world. It's 3.5 km away!", "The well-known (and long) road, they said.",
         "It's here: 1,000 people went."]


def test_raw_mode_splits_prose_and_renders_it_back():
    tok = Tokenizer.train(PROSE, TokenizerConfig(text="raw"))
    for w in ("Hello", ",", "world", ".", "'s", "3", "@.@", "@-@", "(", ")"):
        assert w in tok.word_to_id
    for line in PROSE:  # natural text -> tokens -> natural text, exactly
        ids = tok.encode_line(line)
        assert tok.unk_id not in ids
        assert tok.render(ids) == line


def test_typed_text_meets_a_tokenized_vocabulary():
    tok = Tokenizer.train(["Hello , world . It 's fine ."], TokenizerConfig(text="tokenized"))
    assert tok.encode_line("Hello , world .") == tok.encode_typed("Hello, world.")
    assert tok.unk_id not in tok.encode_typed("Hello, world. It's fine.")
    # the stream itself is left alone: unsplit "world." is one unknown word there
    assert tok.encode_line("world.") == [tok.unk_id]
    assert tok.encode_typed("Hello\nworld") == [tok.word_to_id["Hello"], tok.eos_id, tok.word_to_id["world"]]


def test_a_typographic_apostrophe_in_a_word_reads_as_the_corpus_apostrophe():
    tok = Tokenizer.train(["It 's fine . I don 't know ."], TokenizerConfig(text="tokenized"))
    assert tok.typed_words("It’s fine. I don’t") == tok.typed_words("It's fine. I don't") == \
        ["It", "'s", "fine", ".", "I", "don", "'t"]
    assert tok.typed_words("O’Brien and the Girls’") == ["O'Brien", "and", "the", "Girls", "'"]
    assert tok.typed_words("‘quoted’ text") == ["‘", "quoted", "’", "text"]  # quotation marks stay as they are


def test_lowercase_folds_training_and_typed_text_and_is_stored():
    tok = Tokenizer.train(["the cat sat"], TokenizerConfig(text="tokenized", lowercase=True))
    assert tok.encode_typed("The CAT sat") == tok.encode_line("the cat sat")
    again = Tokenizer.from_dict(tok.to_dict())
    assert (again.text, again.lowercase) == ("tokenized", True) and again.fingerprint == tok.fingerprint
    other = Tokenizer(tok.model_bytes, "word", "raw", True)
    assert other.fingerprint != tok.fingerprint  # same vocabulary, different encoding


def test_typed_prose_on_the_wikitext2_vocabulary_stays_in_vocabulary(mirror):
    if mirror is None:
        pytest.skip("no local corpus mirror (set LM_CORPORA)")
    lines = (mirror / "wikitext-2" / "train.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer.train(lines, TokenizerConfig(text="tokenized"))
    words = tok.typed_words("However, world. It's 3.5 km away, well-known (1,000 m)!")
    assert words == ["However", ",", "world", ".", "It", "'s", "3", "@.@", "5", "km", "away", ",", "well",
                     "@-@", "known", "(", "1", "@,@", "000", "m", ")", "!"]
    assert tok.unk_id not in tok.encode_typed("However, world. It's 3.5 km away, well-known (1,000 m)!")


def test_a_subword_vocab_size_below_what_the_text_needs_says_the_size_it_needs():
    """Each character of the text (but the rarest) needs a piece besides the 256 bytes:
    ordinary English needs more than the 320 validation allows. The error names the
    size SentencePiece needs, and that size works while one less does not."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éèàçôü.,;:!?'\"()-"
    lines = [" ".join(chars[(i + j) % len(chars)] * 3 for j in range(12)) for i in range(400)]
    with pytest.raises(DataError) as e:
        Tokenizer.train(lines, TokenizerConfig(kind="bpe", vocab_size=320))
    m = re.fullmatch(r"--vocab-size 320 is too small for this text: a bpe vocabulary of it needs at least (\d+) "
                     r"pieces \(256 byte pieces, <unk>, <eos> and one per character but the rarest\); "
                     r"pass --vocab-size (\d+) or more", str(e.value))
    assert m and m[1] == m[2] and "character_coverage" not in str(e.value)
    need = int(m[1])
    assert need > 258 + len(chars)  # every character here is common (and so is the word mark)
    assert Tokenizer.train(lines, TokenizerConfig(kind="unigram", vocab_size=need)).vocab_size == need
    with pytest.raises(DataError, match=f"needs at least {need} pieces"):
        Tokenizer.train(lines, TokenizerConfig(kind="unigram", vocab_size=need - 1))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_a_subword_vocabulary_cut_short_by_the_text_says_so_on_each_run(kind, tmp_path, capsys):
    from lm import data
    from lm.corpus import open_corpus

    from conftest import write_corpus

    c = open_corpus(str(write_corpus(tmp_path / kind)))
    cfg = TokenizerConfig(kind=kind, vocab_size=100_000)
    for _ in range(2):  # trained, then from the cache: the note both times
        tok = data.load_tokenizer(c, cfg)
        assert 0 < tok.vocab_size < 100_000
        assert capsys.readouterr().err == (f"lm: this text supports only {tok.vocab_size:,} {kind} pieces: the "
                                           f"vocabulary has {tok.vocab_size:,}, not the --vocab-size 100,000 asked for\n")
    if tok.vocab_size >= 320:  # (unigram on this tiny text stops below the smallest size allowed)
        Tokenizer.train(c.lines("train"), TokenizerConfig(kind=kind, vocab_size=tok.vocab_size))  # supported
    Tokenizer.train(c.lines("train"), TokenizerConfig(kind=kind))  # the default: not a size anyone asked for
    assert capsys.readouterr().err == ""
