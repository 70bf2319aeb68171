"""Small single-purpose regularisers for LSTM language models (AWD-LSTM's set).

Each is a plain function or a tiny module, identity when its rate is 0 or in eval mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A dropout mask of ``shape``: each entry 1 / (1 - p) with probability 1 - p, else 0,
    in ``like``'s dtype and device.

    Drawn as ``uniform >= p`` rather than with ``bernoulli_``: on a CPU, ``bernoulli_``
    with a scalar probability draws one number at a time (12 ms for the wt2-cpu model's
    1.3M hidden-to-hidden weights, 9% of its training step), while ``torch.rand`` is
    vectorised (3.4 ms). Same distribution."""
    keep = torch.rand(shape, device=like.device) >= p
    return keep.to(like.dtype).mul_(1 / (1 - p))


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout: one mask per sequence and unit, the same at every time step.
    x: (B, T, H)."""
    if not training or p == 0:
        return x
    return x * keep_mask((x.size(0), 1, x.size(2)), p, x)  # (B, 1, H) mask


def embedding_dropout(vectors: Tensor, words: Tensor, vocab_size: int, p: float, training: bool) -> Tensor:
    """Drop whole word types: every occurrence of a dropped word in the batch gets a zero
    vector, the rest are scaled by 1 / (1 - p). vectors: (B, T, E), the embeddings of
    words: (B, T) -> (B, T, E).

    The mask is drawn for the whole vocabulary but applied to the looked-up rows only,
    which equals masking the embedding matrix without touching its 33k x E entries."""
    if not training or p == 0:
        return vectors
    keep = keep_mask((vocab_size,), p, vectors)  # (V,)
    return vectors * keep[words].unsqueeze(-1)


class LSTMLayer(nn.LSTM):
    """One LSTM layer with weight drop (DropConnect on the hidden-to-hidden matrix, one
    mask per forward call, as in AWD-LSTM).

    The dropped matrix is a new tensor each call, so the layer calls the LSTM kernel with
    its own weight list instead of mutating parameters (no warnings, nothing to restore).
    On CUDA the four weights are packed into one contiguous buffer in cuDNN's layout, so
    cuDNN keeps its fused path instead of compacting the weights on every call."""

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers=1, batch_first=True)
        self.weight_drop = weight_drop

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):  # type: ignore[override]
        if not (self.training and self.weight_drop > 0):
            return super().forward(x, state)
        w_ih, w_hh, b_ih, b_hh = self._flat_weights
        if w_hh.is_cuda:  # one fused kernel there
            w_hh = F.dropout(w_hh, self.weight_drop, training=True)
        else:
            w_hh = w_hh * keep_mask(w_hh.shape, self.weight_drop, w_hh)
        weights = [w_ih, w_hh, b_ih, b_hh]
        if x.is_cuda:
            weights = _packed(weights)
        if state is None:
            zeros = x.new_zeros(1, x.size(0), self.hidden_size)
            state = (zeros, zeros)
        out, h, c = torch._VF.lstm(x, state, weights, True, 1, 0.0, True, False, True)
        return out, (h, c)


def _packed(weights: list[Tensor]) -> list[Tensor]:
    """Views of one flat buffer holding ``weights`` back to back (cuDNN's layout)."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    out, offset = [], 0
    for w in weights:
        out.append(flat[offset : offset + w.numel()].view_as(w))
        offset += w.numel()
    return out


def activation_reg(h: Tensor, alpha: float) -> Tensor:
    """AR: alpha * mean squared activation of the (dropped-out) last-layer output."""
    return alpha * h.pow(2).mean() if alpha else h.new_zeros(())


def temporal_activation_reg(h: Tensor, beta: float) -> Tensor:
    """TAR: beta * mean squared change of the (raw) last-layer output between steps.
    h: (B, T, H)."""
    if not beta or h.size(1) < 2:
        return h.new_zeros(())
    return beta * (h[:, 1:] - h[:, :-1]).pow(2).mean()
