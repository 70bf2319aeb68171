import warnings

import torch
from torch import nn

from lm.regularizers import (LSTMLayer, _packed, activation_reg, embedding_dropout, keep_mask, locked_dropout,
                             temporal_activation_reg)


def test_keep_mask_keeps_a_fraction_1_minus_p_scaled_by_1_over_1_minus_p():
    torch.manual_seed(0)
    for p, dtype in ((0.4, torch.float32), (0.25, torch.bfloat16), (0.9, torch.float32)):
        mask = keep_mask((400, 500), p, torch.empty(0, dtype=dtype))
        assert mask.shape == (400, 500) and mask.dtype == dtype
        assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p), dtype=dtype).item()}
        kept = (mask > 0).double().mean().item()
        assert abs(kept - (1 - p)) < 4 * ((p * (1 - p)) / mask.numel()) ** 0.5  # within 4 standard errors
        assert abs(mask.double().mean().item() - 1) < 0.02  # unbiased: E[mask] = 1


def test_locked_dropout_uses_one_mask_for_every_time_step():
    x = torch.ones(4, 10, 32)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same mask at every step
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # kept units rescaled by 1 / (1 - p)
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)


def test_embedding_dropout_drops_whole_word_types():
    emb = nn.Embedding(50, 8)
    words = torch.tensor([[3, 7, 3, 3, 7, 9] * 5])
    base = emb(words)
    out = embedding_dropout(base, words, 50, 0.5, training=True)
    scale = (out / base)[..., 0]  # one factor per position, 0 or 2
    for w in (3, 7, 9):
        assert len(set(scale[words == w].tolist())) == 1  # every occurrence treated alike
    assert torch.equal(embedding_dropout(base, words, 50, 0.5, training=False), base)


def test_weight_drop_layer_equals_plain_lstm_in_eval_and_drops_connections_in_training():
    torch.manual_seed(0)
    layer = LSTMLayer(6, 8, weight_drop=0.5)
    plain = nn.LSTM(6, 8, batch_first=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 6)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], plain(x)[0])
    layer.train()
    before = layer.weight_hh_l0.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-contiguous weights" or other warnings
        out, (h, c) = layer(x)
    assert not torch.allclose(out, plain(x)[0])
    assert torch.equal(layer.weight_hh_l0, before)  # the parameter itself is never modified
    out.sum().backward()
    assert layer.weight_hh_l0.grad is not None and layer.weight_hh_l0.grad.abs().sum() > 0


def test_packed_weights_are_views_of_one_buffer_with_the_same_values():
    ws = [torch.randn(8, 4, requires_grad=True), torch.randn(8, 2), torch.randn(8)]
    packed = _packed(ws)
    assert all(torch.equal(a, b) for a, b in zip(ws, packed))
    base = packed[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in packed)
    packed[0].sum().backward()
    assert torch.equal(ws[0].grad, torch.ones(8, 4))


def test_activation_and_temporal_activation_regularisation_values():
    h = torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])  # (B=1, T=2, H=2)
    assert activation_reg(h, 2.0).item() == 2.0 * (1 + 9 + 4 + 25) / 4
    assert temporal_activation_reg(h, 1.0).item() == ((2 - 1) ** 2 + (5 - 3) ** 2) / 2
    assert activation_reg(h, 0.0).item() == 0 and temporal_activation_reg(h[:, :1], 1.0).item() == 0
