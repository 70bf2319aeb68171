import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig
from lm.model import AdaptiveSoftmax, LSTMLM, lookup

V = 50


def model(**kw) -> LSTMLM:
    cfg = ModelConfig(emb_dim=12, hidden_dim=20, n_layers=2, dropout=0.3, cutoffs=[10, 30]) 
    for k, v in kw.items():
        setattr(cfg, k, v)
    return LSTMLM(cfg, V).eval()


@pytest.mark.parametrize("kw", [{}, {"head": "full"}, {"tie_weights": False}, {"n_layers": 1}])
def test_one_call_equals_two_halves_carrying_hidden(kw):
    m = model(**kw)
    x = torch.randint(0, V, (3, 17))
    whole, _ = m(x)
    first, h = m(x[:, :9])
    second, _ = m(x[:, 9:], h)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


@pytest.mark.parametrize("kw", [{}, {"head": "full"}, {"tie_weights": False}])
def test_heads_give_normalized_distributions_consistent_with_nll(kw):
    m = model(**kw)
    features, _ = m(torch.randint(0, V, (2, 7)))
    lp = m.log_probs(features)  # (2, 7, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)
    targets = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(m.nll(features, targets), -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def test_untied_adaptive_head_equals_torch_adaptive_log_softmax():
    ours = AdaptiveSoftmax(16, V, [10, 30], tied=None, div_value=2.0, bias=False)
    ref = nn.AdaptiveLogSoftmaxWithLoss(16, V, [10, 30], div_value=2.0, head_bias=False)
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([ours.shortlist, ours.cluster]))
        for i, tail in enumerate(ref.tail):
            tail[0].weight.copy_(ours.proj[i].weight)
            tail[1].weight.copy_(ours.out[i])
    h, target = torch.randn(40, 16), torch.randint(0, V, (40,))
    torch.testing.assert_close(ours.nll(h, target), -ref(h, target).output)
    torch.testing.assert_close(ours.log_probs(h), ref.log_prob(h))


def test_tied_weights_are_shared_and_last_layer_matches_embedding():
    m = model()
    assert m.layers[-1].hidden_size == 12 and m.layers[0].hidden_size == 20
    assert m.head.tied is m.embedding.weight
    full = model(head="full")
    assert full.head.weight is full.embedding.weight
    untied = model(tie_weights=False)
    assert untied.layers[-1].hidden_size == 20


def test_cutoffs_beyond_the_vocabulary_are_dropped():
    head = AdaptiveSoftmax(8, 12, [10, 2000, 10000])
    assert head.bounds == [0, 10, 12]
    lp = head.log_probs(torch.randn(3, 8))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("head", ["adaptive", "full"])
def test_fast_tied_gradients_equal_plain_autograd(head, monkeypatch):
    """The fused block kernel and the lookup that writes into ``weight.grad`` give the
    same gradients as ordinary autograd (a plain embedding lookup, the full
    log-softmax), including clusters that no target falls in (their rows still get the
    softmax's gradient)."""
    import lm.model

    m = model(head=head).train()
    torch.manual_seed(0)
    x = torch.randint(0, V, (4, 9))
    y = torch.randint(0, 35, (4, 9))  # nothing in the last cluster [30, 50)
    y[0, 0] = 12
    grads = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(lm.model, "lookup", lambda weight, words, sink=None: F.embedding(words, weight))
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        features, _ = m(x)
        if fast:
            loss = m.nll(features, y).sum()
        else:
            loss = -m.log_probs(features).gather(-1, y.unsqueeze(-1)).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_lookup_gradient_lands_in_weight_grad_alone_and_accumulates():
    """Without a head using the matrix, the lookup's rows still make the gradient (from
    zeros); a second backward adds to it, as autograd does; no-grad lookups are plain."""
    weight = torch.randn(10, 3, requires_grad=True)
    words = torch.tensor([[1, 4, 1], [9, 0, 4]])
    coef = torch.randn(2, 3, 3)
    expected = torch.zeros(10, 3).index_add_(0, words.reshape(-1), coef.reshape(-1, 3))
    (lookup(weight, words) * coef).sum().backward()
    torch.testing.assert_close(weight.grad, expected)
    (lookup(weight, words) * coef).sum().backward()
    torch.testing.assert_close(weight.grad, 2 * expected)
    with torch.no_grad():
        assert torch.equal(lookup(weight, words), weight[words])


def test_reading_a_long_text_in_pieces_equals_one_call(monkeypatch):
    import lm.model

    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=12, cutoffs=[5, 10]), 30).eval()
    ids = torch.randint(0, 30, (23,)).tolist()
    with torch.no_grad():
        whole, hidden = model(torch.tensor([ids]))
        monkeypatch.setattr(lm.model, "READ_CHUNK", 5)
        pieces = list(model.read(ids))
    assert [f.shape[0] for f, _ in pieces] == [5, 5, 5, 5, 3]
    assert torch.allclose(torch.cat([f for f, _ in pieces]), whole[0], atol=1e-6)
    for (h, c), (h2, c2) in zip(hidden, pieces[-1][1]):
        assert torch.allclose(h, h2, atol=1e-6) and torch.allclose(c, c2, atol=1e-6)


def test_block_linear_under_bf16_gives_the_fp32_gradient_of_the_bf16_product(monkeypatch):
    """With bf16 inputs (autocast) the fp32 weight gradient comes from an fp32 product for
    small blocks and from a bf16 product for large ones; both equal the exact gradient
    of the bf16 computation to bf16's precision, blocks and rows in their places."""
    import lm.model
    from lm.model import block_linear

    torch.manual_seed(0)
    sizes = [5, 7, 3]
    weight = torch.randn(sum(sizes), 8, requires_grad=True)
    inputs = [torch.randn(n, 8).to(torch.bfloat16) for n in (40, 3, 0)]  # a block with no rows too
    coef = [torch.randn(n, s) for n, s in zip((40, 3, 0), sizes)]
    expected = torch.cat([c.double().t() @ x.double() for c, x in zip(coef, inputs)])
    for rows in (0, 8, 1000):  # every block by the bf16 product, mixed, every block in fp32
        monkeypatch.setattr(lm.model, "FP32_GRAD_ROWS", rows)
        weight.grad = None
        outs = block_linear(weight, sizes, inputs)
        assert [o.dtype for o in outs] == [torch.bfloat16] * 3
        sum((o.float() * c).sum() for o, c in zip(outs, coef)).backward()
        assert weight.grad.dtype == torch.float32
        torch.testing.assert_close(weight.grad.double(), expected, rtol=2e-2, atol=5e-2)
        assert torch.equal(weight.grad[12:], torch.zeros(3, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_softmax_nll_and_its_gradients_equal_autograd_through_log_softmax(dtype, with_bias):
    """The fused softmax NLL gives log_softmax's values and, for any incoming gradient,
    autograd's gradients for the logits (in their own dtype) and the bias; without
    autograd it is the same number from a logsumexp; the logits are never changed."""
    from lm.model import softmax_nll

    torch.manual_seed(0)
    logits = (3 * torch.randn(9, 13)).to(dtype).requires_grad_()
    before = logits.detach().clone()
    bias = torch.randn(13, requires_grad=True) if with_bias else None
    target = torch.randint(0, 13, (9,))
    upstream = torch.randn(9)
    ours = softmax_nll(logits, target, bias)
    (ours * upstream).sum().backward()
    got = logits.grad, None if bias is None else bias.grad
    logits.grad = None
    if bias is not None:
        bias.grad = None
    z = logits.float() if bias is None else logits.float() + bias
    ref = -F.log_softmax(z, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    (ref * upstream).sum().backward()
    assert ours.dtype == torch.float32 and torch.equal(logits.detach(), before)
    torch.testing.assert_close(ours, ref)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], logits.grad)
    if bias is not None:
        torch.testing.assert_close(got[1], bias.grad)
    with torch.no_grad():
        torch.testing.assert_close(softmax_nll(logits, target, bias), ref)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("deferred", [True, False])
def test_padding_a_clusters_rows_changes_no_loss_and_no_gradient(tied, deferred, monkeypatch):
    """Clusters with many tokens are padded to a multiple of PAD_TO rows (so that oneDNN
    meets fewer matrix shapes); the losses and every gradient, including the tied
    matrix's deferred one, equal the unpadded head's."""
    import lm.model
    from lm.train import clipped_step

    torch.manual_seed(0)
    x = torch.randint(0, V, (6, 20))
    y = torch.randint(0, V, (6, 20))  # about 48 tokens in each of the two tail clusters
    results = []
    for above, to in ((10**9, 16), (4, 16)):
        monkeypatch.setattr(lm.model, "PAD_ABOVE", above)
        monkeypatch.setattr(lm.model, "PAD_TO", to)
        torch.manual_seed(2)
        m = model(tie_weights=tied).train()
        sink = m.defer_tied_gradient(deferred and tied)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        torch.manual_seed(1)
        features, _ = m(x)
        nll = m.nll(features, y)
        nll.mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        clipped_step(opt, list(m.parameters()), 0.25, sink)
        results.append((nll.detach(), grads, [p.detach().clone() for p in m.parameters()]))
    assert any(n % 16 and n > 4 for n in torch.bincount(torch.bucketize(y.reshape(-1), m.head.cuts, right=True)).tolist()[1:])
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], msg=n)
    for a, b in zip(results[0][2], results[1][2]):  # after the clipped step (deferred: straight into the weight)
        torch.testing.assert_close(a, b)


def test_padded_rows_groups(monkeypatch):
    import lm.model
    from lm.model import padded_rows

    rows = torch.arange(10)
    assert padded_rows(rows, [3, 7])[0] == [3, 7]  # below PAD_ABOVE: untouched
    monkeypatch.setattr(lm.model, "PAD_ABOVE", 2)
    monkeypatch.setattr(lm.model, "PAD_TO", 4)
    sizes, padded = padded_rows(rows, [2, 5, 0, 3])
    assert sizes == [2, 8, 0, 4]  # each group over 2 rows up to a multiple of 4, with its first row
    assert padded.tolist() == [0, 1, 2, 3, 4, 5, 6, 2, 2, 2, 7, 8, 9, 7]
