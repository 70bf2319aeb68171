"""Typographic apostrophes in raw text (Word documents, ebooks, phones) split exactly as
the straight "'" does; curly quotation marks stay quotation marks."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.config import TokenizerConfig
from lm.text import pretokenize
from lm.tokenizer import Tokenizer

CURLY = [
    ("It’s late. Don’t", "It 's late . Don 't"),
    ("we’ll see, they’re here, I’m sure, you’ve, he’d", "we 'll see , they 're here , I 'm sure , you 've , he 'd"),
    ("the 1990’s and the Girls’ team", "the 1990 's and the Girls ' team"),
    ("O’Brien", "O'Brien"),
    # at a word's start: an elision, as the straight "'tis" splits
    ("’tis the ’90s", "' tis the ' 90s"),
    # U+02BC (modifier letter apostrophe) is never a quotation mark; U+2018 typed for an
    # apostrophe inside a word
    ("itʼs the Girlsʼ", "it 's the Girls '"),
    ("don‘t", "don 't"),
    # quotation marks stay: “ ” always, ‘ ’ around a quote
    ("“It’s late,” he said.", "“ It 's late , ” he said ."),
    ("‘quoted’ text", "‘ quoted ’ text"),
    ("‘Hi’ and ‘bye’", "‘ Hi ’ and ‘ bye ’"),
    ("He said ‘don’t’ twice", "He said ‘ don 't ’ twice"),
    ("‘Come,’ he said, and took the girls’ hands.", "‘ Come , ’ he said , and took the girls ' hands ."),
    # a later ’ after punctuation closes the quote: the one after "Girls" is an apostrophe
    ("‘The Girls’ team won,’ he said.", "‘ The Girls ' team won , ’ he said ."),
    ("a ’ b", "a ’ b"),
    # a ’ standing alone (as the benchmark corpora split "I ’ m") closes nothing
    ("that awful ‘dread’ feeling when I ’ m", "that awful ‘ dread ’ feeling when I ’ m"),
]


@pytest.mark.parametrize("text, expected", CURLY)
def test_typographic_apostrophes_split_as_the_straight_one(text, expected):
    assert pretokenize(text) == expected
    assert pretokenize(expected) == expected


def test_curly_and_straight_text_give_the_same_tokens():
    assert pretokenize("It’s late. I don’t know; they’re the Girls’.") == \
        pretokenize("It's late. I don't know; they're the Girls'.") == \
        "It 's late . I don 't know ; they 're the Girls ' ."


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([*"asStnd9 .,’'-()\"", "ll", "O", "<unk>", "é"])).map("".join))
def test_without_opening_quotes_a_curly_apostrophe_is_the_straight_one(text):
    # With no "‘" on the line, every "’" next to a word is an apostrophe; one standing
    # alone is a quotation mark, a token by itself just as a lone "'" is.
    assert pretokenize(text).replace("’", "'") == pretokenize(text.replace("’", "'"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"asStn9 .,’‘ʼ'“”-", "ll"])).map("".join))
def test_curly_marks_are_idempotent(text):
    once = pretokenize(text)
    assert pretokenize(once) == once


def test_a_model_trained_on_curly_text_knows_what_the_keyboard_types():
    curly = Tokenizer.train(["It’s late. I don’t know, the Girls’ team."], TokenizerConfig(text="raw"))
    straight = Tokenizer.train(["It's late. I don't know, the Girls' team."], TokenizerConfig(text="raw"))
    assert curly.words == straight.words
    assert "'s" in curly.word_to_id and "'t" in curly.word_to_id and "’" not in curly.word_to_id
    typed = curly.encode_typed("It’s late. I don’t")
    assert curly.unk_id not in typed and typed == curly.encode_typed("It's late. I don't")


def test_a_typed_apostrophe_at_the_end_stays_one_inside_a_quote():
    tok = Tokenizer.train(["He said ‘ don 't ’ ."], TokenizerConfig(text="tokenized"))
    assert tok.typed_words("He said ‘don’") == ["He", "said", "‘", "don", "'"]  # "t" comes next
    assert tok.typed_words("He said ‘don’t’ ") == ["He", "said", "‘", "don", "'t", "’"]
