"""Autocomplete metrics: a hand-worked typist, top-k accuracy, and the model rows
(LSTM and n-gram) that feed them."""
import json
import math

import numpy as np
import pytest
import torch

from lm.checkpoint import load_model
from lm.cli import main
from lm.config import TokenizerConfig
from lm.keyboard import NEVER, Ranker, autocomplete, lstm_rows, typed_text
from lm.ngram import KneserNey
from lm.predict import Predictor, WordIndex
from lm.tokenizer import Tokenizer

# A context-free toy model: the same next-word distribution at every position.
TOY = {"the": 0.30, ".": 0.20, "then": 0.15, "cat": 0.10, "sat": 0.08, "car": 0.07, "cab": 0.06,
       "<eos>": 0.03, "<unk>": 0.01}
TEXT = "the cat sat.\nthen the car.\n\ndog"


@pytest.fixture(scope="module")
def toy_tok() -> Tokenizer:
    tok = Tokenizer.train(["the cat sat .", "then the car .", "the cab ."])
    assert sorted(tok.words) == sorted(TOY)
    return tok


def toy_rows(tok: Tokenizer, probs: dict = TOY):
    row = torch.zeros(tok.vocab_size)
    for w, p in probs.items():
        row[tok.eos_id if w == "<eos>" else tok.word_to_id[w]] = math.log(p)

    def rows(stream):  # chunks of two rows, to cross chunk boundaries
        for i in range(0, stream.numel(), 2):
            yield row.expand(min(2, stream.numel() - i), -1)
    return rows


def test_typed_text_layout_and_characters(toy_tok):
    text = typed_text(TEXT, toy_tok)
    layout = [(t.surface, t.space) for t in text.tokens[:4]]
    assert layout == [("the", True), ("cat", True), ("sat", False), (".", False)]
    assert text.chars == len(TEXT) + 1  # every line ends in one line break, the last too
    assert text.line_breaks == 4
    assert text.stream.tolist().count(toy_tok.eos_id) == 4 and text.tokens[-1].id == toy_tok.unk_id
    cut = typed_text(TEXT, toy_tok, max_words=5)  # the second line is cut after "then"
    assert [t.word for t in cut.tokens] == ["the", "cat", "sat", ".", "then"]
    assert cut.stream.numel() == 6 and cut.chars == len("the cat sat.\n") + len("then ")


@pytest.mark.parametrize("k, keystrokes, accepted", [(3, 18, 8), (1, 23, 4)])
def test_keystroke_savings_of_a_hand_worked_text(toy_tok, k, keystrokes, accepted):
    # The text "the cat sat.\nthen the car.\n\ndog" has 32 characters with its four line
    # breaks. Suggestions at a token's start rank: the . then cat sat car cab; "dog" is
    # out of vocabulary. Start ranks: the 0, cat 3, sat 4, . 1, then 2, the 0, car 5, . 1.
    #
    # k = 3:  the    shown at once                        1 key  ("the ")
    #         cat    c -> {cat car cab}: cat first         2 keys ("cat ")
    #         sat    s -> {sat}                            2 keys ("sat", "." sticks to it)
    #         .      shown at once                        1 key, then Enter 1       line 1: 7
    #         then 1, the 1, car: c -> car second 2, . 1, Enter 1                  line 2: 6
    #         blank line: Enter 1;  dog: typed 3 + Enter 1                         total 18
    # k = 1:  line 1 as above but "." is not first: typed, 1 key                   line 1: 7
    #         then: "the" ranks ahead of it after t, th, the -> typed 4 + space 1 = 5
    #         the 1; car: cat ranks ahead after c and ca -> typed 3; . 1; Enter 1  line 2: 11
    #         blank 1, dog 4                                                       total 23
    text = typed_text(TEXT, toy_tok)
    r = autocomplete(toy_rows(toy_tok)(text.stream), text, toy_tok, k=k)
    assert (r["keystrokes"], r["chars"], r["accepted"]) == (keystrokes, 32, accepted)
    assert r["keystroke_savings"] == pytest.approx(1 - keystrokes / 32)
    # top-k accuracy over the 9 tokens, the out-of-vocabulary "dog" a miss
    assert (r["top1"], r["top3"], r["top5"]) == pytest.approx((2 / 9, 5 / 9, 7 / 9))
    assert (r["words"], r["oov"]) == (9, 1)


def test_specials_are_never_suggested_and_ties_go_to_the_lower_id(toy_tok):
    # <eos> and <unk> outrank every word here (only the order matters, not the sum), and
    # cab ties with car: the lower id goes first.
    probs = TOY | {"<eos>": 0.9, "<unk>": 0.8, "cab": 0.07}
    text = typed_text("the car", toy_tok)
    r = autocomplete(toy_rows(toy_tok, probs)(text.stream), text, toy_tok, k=1)
    assert r["top1"] == 0.5  # "the" is still the first suggestion
    ranker, car = Ranker(toy_tok), text.tokens[1]
    assert [m for m, *_ in ranker.pools(car)] == ["next", "lower", "lower"]  # everything, then "c", "ca"
    row = next(toy_rows(toy_tok, probs)(text.stream))[:1]
    ranks = ranker.ranks(row, [car], ["the"])[0].tolist()
    cab_first = int(toy_tok.word_to_id["cab"] < toy_tok.word_to_id["car"])
    assert ranks == [5 + cab_first, 1 + cab_first, 1 + cab_first]  # the . then cat sat; cat


# A vocabulary where the keyboard merges spellings, merges "," with "@,@" and filters
# clitics, so that ranking raw vocabulary ids (as the typist did) sees other lists.
SHOWN = ["the The THE then they iPhone iphone 3 @,@ 000 , a don 't 've 'Brien ."] * 3


@pytest.fixture(scope="module")
def shown_tok() -> Tokenizer:
    return Tokenizer.train(SHOWN, TokenizerConfig(text="tokenized"))


def rows_of(tok: Tokenizer, probs: dict):
    """Context-free rows: these probabilities at every position, the rest next to 0."""
    row = torch.full((tok.vocab_size,), -50.0)
    for w, q in probs.items():
        row[tok.word_to_id[w]] = math.log(q)
    return lambda stream: iter([row.expand(stream.numel(), -1)])


def typed(tok, probs, text, k):
    t = typed_text(text, tok)
    return autocomplete(rows_of(tok, probs)(t.stream), t, tok, k=k)


def test_the_typist_sees_spellings_shown_alike_as_one_suggestion(shown_tok):
    probs = {"then": 0.16, "they": 0.14, "the": 0.10, "The": 0.09, "iPhone": 0.04, "iphone": 0.03}
    # "the", k = 1: the next words rank then, they, the. Typed "t", the keyboard shows
    # "the" for the + The = 0.19, ahead of then 0.16: accepted (was: "t" and "th" ranked
    # then and they first, so it was typed in full, 3 keys + Enter).
    r = typed(shown_tok, probs, "the", k=1)
    assert (r["keystrokes"], r["chars"], r["accepted"]) == (1 + 1 + 1, 4, 1)
    # "iPhone": typed "i", the keyboard shows "iphone" (0.07), which accepting types:
    # not accepted (was: "iPhone" ranked first after "i"). After "iP", "iPhone" only.
    r = typed(shown_tok, probs, "iPhone", k=1)
    assert (r["keystrokes"], r["accepted"]) == (2 + 1 + 1, 1)
    ranker = Ranker(shown_tok)
    iphone = typed_text("iPhone", shown_tok).tokens[0]
    assert [(m, hi > lo) for m, lo, hi in ranker.pools(iphone)][:3] == [("next", False), ("lower", False),
                                                                        ("exact", True)]


def test_the_typist_accepts_a_merged_next_word_only_as_the_token_it_stands_for(shown_tok):
    # "3,000, a" is 3 @,@ 000 , a. The keyboard shows "," for "@,@" + "," = 0.5, standing
    # for the likelier "@,@": it joins as in "3,000", so it is the "@,@" after "3" but not
    # the "," after "000", typed by hand (1 key and its space).
    probs = {"@,@": 0.30, ",": 0.20, "3": 0.12, "000": 0.11, "a": 0.05}
    text = typed_text("3,000, a", shown_tok)
    assert [t.word for t in text.tokens] == ["3", "@,@", "000", ",", "a"]
    row = rows_of(shown_tok, probs)(text.stream)
    ranks = Ranker(shown_tok).ranks(next(row)[: len(text.tokens)], text.tokens, [None, "3", "@,@", "000", ","])
    assert ranks[:, 0].tolist() == [1, 0, 2, NEVER, 3]  # raw ids ranked 2, 0, 3, 1, 4
    # k = 2: 3 accepted at once (1 key), @,@ (1), 000 after "0" (2), "," typed with its
    # space (2), "a" typed (1), Enter (1): 8 keys for 9 characters (was 7: "," accepted)
    r = typed(shown_tok, probs, "3,000, a", k=2)
    assert (r["keystrokes"], r["chars"], r["top1"]) == (8, 9, pytest.approx(1 / 5))


def test_the_typist_never_sees_a_clitic_that_cannot_follow_the_word_before(shown_tok):
    # "don't" is don 't. After "don" the keyboard drops "'ve" and "'Brien" (clitic_fits):
    # "'t" is the first suggestion (was third: typed in full, 2 keys). "don" starts the
    # line: no word before it, nothing dropped, so it waits for "d" (2 keys).
    probs = {"'ve": 0.30, "'Brien": 0.25, "'t": 0.20, "don": 0.10}
    r = typed(shown_tok, probs, "don't", k=1)
    assert (r["keystrokes"], r["chars"], r["accepted"], r["top1"]) == (2 + 1 + 1, 6, 2, 0.5)
    ranker, (don, t) = Ranker(shown_tok), typed_text("don't", shown_tok).tokens
    row = next(rows_of(shown_tok, probs)(torch.zeros(1)))
    assert ranker.ranks(row.expand(2, -1), [t, t], ["don", None])[:, 0].tolist() == [0, 2]


def test_the_typists_ranks_agree_with_what_the_keyboard_shows(shown_tok):
    # The oracle: WordIndex.next_words and .completions, as lm complete calls them, on
    # random rows (no ties): the typist counts a token shown at a pool exactly when the
    # keyboard's k choices hold it as it is.
    text = typed_text("The then, they 3,000. THE iPhone don't the iphone 've a\n't 've 'Brien Then", shown_tok)
    tokens = [t for t in text.tokens if t.id != shown_tok.unk_id]
    after = [None if t.pos == 0 or text.stream[t.pos - 1] == shown_tok.eos_id else text.tokens[i - 1].word
             for i, t in enumerate(text.tokens) if t.id != shown_tok.unk_id]
    ranker, index = Ranker(shown_tok), WordIndex(shown_tok)
    torch.manual_seed(0)
    for _ in range(5):
        rows = torch.randn(len(tokens), shown_tok.vocab_size).mul(3).log_softmax(1)
        ranks = ranker.ranks(rows, tokens, after)
        for k in (1, 2, 3, 5):
            for b, tok in enumerate(tokens):
                shown = [(tok.word,) in [c.tokens for c in index.next_words(rows[b], k, after[b])]]
                shown += [tok.word in [c.text for c in index.completions(rows[b], tok.word[:j], k, after[b])]
                          for j in range(1, len(ranker.pools(tok)))]
                assert (ranks[b, : len(shown)] < k).tolist() == shown, (tok.word, after[b], k)


def test_lstm_rows_equal_the_predictors_incremental_distribution(tiny_run):
    _, model, tok, _ = load_model(tiny_run / "best.pt")
    words = "the cat sat on the mat .".split()
    text = typed_text(" ".join(words) + "\nthe dog ran to a tree .", tok)
    rows = torch.cat(list(lstm_rows(model, text.stream, tok.eos_id, window=3)))  # state carried across windows
    assert rows.shape == (text.stream.numel(), tok.vocab_size)
    p = Predictor(model, tok)
    for i, w in enumerate(words):  # one word at a time, as typed
        torch.testing.assert_close(rows[i], p.log_probs(), atol=1e-5, rtol=1e-5)
        p.feed_words([w])
    assert torch.allclose(rows.exp().sum(1), torch.ones(rows.size(0)), atol=1e-4)


def test_ngram_top1_accuracy_equals_a_brute_force_count(tiny_corpus, tiny_tokenizer):
    stream = torch.tensor(tiny_tokenizer.encode_typed((tiny_corpus / "train.txt").read_text()))
    model = KneserNey.train(stream, tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id, order=3)
    raw = (tiny_corpus / "test.txt").read_text()
    text = typed_text(raw, tiny_tokenizer)
    r = autocomplete(model.log_prob_rows(text.stream, chunk=5), text, tiny_tokenizer, k=3)
    ids = text.stream.tolist()
    hits = 0
    for t in text.tokens:  # the most likely suggestable word, straight from log_probs
        lp = model.log_probs(ids[: t.pos]).numpy().copy()
        lp[[tiny_tokenizer.unk_id, tiny_tokenizer.eos_id]] = -np.inf
        hits += int(np.argmax(lp)) == t.id
    assert r["top1"] == pytest.approx(hits / len(text.tokens))
    assert 0.3 < r["top1"] < r["top3"] <= r["top5"] <= 1 and 0 < r["keystroke_savings"] < 1


def test_cli_autocomplete_for_both_models(tiny_run, tiny_corpus, tmp_path, capsys):
    text = tiny_corpus / "test.txt"
    assert main(["eval", str(tiny_run / "best.pt"), "--autocomplete", str(text), "--max-words", "50", "--json"]) == 0
    lstm = json.loads(capsys.readouterr().out)
    assert lstm["words"] == 50 and lstm["k"] == 3 and 0 < lstm["keystroke_savings"] < 1
    kn = tmp_path / "kn.npz"
    assert main(["ngram", "train", str(tiny_run), "--out", str(kn), "--json"]) == 0
    capsys.readouterr()
    assert main(["ngram", "eval", str(kn), "--autocomplete", str(text), "--k", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "top-1" in line[0] and "keystroke savings" in line[0] and "(k=1)" in line[0]
    assert main(["eval", str(tiny_run / "best.pt"), "--autocomplete", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0]
    bom = tmp_path / "bom.txt"  # a UTF-8 byte-order mark is not typed text
    bom.write_bytes(b"\xef\xbb\xbf" + text.read_bytes())
    assert main(["eval", str(tiny_run / "best.pt"), "--autocomplete", str(bom), "--max-words", "50", "--json"]) == 0
    timing = ("seconds", "words_per_s", "file")
    bom_result = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in bom_result.items() if k not in timing} == {k: v for k, v in lstm.items() if k not in timing}
    wide = tmp_path / "wide.txt"
    wide.write_bytes(text.read_text(encoding="utf-8").encode("utf-16"))
    assert main(["eval", str(tiny_run / "best.pt"), "--autocomplete", str(wide)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UTF-16 text" in err[0] and "iconv" in err[0]
