import math

import torch

from lm.config import ModelConfig
from lm.evaluate import evaluate
from lm.model import LSTMLM

V = 37


def test_uniform_logits_give_perplexity_equal_to_vocabulary_size():
    m = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8, head="full"), V)
    with torch.no_grad():
        m.head.bias.zero_()
        m.embedding.weight.zero_()  # tied decoder weight: zero logits everywhere
    stream = torch.randint(0, V, (501,))
    for b in (1, 7):
        r = evaluate(m, stream, bos_id=1, batch_size=b, bptt=13)
        assert r["tokens"] == 501
        assert math.isclose(r["ppl"], V, rel_tol=1e-6)


def test_batch_one_equals_token_by_token_reference():
    m = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=12, cutoffs=[5, 20]), V).eval()
    stream = torch.randint(0, V, (64,))
    total, hidden = 0.0, None
    inputs = [1] + stream[:-1].tolist()
    with torch.no_grad():
        for x, y in zip(inputs, stream.tolist()):
            f, hidden = m(torch.tensor([[x]]), hidden)
            total -= m.log_probs(f)[0, 0, y].item()
    r = evaluate(m, stream, bos_id=1, batch_size=1, bptt=10)
    assert math.isclose(r["loss"], total / 64, rel_tol=1e-5)
    assert math.isclose(r["bits_per_token"], r["loss"] / math.log(2))


def test_word_level_perplexity_rescales_the_same_likelihood():
    from lm.evaluate import add_word_level

    r = add_word_level({"loss": 2.0, "tokens": 150}, words=100)
    assert math.isclose(r["word_ppl"], math.exp(2.0 * 150 / 100)) and r["tokens_per_word"] == 1.5
