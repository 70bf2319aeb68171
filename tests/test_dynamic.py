"""Dynamic evaluation (lm/dynamic.py): oracles for the update rule and its order."""
import copy
import hashlib
import json
import math

import pytest
import torch

from lm.checkpoint import load_model
from lm.cli import main
from lm.config import ModelConfig
from lm.dynamic import dynamic_evaluate, gradient_ms
from lm.errors import ConfigError, LMError
from lm.evaluate import evaluate
from lm.model import LSTMLM

V = 40


def tiny_model() -> LSTMLM:
    return LSTMLM(ModelConfig(emb_dim=12, hidden_dim=16, dropout=0.0, cutoffs=[8, 20]), V).eval()


def repetitive_stream() -> torch.Tensor:
    return torch.randint(0, V, (15,)).repeat(30)  # (450,)


def test_learning_rate_zero_equals_the_plain_model(tiny_run, tiny_corpus):
    from lm.corpus import open_corpus
    from lm.data import token_stream

    _, model, tok, _ = load_model(tiny_run / "best.pt")
    stream = token_stream(open_corpus(str(tiny_corpus)), "test", tok)
    plain = evaluate(model, stream, bos_id=tok.eos_id, batch_size=1, keep_tokens=True)
    ms = gradient_ms(model, stream, bos_id=tok.eos_id, bptt=10, batch_size=4)
    for method, decay, stats in (("sgd", 0.0, None), ("rms", 0.1, ms)):
        r = dynamic_evaluate(model, stream, bos_id=tok.eos_id, method=method, lr=0.0, decay=decay, bptt=7,
                             ms=stats, keep_tokens=True)
        assert torch.allclose(r["token_log_probs"], plain["token_log_probs"], atol=1e-5, rtol=0)
        assert math.isclose(r["ppl"], plain["ppl"], rel_tol=1e-6)


@pytest.mark.parametrize("method,lr", [("sgd", 1.0), ("rms", 3e-3)])
def test_a_positive_rate_learns_a_repetitive_text(method, lr):
    model, stream = tiny_model(), repetitive_stream()
    plain = evaluate(model, stream, bos_id=1, batch_size=1)
    # rms: the statistics from the first part of the stream itself
    ms = gradient_ms(model, stream[:150], bos_id=1, bptt=10, batch_size=2) if method == "rms" else None
    r = dynamic_evaluate(model, stream, bos_id=1, method=method, lr=lr, decay=0.001, bptt=10, ms=ms, eps=1e-3)
    assert r["ppl"] < 0.5 * plain["ppl"]


def test_each_window_is_scored_before_it_is_learnt_from():
    """Window 1 is scored with the trained weights; window 2 with the weights after one
    rms step with decay, computed here by hand."""
    model, stream = tiny_model(), repetitive_stream()[:20]
    ms = gradient_ms(model, repetitive_stream(), bos_id=1, bptt=10, batch_size=3)
    lr, decay, eps = 0.01, 0.1, 1e-5
    r = dynamic_evaluate(model, stream, bos_id=1, method="rms", lr=lr, decay=decay, bptt=10, ms=ms, eps=eps,
                         keep_tokens=True)
    x = torch.cat([torch.tensor([1]), stream[:-1]]).view(1, -1)
    ref = copy.deepcopy(model)
    features, hidden = ref(x[:, :10])
    nll = ref.nll(features, stream[:10].view(1, -1))[0]
    assert torch.allclose(r["token_log_probs"][:10], -nll.detach(), atol=1e-6)
    nll.mean().backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            stepped = p - lr * p.grad / (ms[name].sqrt() + eps)
            p.copy_(stepped + decay * (p - stepped))  # p is still theta0 here
        features, _ = ref(x[:, 10:], [(h.detach(), c.detach()) for h, c in hidden])
        second = -ref.nll(features, stream[10:].view(1, -1))[0]
    assert torch.allclose(r["token_log_probs"][10:], second, atol=1e-5)
    assert not torch.allclose(second, -model.nll(model(x)[0][:, 10:], stream[10:].view(1, -1))[0].detach(), atol=1e-3)


def test_the_model_and_its_checkpoint_are_untouched(tiny_run, capsys):
    path = tiny_run / "best.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _, model, tok, _ = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = torch.tensor(tok.encode_typed("the cat sat on the mat . " * 20))
    r = dynamic_evaluate(model, stream, bos_id=tok.eos_id, method="sgd", lr=1.0, bptt=5)
    assert r["ppl"] < evaluate(model, stream, bos_id=tok.eos_id, batch_size=1)["ppl"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert main(["eval", str(path), "--split", "test", "--dynamic", "rms", "--dynamic-ms-tokens", "500",
                 "--dynamic-lr", "1e-3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["dynamic"]
    assert out["method"] == "rms" and out["ms_tokens"] == 500 and math.isfinite(out["ppl"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_divergence_and_bad_settings_are_one_line_errors():
    model, stream = tiny_model(), repetitive_stream()
    with pytest.raises(LMError, match="lower --dynamic-lr"):
        dynamic_evaluate(model, stream, bos_id=1, method="sgd", lr=1e30, bptt=10)
    for kwargs in ({"method": "adam"}, {"method": "sgd", "lr": -1.0}, {"method": "sgd", "decay": 2.0},
                   {"method": "sgd", "bptt": 0}):
        with pytest.raises(ConfigError):
            dynamic_evaluate(model, stream, bos_id=1, **kwargs)


def test_eval_help_states_the_library_defaults(capsys):
    from lm import dynamic

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: sgd {dynamic.LR['sgd']:g}, rms {dynamic.LR['rms']:g})" in text
    assert f"(default: sgd {dynamic.DECAY['sgd']:g}, rms {dynamic.DECAY['rms']:g})" in text
    assert f"(default: {dynamic.BPTT})" in text and f"(default: {dynamic.MS_TOKENS})" in text
