"""--lowercase folds case after the WikiText split, which reads case (a period before a
lower-case word is kept as an abbreviation's), so folding cannot change the split."""
from __future__ import annotations

from lm.config import TokenizerConfig
from lm.tokenizer import Tokenizer

TEXT = ["He sighed quietly. In 1957 the Dr. left. It rained.", "She sighed quietly. In June it rained."]


def test_lowercase_raw_text_is_split_before_it_is_folded():
    tok = Tokenizer.train(TEXT, TokenizerConfig(text="raw", lowercase=True))
    assert list(tok.prepare(TEXT)) == ["he sighed quietly . in 1957 the dr. left . it rained .",
                                       "she sighed quietly . in june it rained ."]
    assert "quietly." not in tok.word_to_id and "left." not in tok.word_to_id


def test_lowercase_never_grows_the_vocabulary():
    cased = Tokenizer.train(TEXT, TokenizerConfig(text="raw"))
    folded = Tokenizer.train(TEXT, TokenizerConfig(text="raw", lowercase=True))
    assert folded.vocab_size == cased.vocab_size - 1  # "It" and "it" become one word
    assert sorted(folded.words) == sorted({w.lower() for w in cased.words})


def test_typed_text_on_a_lowercase_model_is_split_before_it_is_folded():
    tok = Tokenizer.train(TEXT, TokenizerConfig(text="raw", lowercase=True))
    assert tok.typed_words("He sighed quietly. In 1957") == ["he", "sighed", "quietly", ".", "in", "1957"]
    assert tok.unk_id not in tok.encode_typed("He sighed quietly. In 1957 it rained.")
