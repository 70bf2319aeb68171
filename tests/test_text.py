"""lm.text: natural text <-> WikiText-convention tokens."""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.text import detokenize, detokenize_text, pretokenize


def _corpora() -> Path:
    return Path(os.environ.get("LM_CORPORA") or Path(__file__).resolve().parents[2] / "shared" / "corpora")


def _lines(relpath: str, limit: int | None = None) -> list[str]:
    path = _corpora() / relpath
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]


PRETOKENIZED = [
    ("Hello, world. It's 3.5 km away!", "Hello , world . It 's 3 @.@ 5 km away !"),
    ("a well-known, long-term plan", "a well @-@ known , long @-@ term plan"),
    ("1,000,000 people", "1 @,@ 000 @,@ 000 people"),
    ("(see below)", "( see below )"),
    ('He said "hi there".', 'He said " hi there " .'),
    # WikiText splits before the apostrophe ("don 't"), not Penn-style ("do n't").
    ("I don't know; they're here, we'll see.", "I don 't know ; they 're here , we 'll see ."),
    ("the 1990's and the Girls' team", "the 1990 's and the Girls ' team"),
    # An inner period marks an abbreviation, kept whole even at the end of a sentence.
    ("The U.S. Army. It went to the U.S. Then home.", "The U.S. Army . It went to the U.S. Then home ."),
    ("Dr. Smith of St. Louis, No. 5. No. We live at No.", "Dr. Smith of St. Louis , No. 5 . No . We live at No ."),
    # A period stays before a lower-case word after a known abbreviation ("Jr. and"), as
    # Moses keeps it (tests/test_text_periods.py); else it splits.
    ("Mr. J. R. Smith Jr. Then Jr. and", "Mr. J. R. Smith Jr . Then Jr. and"),
    ("a  lot \t of\n space ", "a lot of space"),
    ("", ""),
    ("   ", ""),
    ("50% of $5 & 2:30 km/h – or — so", "50 % of $ 5 & 2 : 30 km / h – or — so"),
    ("Wait... what?!", "Wait ... what ? !"),
    ("a <unk> and <unk>'s <unk>-<unk>", "a <unk> and <unk> 's <unk> @-@ <unk>"),
    # The Moses rule: a quote opened after a word splits off ("' B '").
    ("the 'B' team", "the ' B ' team"),
    # Deliberate difference from WikiText ("O 'Brien"): see the module docstring.
    ("O'Brien", "O'Brien"),
    ("e.g. this; 3.5. And", "e.g. this ; 3 @.@ 5 . And"),
    ("x_y and km²'s", "x _ y and km ² ' s"),
    # Invisible characters: soft hyphens, controls, direction marks and word joiners go;
    # a zero-width space separates; the zero-width non-joiner stays inside its word.
    ("inter\u00adnational re\u00adsults", "international results"),
    ("ab\x7fc\x9bd\x07e\x85f", "abcde f"),
    ("\u202bnested\u202c \u200eword\u200f text\u2060here", "nested word texthere"),
    ("two\u200bwords", "two words"),
    ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 ."),
    # WikiText keeps U+FEFF as a token of its own (train.txt, "W \ufeff / 51").
    ("3 ° W\ufeff/ 51", "3 ° W \ufeff / 51"),
    # Decomposed accents (macOS, copied text) are composed, as the corpora are.
    ("cafe\u0301 Zu\u0308rich", "caf\u00e9 Z\u00fcrich"),
]


@pytest.mark.parametrize("text, expected", PRETOKENIZED)
def test_pretokenize_examples(text, expected):
    assert pretokenize(text) == expected
    assert pretokenize(expected) == expected


DETOKENIZED = [
    ("Hello , world . It 's 3 @.@ 5 km away !", "Hello, world. It's 3.5 km away!"),
    ("a well @-@ known , 1 @,@ 000 km plan", "a well-known, 1,000 km plan"),
    ('He said " hi there " and " bye " .', 'He said "hi there" and "bye".'),
    ("( see below ) ; 50 % of $ 5 at 2 : 30", "(see below); 50% of $5 at 2:30"),
    ("I don 't know , do n't ask", "I don't know, don't ask"),
    ("O 'Brien and the Girls ' team", "O'Brien and the Girls' team"),
    ("the ' B ' team", "the 'B' team"),
    ("first line . <eos> second line", "first line.\nsecond line"),
    ("Ohio . . . at", "Ohio. . . at"),
    ("", ""),
]


@pytest.mark.parametrize("tokens, expected", DETOKENIZED)
def test_detokenize_examples(tokens, expected):
    assert detokenize_text(tokens) == expected
    assert detokenize(tokens.split()) == expected


def test_detokenize_then_pretokenize_hand_examples():
    for tokens, _ in DETOKENIZED:
        if "<eos>" not in tokens and "n't" not in tokens and "'Brien" not in tokens:
            assert pretokenize(detokenize_text(tokens)) == tokens


def _first_difference(expected: str, got: str) -> tuple[str, str]:
    a, b = expected.split(), got.split()
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return " ".join(a[max(0, i - 3) : i + 3]), " ".join(b[max(0, i - 3) : i + 3])


def _failure_kind(expected: str, got: str) -> str:
    """A rough category for a round-trip miss, for the report printed by the tests."""
    if re.search(r"[^\s']'\w", got):
        return "word'word kept whole (O'Brien)"
    if "@" in expected + got:
        return "number separator in an unusual place"
    if "." in expected:
        return "period"
    return "other"


def _round_trip(lines: list[str]) -> float:
    misses = collections.Counter()
    examples: dict[str, str] = {}
    for line in lines:
        expected = " ".join(line.split())
        got = pretokenize(detokenize_text(line))
        if got != expected:
            want, have = _first_difference(expected, got)
            kind = _failure_kind(want, have)
            misses[kind] += 1
            examples.setdefault(kind, f"{want!r} -> {have!r}")
    rate = 1 - sum(misses.values()) / len(lines)
    print(f"round trip {rate:.4f} on {len(lines)} lines; misses: {dict(misses)}")
    for kind, example in examples.items():
        print(f"  {kind}: {example}")
    return rate


def test_round_trip_wikitext_raw_valid():
    # Measured 0.9756 (60 of 2461 lines); most misses are Maya names such as "K 'awiil".
    # Seven are sentence ends before a lower-case word, which WikiText keeps whole as Moses
    # does ("Australia. the"); we split them (0.9785 before, see lm.text's docstring).
    assert _round_trip(_lines("wikitext-2-raw-partial/valid.txt")) >= 0.975


def test_round_trip_wikitext_train():
    # Measured 0.9872 on these 5000 lines.
    assert _round_trip(_lines("wikitext-2/train.txt", 5000)) >= 0.98


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_pretokenize_is_idempotent_and_tidy(text):
    once = pretokenize(text)
    assert pretokenize(once) == once
    assert once == once.strip()
    assert "  " not in once


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"aZs9 .,'\"-@<>()_é\u0301:²\u00ad\u200b\u200c\x7f\x85\ufeff", "<unk>", "@-@", "@,@",
                                 "'s", "No", "U.S."])).map("".join))
def test_pretokenize_is_idempotent_on_tricky_alphabet(text):
    once = pretokenize(text)
    assert pretokenize(once) == once
    assert "  " not in once and once == once.strip()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(['"', "'", "@-@", ":", "<eos>", "'s", "."]))))
def test_detokenize_never_raises(tokens):
    assert isinstance(detokenize(tokens), str)
