"""Token stream -> truncated-BPTT windows over B parallel lanes.

The stream is cut into B contiguous lanes, one row each, so that row b of one window
continues row b of the previous window and the LSTM state can be carried across
windows. With B = 3 and the stream a b c d e f g h i j k l:

    lane 0:  a b c d      window T=2:  x = [[a b]    y = [[b c]
    lane 1:  e f g h                        [e f]         [f g]
    lane 2:  i j k l                        [i j]]        [j k]]

The targets are the inputs shifted by one; the tokens that do not fill a last lane are
dropped for training (at most B - 1). Evaluation uses ``eval_lanes`` instead, which
predicts every token exactly once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (B, N // B), lane b holding the b-th contiguous slice."""
    n = stream.numel() // batch_size
    return stream[: n * batch_size].view(batch_size, n).contiguous()


def n_windows(data: torch.Tensor, bptt: int) -> int:
    """Windows per pass over batchified ``data``: every column but the last is an input."""
    return max(0, -(-(data.size(1) - 1) // bptt))


def windows(data: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pairs of shape (B, T) over batchified ``data``, from window ``start`` on."""
    for i in range(start * bptt, data.size(1) - 1, bptt):
        t = min(bptt, data.size(1) - 1 - i)
        yield data[:, i : i + t], data[:, i + 1 : i + 1 + t]


def eval_lanes(stream: torch.Tensor, batch_size: int, bos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and mask, each (B, L), predicting every token of ``stream`` once.

    The first token is predicted from ``bos_id`` (the standard convention: an <eos>
    context), the rest from their predecessor. Lanes are contiguous like ``batchify``;
    the last lane is padded and the padding masked out.
    """
    n = stream.numel()
    inputs = torch.cat([stream.new_tensor([bos_id]), stream[:-1]])
    lane = -(-n // batch_size)
    pad = lane * batch_size - n
    mask = torch.ones(lane * batch_size, dtype=torch.bool)
    if pad:
        mask[n:] = False
        inputs = torch.cat([inputs, inputs.new_zeros(pad)])
        stream = torch.cat([stream, stream.new_zeros(pad)])
    shape = (batch_size, lane)
    return inputs.view(shape), stream.view(shape), mask.view(shape)
