import math

import pytest
import torch

from lm.config import ModelConfig
from lm.model import LSTMLM
from lm.quantize import quantize

V = 60


@pytest.mark.parametrize("head,tied", [("adaptive", True), ("adaptive", False), ("full", True)])
@pytest.mark.parametrize("lstm", [True, False])
def test_int8_model_stays_close_and_normalized(head, tied, lstm):
    torch.manual_seed(0)
    m = LSTMLM(ModelConfig(emb_dim=16, hidden_dim=24, head=head, tie_weights=tied, cutoffs=[10, 30]), V).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = quantize(m, lstm=lstm)
    x = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        ref = m.log_probs(m(x)[0])
        feats, _ = q(x)
        out = q.log_probs(feats)
        nll = q.nll(feats, x)
    # a proper distribution, the same one nll() scores, and close to the float model's
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 7), atol=1e-4, rtol=0)
    # (activations are quantised per call with their own range, so scoring a subset of
    # rows, as nll does per cluster, differs from scoring all rows by quantisation noise)
    torch.testing.assert_close(nll, -out.gather(-1, x.unsqueeze(-1)).squeeze(-1), atol=5e-3, rtol=1e-3)
    assert (out.exp() - ref.exp()).abs().sum(-1).max() < 0.05  # total variation distance
    for k, v in m.state_dict().items():  # the float model is untouched
        assert torch.equal(v, before[k])


def test_int8_carries_hidden_state_like_the_float_model():
    torch.manual_seed(0)
    m = LSTMLM(ModelConfig(emb_dim=16, hidden_dim=24, cutoffs=[10, 30]), V).eval()
    q = quantize(m)
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        whole, _ = q(x)
        first, h = q(x[:, :5])
        second, _ = q(x[:, 5:], h)
    # equal up to the noise of quantising each call's activations with their own range
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=2e-2, rtol=0)
    assert math.isfinite(float(whole.sum()))


def test_int8_scores_a_single_feature_vector():
    """generate() and the predictor ask for one position's distribution: (D,) -> (V,)."""
    torch.manual_seed(0)
    for head in ("adaptive", "full"):
        q = quantize(LSTMLM(ModelConfig(emb_dim=16, hidden_dim=24, head=head, cutoffs=[10, 30]), V).eval())
        with torch.no_grad():
            feats, _ = q(torch.randint(0, V, (1, 4)))
            one = q.log_probs(feats[0, -1])
        assert one.shape == (V,)
        torch.testing.assert_close(one, q.log_probs(feats)[0, -1])
