"""Display rules for typographic quotation marks: they say which way they face."""
from __future__ import annotations

import pytest

from lm.config import TokenizerConfig
from lm.text import detokenize_text, pretokenize
from lm.tokenizer import Tokenizer

DISPLAYED = [
    ("“ It 's late , Grace , ” Dmitri said . “ The window is heavy . ”",
     "“It's late, Grace,” Dmitri said. “The window is heavy.”"),
    ("‘ quoted ’ text and the Girls ' team", "‘quoted’ text and the Girls' team"),
    ("He said ‘ don 't ’ twice", "He said ‘don't’ twice"),
    ("“ a ” “ b ” ( “ c ” )", "“a” “b” (“c”)"),
    # German quotes open low and close with the marks that open English ones
    ("Er sagte „ Hallo “ und ‚ tschüss ‘ .", "Er sagte „Hallo“ und ‚tschüss‘."),
    ("„ a “ then “ b ”", "„a“ then “b”"),
    # a ’ after a sentence's punctuation closes a quote opened on an earlier line
    ("Come , ’ he said . Yes . ’", "Come,’ he said. Yes.’"),
    # WikiText splits ’ as an apostrophe ("Children ’ s", Moses did not know it): left as it was
    ("The Children ’ s Book", "The Children ’ s Book"),
]


@pytest.mark.parametrize("tokens, expected", DISPLAYED)
def test_curly_quotes_attach_to_the_words_they_enclose(tokens, expected):
    assert detokenize_text(tokens) == expected
    assert pretokenize(expected) == tokens  # and read back as the same tokens


def test_a_model_trained_on_curly_quotes_renders_them_as_written():
    line = "“It’s late, Grace,” Dmitri said. “The window is heavy.”"
    tok = Tokenizer.train([line], TokenizerConfig(text="raw"))
    ids = tok.encode_line(line)
    assert tok.unk_id not in ids
    assert tok.render(ids) == "“It's late, Grace,” Dmitri said. “The window is heavy.”"
    assert tok.display(["“", "It", "'s", "late", ",", "”"]) == "“It's late,”"
