"""A sentence-final period splits off before a lower-case word too, except after a known
abbreviation: chat and notes start sentences in lower case."""
from __future__ import annotations

import pytest

from lm.config import TokenizerConfig
from lm.text import pretokenize
from lm.tokenizer import Tokenizer

PERIODS = [
    ("ok. see you", "ok . see you"),
    ("He sighed quietly. in 1957 it rained. she left.", "He sighed quietly . in 1957 it rained . she left ."),
    ("yes. no. maybe.", "yes . no . maybe ."),
    # abbreviations stay whole before a lower-case word, as WikiText (Moses) has them
    ("Smith Jr. and Acme Inc. and Co. etc. and so on", "Smith Jr. and Acme Inc. and Co. etc. and so on"),
    ("Smith et al. found c. the end, var. alba, 7th Ave. and (p. xxii)",
     "Smith et al. found c. the end , var. alba , 7th Ave. and ( p. xxii )"),
    ("the e.g. case and U.S. troops", "the e.g. case and U.S. troops"),
    # before a capital, the Moses rules as before
    ("Jr. Then etc. The end.", "Jr . Then etc . The end ."),
]


@pytest.mark.parametrize("text, expected", PERIODS)
def test_a_sentence_end_splits_before_a_lower_case_word(text, expected):
    assert pretokenize(text) == expected
    assert pretokenize(expected) == expected


def test_lower_case_chat_has_no_word_period_entries():
    lines = ["ok. see you at 5. bring the cake.", "sure. see you. ok."]
    tok = Tokenizer.train(lines, TokenizerConfig(text="raw"))
    assert sorted(tok.words[2:]) == sorted(["ok", ".", "see", "you", "at", "5", "bring", "the", "cake", "sure"])
