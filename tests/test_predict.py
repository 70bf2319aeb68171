"""The autocomplete engine: incremental state, completions, casing, phrases, memory."""
import itertools
import os

import pytest
import torch

from lm import checkpoint
from lm.cache import NeuralCache
from lm.config import ModelConfig, TokenizerConfig
from lm.errors import LMError
from lm.model import LSTMLM
from lm.predict import (ODDS, RAMP, STRIDE, TAIL, Choice, Predictor, WordIndex, case_mode, clitic_fits,
                        keystroke_latency, read_user_text)
from lm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_run):
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    return model, tok


def memory(lam=0.3, window=50, theta=0.5):
    return NeuralCache(window, theta, lam, 16)  # 16: the tiny model's feature size


def same_state(a: Predictor, b: Predictor) -> None:
    """Everything the next prediction depends on agrees."""
    assert a.words == b.words and a.partial == b.partial
    n = len(a.words)
    for (h1, c1), (h2, c2) in zip(a._state(n), b._state(n)):
        torch.testing.assert_close(h1, h2)
        torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(a.log_probs(), b.log_probs())
    if a.memory is not None:
        torch.testing.assert_close(a.memory.keys, b.memory.keys)
        assert torch.equal(a.memory.values, b.memory.values)


def test_incremental_state_equals_recomputing_from_scratch(tiny):
    model, tok = tiny
    p = Predictor(model, tok, memory=memory())
    p.learn("the dog ran to the river .")
    fresh = p.fork()  # same learned memory, empty text
    texts = []
    typed = ""
    for ch in "the cat sat on the mat. the dog":  # keystrokes
        typed += ch
        texts.append(typed)
    texts += [typed[:-i] for i in range(1, 8)]  # backspaces, across word boundaries
    texts += ["the cat sat on the mat. the bird ran to", "the old man sat on the mat. the bird",  # edits
              "", "a tree"]
    for text in texts:
        p.update(text)
        scratch = fresh.fork()
        scratch.update(text)
        same_state(p, scratch)


def test_edits_far_back_replay_from_a_kept_state(tiny):
    model, tok = tiny
    words = ("the cat sat on the mat . " * 30).split()  # 210 words: beyond TAIL and several STRIDEs
    p = Predictor(model, tok, memory=memory(window=500))
    for n in range(1, len(words) + 1, 7):  # paste-sized steps
        p.update(" ".join(words[:n]) + " ")
    assert len(p._states) <= TAIL + len(words) // STRIDE + 2  # sparse: bounded memory
    for cut in (150, 70, 3):  # each before the last TAIL positions
        text = " ".join(words[:cut]) + " dog"
        p.update(text)
        scratch = p.fork()
        scratch.update(text)
        same_state(p, scratch)


class Counter:
    def __init__(self, model):
        self.steps = self.heads = 0
        model.register_forward_hook(lambda *a: setattr(self, "steps", self.steps + 1))
        head = model.log_probs
        model.log_probs = lambda f: (setattr(self, "heads", self.heads + 1), head(f))[1]


def test_a_keystroke_inside_a_word_costs_no_model_work(tiny_run):
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")  # its own copy: hooks added
    p = Predictor(model, tok, memory=memory())
    count = Counter(model)
    typed = ""
    for ch in "the president walked past the presentation":
        typed += ch
        steps, heads = count.steps, count.heads
        p.update(typed)
        p.suggest(3)
        new_steps, new_heads = count.steps - steps, count.heads - heads
        if ch == " ":  # a word was finished: one model step, one head
            assert (new_steps, new_heads) == (1, 1), typed
        elif len(typed) > 1:  # a letter (the first keystroke computes the start's distribution)
            assert (new_steps, new_heads) == (0, 0), typed
    steps, heads = count.steps, count.heads
    for text in ("the president walked past the ", "the president walked past the", "the president walked past"):
        p.update(text)  # backspacing over words: states and distributions are kept
        p.suggest(3)
    assert (count.steps, count.heads) == (steps, heads)


def test_completions_respect_the_prefix_and_rank_by_model_probability(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    s = p.complete_text("the pres", k=5)
    assert s.kind == "complete" and s.prefix == "pres"
    assert {c.text for c in s.items} == {"president", "presentation"}
    with torch.inference_mode():  # the oracle: the model itself after "<eos> the"
        features, _ = model(torch.tensor([[tok.eos_id, tok.word_to_id["the"]]]))
        lp = model.log_probs(features[0, -1])
    expected = sorted(((lp[tok.word_to_id[c.text]].exp().item(), c.text) for c in s.items), reverse=True)
    assert [c.text for c in s.items] == [w for _, w in expected]
    assert [c.prob for c in s.items] == pytest.approx([q for q, _ in expected], rel=1e-5)
    every = p.completions("", 100)  # the empty prefix ranks the whole vocabulary
    assert [c.prob for c in every] == sorted((c.prob for c in every), reverse=True)


def test_never_suggests_specials_nor_blocked_words(tiny):
    model, tok = tiny
    p = Predictor(model, tok, block=["Mat", "dog"])
    p.update("the cat sat on the ")
    shown = {c.text for c in p.next_words(100)} | {c.text for c in p.completions("", 100)}
    assert shown and not shown & {"<unk>", "<eos>", "mat", "dog"}
    assert p.completions("ma", 5) and all(c.text != "mat" for c in p.completions("ma", 5))
    assert all(not {"mat", "dog", "<eos>", "<unk>"} & set(c.tokens) for c in p.phrases(5, 3))
    assert sum(c.prob for c in p.next_words(100)) <= 1 + 1e-6


def test_a_block_entry_matches_a_word_as_shown_too():
    tok = Tokenizer.train(["a well @-@ known 3 @,@ 000 , 2 @.@ 5 . - the"] * 3, TokenizerConfig(text="tokenized"))

    def shown(block):
        index = WordIndex(tok, block)
        return {tok.words[i] for i in range(tok.vocab_size) if index.suggestable[i]}

    assert {"@-@", "@,@", "@.@", ",", ".", "-"} <= shown([])
    assert not {"@-@", "-", "@,@", ","} & shown(["-", ","])  # what the user sees
    assert {"@.@", ".", "the"} <= shown(["-", ","])
    assert "@.@" not in shown(["@.@"]) and "." in shown(["@.@"])  # the vocabulary form blocks only itself


def test_next_words_shown_alike_are_one_choice():
    tok = Tokenizer.train(["It is 3 @,@ 000 , 2 @.@ 5 . well @-@ known - the"] * 3, TokenizerConfig(text="tokenized"))
    index = WordIndex(tok)

    def top(probs):
        lp = torch.full((tok.vocab_size,), -50.0)
        for w, q in probs.items():
            lp[tok.word_to_id[w]] = torch.tensor(q).log()
        return [(c.text, round(c.prob, 4), c.tokens) for c in index.next_words(lp, 3)]

    # the likelier spelling stands for both: "@,@" glues ("3,000"), "," is followed by a space
    assert top({"the": 0.35, "@,@": 0.3, ",": 0.1, "000": 0.05}) == [
        (",", 0.4, ("@,@",)), ("the", 0.35, ("the",)), ("000", 0.05, ("000",))]
    assert top({"the": 0.35, "@,@": 0.1, ",": 0.3, "-": 0.2, "@-@": 0.02}) == [
        (",", 0.4, (",",)), ("the", 0.35, ("the",)), ("-", 0.22, ("-",))]
    every = index.next_words(torch.zeros(tok.vocab_size).log_softmax(0), 100)
    suggestable_mass = index.suggestable.float().mean().item()  # uniform: all but <unk> and <eos>
    assert len({c.text for c in every}) == len(every) and sum(c.prob for c in every) == pytest.approx(suggestable_mass)


CASED = ["President president PRESIDENT Press press Presley McDonald the ."] * 3


def test_completions_follow_the_typed_casing():
    tok = Tokenizer.train(CASED)
    index = WordIndex(tok)
    probs = dict(President=0.20, president=0.10, PRESIDENT=0.05, Press=0.01, press=0.30, Presley=0.02,
                 McDonald=0.04, the=0.25, **{".": 0.03})
    lp = torch.full((tok.vocab_size,), -50.0)
    for w, q in probs.items():
        lp[tok.word_to_id[w]] = torch.tensor(q).log()

    def shown(prefix):
        return [(c.text, round(c.prob, 4)) for c in index.completions(lp, prefix, 10)]

    assert [case_mode(x) for x in ("pres", "Pres", "PRES", "McD", "P")] == ["lower", "capital", "upper", "exact", "capital"]
    assert shown("pres") == [("president", 0.35), ("press", 0.31), ("Presley", 0.02)]  # proper noun keeps capital
    assert shown("Pres") == [("Press", 0.31), ("President", 0.30), ("PRESIDENT", 0.05), ("Presley", 0.02)]
    assert shown("PRES") == [("PRESIDENT", 0.35), ("PRESS", 0.31), ("PRESLEY", 0.02)]
    assert shown("McD") == [("McDonald", 0.04)] and shown("mcd") == [("McDonald", 0.04)]
    assert shown("MCd") == [] and shown("x") == []


def test_a_lower_case_model_follows_the_typed_casing():
    tok = Tokenizer.train(["The President spoke to the press . McDonald sat ."] * 3, TokenizerConfig(lowercase=True))
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8, head="full"), tok.vocab_size).eval()
    p = Predictor(model, tok)
    assert "president" in tok.word_to_id and "President" not in tok.word_to_id

    def shown(text):
        p.update(text)
        return p.suggest(5)

    s = shown("The Pres")
    assert p.words == ["the"] and p.partial == s.prefix == "Pres"  # the model reads "the"; the prefix as typed
    assert {c.text for c in s.items} == {"President", "Press"}
    president = next(c for c in s.items if c.text == "President")
    assert p.accept("The Pres", president) == "The President "
    assert all(c.text.split()[0] in ("President", "Press") for c in p.phrases(2, 2))
    assert {c.text for c in shown("THE PRES").items} == {"PRESIDENT", "PRESS"}
    assert {c.text for c in shown("the pres").items} == {"president", "press"}
    assert [c.text for c in shown("Ask McD").items] == ["McDonald"]  # mixed: the typed letters kept
    p.update("The Pres")
    p.commit()  # the unfinished word joins the text as the model reads it
    assert p.words == ["the", "pres"] and p.text() == "the pres"
    p.complete_text("The President", 3)  # one-shot: a whole word that nothing longer outweighs
    assert p.words == ["the", "president"] and p.partial == ""


def test_phrases_are_the_most_likely_word_pairs(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    p.update("the cat ")
    n_words = int(p.index.suggestable.sum())
    got = p.phrases(n_words, 2)  # a beam as wide as the vocabulary is exhaustive for two words
    oracle = []
    first = p.log_probs()
    for i in p.index.suggestable_ids.tolist():
        q = p.fork()
        q.update("the cat " + tok.words[i] + " ")
        second = q.log_probs()
        oracle += [((first[i] + second[j]).exp().item(), (tok.words[i], tok.words[j]))
                   for j in p.index.suggestable_ids.tolist()]
    oracle.sort(reverse=True)
    assert [c.tokens for c in got[:10]] == [t for _, t in oracle[:10]]
    assert [c.prob for c in got[:10]] == pytest.approx([q for q, _ in oracle[:10]], rel=1e-4)
    p.update("the cat sat on the m")  # inside a word, the phrase starts by completing it
    assert all(c.tokens[0].startswith("m") and len(c.tokens) == 3 for c in p.phrases(3, 3))


def test_accepting_a_suggestion_types_it_naturally(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    p.update("the cat sat on the m")
    mat = next(c for c in p.suggest(5).items if c.text == "mat")
    assert p.accept("the cat sat on the m", mat) == "the cat sat on the mat "
    p.update("the cat sat on the mat ")
    stop = next(c for c in p.next_words(20) if c.text == ".")
    assert p.accept("the cat sat on the mat ", stop) == "the cat sat on the mat. "  # glued to the word
    p.update("")
    the = next(c for c in p.next_words(20) if c.text == "the")
    assert p.accept("", the) == "the "


def test_a_space_typed_after_an_opening_bracket_stays_when_accepting(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    cat = Choice("cat", 0.5, ("cat",))
    assert p.accept("the ( ", cat) == "the ( cat "  # was "the (cat ": the typed space removed
    assert p.accept("the (", cat) == "the (cat "
    assert p.accept("the dog ", cat) == "the dog cat "
    assert p.accept("the dog ", Choice(".", 0.5, (".",))) == "the dog. "  # a glued choice still takes it


def test_accepting_replaces_a_partial_word_holding_a_soft_hyphen(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    for text in ("the pre\u00ads", "the p\u00adre\u00ads"):
        p.update(text)
        assert p.partial == "pres"
        president = next(c for c in p.suggest(5).items if c.text == "president")
        assert p.accept(text, president) == "the president "  # was "the pre\u00ads president "


def test_a_typographic_apostrophe_completes_and_accepts_like_a_straight_one():
    tok = Tokenizer.train(["I don 't know . it 's here . he 's gone ."] * 3, TokenizerConfig(text="tokenized"))
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8, head="full"), tok.vocab_size).eval()
    p = Predictor(model, tok)
    for text in ("I don’", "I don'"):
        s = p.complete_text(text, 3)
        assert (s.kind, s.prefix) == ("complete", "'") and "'t" in [c.text for c in s.items]
        t = next(c for c in s.items if c.text == "'t")
        assert p.accept(text, t) == "I don't "  # was "I don’'t ": the curly one was not found to replace


def test_clitics_are_offered_only_where_english_spells_them():
    tok = Tokenizer.train(["I don 't know . you 're here . I 've seen the dog 's bone ' . we 'll go . he 'd go . "
                           "I 'm here . the dog"] * 3, TokenizerConfig(text="tokenized"))
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8, head="full"), tok.vocab_size).eval()
    p = Predictor(model, tok)
    clitics = {"'t", "'s", "'re", "'ve", "'ll", "'d", "'m"}

    def offered(text):
        p.update(text)
        return {c.text for c in p.suggest(100).items} | {c.tokens[0] for c in p.phrases(100, 1)}

    assert offered("I don'") == {"'t", "'s", "'"}  # not "don've", "don'll"
    assert offered("the dog'") == {"'s", "'"}
    assert offered("you'") == {"'re", "'ve", "'ll", "'d", "'s", "'"}
    assert offered("I'") == {"'m", "'ve", "'ll", "'d", "'s", "'"}
    assert offered("I don ") & clitics == {"'t", "'s"}  # next words too
    assert clitics <= offered("")  # no word before: nothing to judge by
    assert [clitic_fits("DON", "'T"), clitic_fits("isn", "'ll"), clitic_fits("Who", "'d"), clitic_fits("x", "'em")] == [
        True, False, True, True]
    p.update("I don'")
    t = next(c for c in p.suggest(5).items if c.text == "'t")
    assert p.accept("I don'", t) == "I don't "


def test_a_name_tail_follows_only_a_capitalised_word_or_a_single_letter():
    # WikiText splits O'Brien as "O 'Brien", d'Andrade as "d 'Andrade": "'Brien" is no
    # clitic, and "I don'" offered it ("don'Brien"), as it did after "the dogs'".
    tok = Tokenizer.train(["I don 't know O 'Brien , d 'Andrade or K 'inich ; the dogs ' bone 's ."] * 3,
                          TokenizerConfig(text="tokenized"))
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8, head="full"), tok.vocab_size).eval()
    p = Predictor(model, tok)
    tails = {"'Brien", "'Andrade", "'inich"}

    def offered(text):
        p.update(text)
        return {c.text for c in p.suggest(100).items} | {c.tokens[0] for c in p.phrases(100, 1)}

    assert offered("I don'") == {"'t", "'s", "'"}
    assert offered("the dogs'") == {"'s", "'"}
    for host in ("O'", "d'", "K'", "Kir'"):  # capitalised, or a single letter
        assert offered(host) == tails | {"'s", "'"}, host
    assert offered("DON'") == tails | {"'t", "'s", "'"}  # casing cannot tell a name from "DON'T"
    assert offered("O ") & tails == tails and not offered("the dogs ") & tails  # next words too
    assert [clitic_fits(w, "'Brien") for w in ("O", "d", "Kir", "don", "dogs", "3", ".")] == [
        True, True, True, False, False, False, False]
    assert clitic_fits("don", "'s") and clitic_fits("don", "'") and not clitic_fits("O", "'t")


def test_split_rules_keyboard_and_one_shot(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    # keyboard: no trailing space means the word is still being typed, even a whole one
    assert p.split_partial("the president of the") == (["the", "president", "of"], "the")
    assert p.split_partial("the cat sat.") == (["the", "cat", "sat", "."], "")
    assert p.split_partial("the cat sat. The pr") == (["the", "cat", "sat", ".", "The"], "pr")
    assert p.split_partial("the pres ") == (["the", "pres"], "")
    assert p.split_partial("") == ([], "") and p.split_partial("\x00\x1b ") == ([], "")
    # an arrow key's escape sequence and control characters read as spaces (REPL, lm serve)
    assert p.split_partial("the\x1b[A cat\x1bOBsat\x07pr") == (["the", "cat", "sat"], "pr")
    # one-shot (lm complete): a final vocabulary word is finished unless longer words outweigh it
    for text, split in (("the cat sat on the", (["the", "cat", "sat", "on", "the"], "")),
                        ("the pres", (["the"], "pres")), ("the cat sat.", (["the", "cat", "sat", "."], ""))):
        p.reset()
        p.update(text, complete_known=True)
        assert (p.words, p.partial) == split
    assert p.complete_text("the cat sat.", 3).items == p.complete_text("the cat sat .", 3).items


def test_one_shot_rule_weighs_a_word_against_the_longer_words_it_begins(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    ratios = {}
    for before in ("the cat looked", "the cat sat on"):  # "a" is a word, and begins "at"
        p.reset()
        p.update(before + " ")
        lp = p.log_probs()
        ratios[before] = (lp[tok.word_to_id["at"]] - lp[tok.word_to_id["a"]]).exp().item()
    assert ratios["the cat looked"] > ODDS and ratios["the cat sat on"] < ODDS  # the oracle: the model
    s = p.complete_text("the cat looked a", 3)
    assert (s.kind, s.prefix, s.items[0].text) == ("complete", "a", "at")
    s = p.complete_text("the cat sat on a", 3)
    assert s.kind == "next" and p.words == ["the", "cat", "sat", "on", "a"]
    assert p.complete_text("the cat looked a ", 3).kind == "next"  # a space always ends the word


def test_whole_and_longer_count_the_spellings_the_case_mode_matches():
    tok = Tokenizer.train(["re Re RE released Released record recorded The the there ."] * 3)
    index = WordIndex(tok)
    probs = {"re": 0.01, "Re": 0.02, "RE": 0.04, "released": 0.1, "Released": 0.2, "record": 0.3,
             "recorded": 0.05, "The": 0.07, "the": 0.08, "there": 0.09, ".": 0.04}
    lp = torch.full((tok.vocab_size,), -50.0)
    for w, q in probs.items():
        lp[tok.word_to_id[w]] = torch.tensor(q).log()
    assert index.whole_and_longer(lp, "re") == pytest.approx((0.07, 0.65))  # any casing
    assert index.whole_and_longer(lp, "RE") == pytest.approx((0.07, 0.65))
    assert index.whole_and_longer(lp, "the") == pytest.approx((0.15, 0.09))
    assert index.whole_and_longer(lp, "record") == pytest.approx((0.3, 0.05))
    assert index.whole_and_longer(lp, "rE") == pytest.approx((0, 0), abs=1e-12)  # mixed case: exactly as typed


def test_session_memory_learns_and_lambda_zero_is_the_plain_model(tiny):
    model, tok = tiny
    plain, off = Predictor(model, tok), Predictor(model, tok, memory=memory(lam=0.0))
    for q in (plain, off):
        q.update("the old man walked past the ")
    torch.testing.assert_close(plain.log_probs(), off.log_probs())
    on = Predictor(model, tok, memory=memory(lam=0.9, window=1000, theta=10.0))
    on.update("the old man walked past the ")
    before = on.log_probs()[tok.word_to_id["presentation"]]
    assert on.learn("the old man walked past the presentation .\n" * 100) == 901  # 8 words and <eos> a line
    on.update("the old man walked past the ")
    after = on.log_probs()[tok.word_to_id["presentation"]]
    assert after > before + 1.0  # the learned continuation became much more likely
    on.reset()  # a new text: the memory stays, and keeps the old text too
    assert len(on.memory) == 901 + 6
    small = Predictor(model, tok, memory=memory(lam=0.9, theta=10.0))
    small.update("the old man walked past the ")  # 6 words remembered: little weight yet
    moved = (small.log_probs().exp() - plain.log_probs().exp()).abs().max()
    assert 0 < moved <= 0.9 * 6 / (6 + RAMP) + 1e-6  # |p_mixed - p_model| <= the memory's weight
    with pytest.raises(Exception, match="session learning is off"):
        plain.learn("text")
    for empty in ("", "\n\n", "  \t \n"):  # an empty file was "learned: 1 words" (an <eos>)
        with pytest.raises(Exception, match="has no words to learn from"):
            on.learn(empty)


def test_forks_do_not_share_text(tiny):
    model, tok = tiny
    a = Predictor(model, tok, memory=memory())
    b = a.fork()
    a.update("the cat sat on ")
    b.update("a bird looked at the ")
    c = b.fork()
    c.update("a bird looked at the ")
    assert a.words != b.words
    same_state(b, c)


def test_read_user_text(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"first line\n" + b"x" * 50 + b"\nlast words \xff\n")
    assert read_user_text(f).endswith("last words \ufffd\n")
    assert read_user_text(f, max_bytes=20) == "last words \ufffd\n"  # the tail, from a line start
    (tmp_path / "bin").write_bytes(b"a\x00b")
    for bad, msg in ((tmp_path / "bin", "binary"), (tmp_path / "none.txt", "not found"), (tmp_path, "directory")):
        with pytest.raises(Exception, match=msg):
            read_user_text(bad)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello there")
    assert read_user_text(tmp_path / "bom.txt") == "Hello there"
    (tmp_path / "late.bin").write_bytes(b"text line\n" * 2000 + b"\x00\x01\x02")  # NUL past the first 8 KB
    with pytest.raises(LMError, match="binary"):
        read_user_text(tmp_path / "late.bin")
    (tmp_path / "wide.txt").write_bytes("Hello there".encode("utf-16"))
    with pytest.raises(LMError, match="UTF-16 text.*iconv"):
        read_user_text(tmp_path / "wide.txt")
    r, w = os.pipe()  # not seekable: --learn <(cmd), --prompt @/dev/stdin
    os.write(w, b"first line\n" + b"x" * 50 + b"\nlast words\n")
    os.close(w)
    try:
        assert read_user_text(f"/dev/fd/{r}", max_bytes=20) == "last words\n"
    finally:
        os.close(r)


def test_keystroke_latency_reports_both_kinds(tiny):
    model, tok = tiny
    r = keystroke_latency(Predictor(model, tok), "the cat sat on the mat .\nthe dog ran", max_chars=30)
    assert r["chars"] == 30
    assert r["inside_word"]["keystrokes"] + r["boundary"]["keystrokes"] == 30
    assert r["boundary"]["keystrokes"] >= 7  # each space, the period and the newline
    assert 0 < r["inside_word"]["p50_ms"] <= r["inside_word"]["p99_ms"]


def test_words_and_partial_follow_every_prefix(tiny):
    model, tok = tiny
    p = Predictor(model, tok)
    text = "the dog ran to the city."
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        if j - i > 3:
            continue
        p.update(text[:j])
        p.update(text[:i])
        assert (p.words, p.partial) == p.split_partial(text[:i])
