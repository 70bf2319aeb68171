import torch

from lm import checkpoint
from lm.predict import Predictor


def load(run):
    _, model, tok, _ = checkpoint.load_model(run / "best.pt")
    return Predictor(model, tok), tok


def test_incremental_state_equals_recomputing_from_scratch(tiny_run):
    p, tok = load(tiny_run)
    p.feed_words("the cat sat".split())
    p.feed_words("on the".split())
    incremental = p._log_probs.clone()
    p.reset()
    p.feed_words("the cat sat on the".split())
    torch.testing.assert_close(incremental, p._log_probs)


def test_completions_respect_the_prefix_and_rank_by_probability(tiny_run):
    p, tok = load(tiny_run)
    s = p.complete_text("the pres", k=5)
    assert s.kind == "complete" and s.prefix == "pres"
    words = [w for w, _ in s.items]
    assert set(words) == {"president", "presentation"}
    probs = [pr for _, pr in s.items]
    assert probs == sorted(probs, reverse=True)
    # the ranking is the model's next-word probability of each candidate
    full = p._log_probs.exp()
    assert all(abs(full[tok.word_to_id[w]].item() - pr) < 1e-6 for w, pr in s.items)


def test_next_words_never_suggest_specials_and_sum_below_one(tiny_run):
    p, tok = load(tiny_run)
    s = p.complete_text("the cat sat on", k=50)
    assert s.kind == "next"
    words = [w for w, _ in s.items]
    assert "<unk>" not in words and "<eos>" not in words
    assert sum(pr for _, pr in s.items) <= 1.0 + 1e-6
    assert words[0] in ("the", "a")  # the tiny grammar puts an article after "on"


def test_partial_word_rule(tiny_run):
    p, _ = load(tiny_run)
    assert p.split_partial("the president of the") == (["the", "president", "of", "the"], "")
    assert p.split_partial("the pres") == (["the"], "pres")
    assert p.split_partial("the pres ") == (["the", "pres"], "")
    assert p.split_partial("") == ([], "")


def test_typed_text_is_split_like_the_training_text(tiny_run):
    p, tok = load(tiny_run)
    # punctuation attached to a word is split off, as the WikiText convention does
    assert p.split_partial("the cat sat.") == (["the", "cat", "sat", "."], "")
    assert p.split_partial("the cat sat. The pr") == (["the", "cat", "sat", ".", "The"], "pr")
    assert p.complete_text("the cat sat.", 3).items == p.complete_text("the cat sat .", 3).items
