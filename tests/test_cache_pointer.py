"""The continuous cache pointer (lm/cache.py) against brute-force oracles."""
import math

import pytest
import torch

from lm.cache import NeuralCache, evaluate_cache, tune_cache
from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.errors import ConfigError
from lm.evaluate import evaluate
from lm.model import LSTMLM

V, D = 23, 6


def brute_force_mix(log_probs, h, keys, values, theta, lam):
    """(1 - lam) p_model + lam p_cache, one query and one remembered position at a time."""
    out = torch.empty_like(log_probs, dtype=torch.float64)
    for n in range(h.size(0)):
        weights = [math.exp(theta * float(h[n] @ k)) for k in keys]
        p_cache = [0.0] * V
        for w, v in zip(weights, values.tolist()):
            p_cache[v] += w / sum(weights)
        for v in range(V):
            out[n, v] = math.log((1 - lam) * math.exp(float(log_probs[n, v])) + lam * p_cache[v])
    return out


@pytest.mark.parametrize("theta", [0.0, 0.7, 3.0])
def test_mix_is_the_normalised_mixture(theta):
    log_probs = torch.randn(4, V).log_softmax(-1)
    h, keys, values = torch.randn(4, D), torch.randn(9, D), torch.randint(0, V, (9,))
    cache = NeuralCache(window=5, theta=theta, lam=0.3, dim=D)
    cache.add(keys, values)  # only the last 5 are kept
    mixed = cache.mix(log_probs, h)
    assert torch.allclose(mixed.logsumexp(-1), torch.zeros(4), atol=1e-5)
    expected = brute_force_mix(log_probs, h, keys[-5:], values[-5:], theta, 0.3)
    assert torch.allclose(mixed.double(), expected, atol=1e-5)


def test_empty_cache_leaves_the_model_alone():
    log_probs = torch.randn(3, V).log_softmax(-1)
    cache = NeuralCache(window=10, theta=1.0, lam=0.5, dim=D)
    assert torch.equal(cache.mix(log_probs, torch.randn(3, D)), log_probs)
    targets = torch.randint(0, V, (1,))
    assert torch.equal(cache.mix_targets(log_probs[:1, 0], torch.randn(1, D), targets), log_probs[:1, 0])
    cache.reset()
    assert len(cache) == 0


@pytest.mark.parametrize("window", [3, 8, 50])
def test_mix_targets_equals_one_position_at_a_time(window):
    """Vectorised, causal and windowed: the same as mix() then add() per position."""
    T = 12
    log_probs = torch.randn(T, V).log_softmax(-1)
    h, targets = torch.randn(T, D), torch.randint(0, 4, (T,))  # few distinct words: many matches
    fast = NeuralCache(window, theta=0.8, lam=0.25, dim=D)
    slow = NeuralCache(window, theta=0.8, lam=0.25, dim=D)
    earlier = torch.randn(4, D), torch.randint(0, 4, (4,))
    for cache in (fast, slow):
        cache.add(*earlier)  # a memory from an earlier call
    got = fast.mix_targets(log_probs.gather(1, targets[:, None])[:, 0], h, targets)
    expected = []
    for t in range(T):
        expected.append(slow.mix(log_probs[t : t + 1], h[t : t + 1])[0, targets[t]])
        slow.add(h[t : t + 1], targets[t : t + 1])
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    assert torch.equal(fast.keys, slow.keys) and torch.equal(fast.values, slow.values)


def test_lambda_zero_equals_the_plain_model_exactly(tiny_run, tiny_corpus):
    from lm.corpus import open_corpus
    from lm.data import token_stream

    _, model, tok, _ = load_model(tiny_run / "best.pt")
    stream = token_stream(open_corpus(str(tiny_corpus)), "test", tok)
    plain = evaluate(model, stream, bos_id=tok.eos_id, batch_size=1, keep_tokens=True)
    cached = evaluate_cache(model, stream, bos_id=tok.eos_id, window=100, theta=0.5, lam=0.0, keep_tokens=True)
    assert torch.equal(cached["token_log_probs"], plain["token_log_probs"])
    assert cached["ppl"] == cached["plain_ppl"] == plain["ppl"]


def test_cache_helps_on_text_that_repeats_rare_words(tiny_run):
    """Nouns in an order the model never saw in training, repeated: the model keeps
    finding them unlikely, the cache has seen them before."""
    _, model, tok, _ = load_model(tiny_run / "best.pt")
    line = "the presentation river city tree house ."
    stream = torch.tensor(tok.encode_typed("\n".join([line] * 30))[:-1])
    r = evaluate_cache(model, stream, bos_id=tok.eos_id, window=200, theta=0.5, lam=0.3)
    assert r["ppl"] < 0.5 * r["plain_ppl"]


def test_tune_finds_the_grid_best_of_full_evaluations():
    """The one-pass search equals running the cached evaluation at every grid point."""
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=12, dropout=0.0, cutoffs=[5, 12]), V).eval()
    stream = torch.randint(0, V, (150,))
    thetas, lambdas = (0.0, 0.5, 2.0), (0.0, 0.1, 0.4, 0.9)
    tuned = tune_cache(model, stream, bos_id=1, window=40, thetas=thetas, lambdas=lambdas)
    full = [[evaluate_cache(model, stream, bos_id=1, window=40, theta=t, lam=l)["ppl"] for l in lambdas]
            for t in thetas]
    assert torch.allclose(torch.tensor(tuned["ppl_grid"]), torch.tensor(full), rtol=1e-6)
    best = min((p, t, l) for row, t in zip(full, thetas) for p, l in zip(row, lambdas))
    assert (tuned["theta"], tuned["lambda"]) == best[1:]
    assert math.isclose(tuned["ppl"], best[0], rel_tol=1e-6)
    assert math.isclose(tuned["plain_ppl"], full[0][0], rel_tol=1e-9)


@pytest.mark.parametrize("window,theta,lam", [(0, 1.0, 0.1), (10, -1.0, 0.1), (10, 1.0, 1.5), (10, math.nan, 0.1)])
def test_bad_settings_are_config_errors(window, theta, lam):
    with pytest.raises(ConfigError):
        NeuralCache(window, theta, lam, dim=D)


def test_eval_help_states_the_library_defaults(capsys):
    from lm import cache
    from lm.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in (cache.WINDOW, cache.THETA, cache.LAMBDA):
        assert f"(default: {default})" in text
