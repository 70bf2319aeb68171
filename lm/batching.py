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


def bptt_windows(data: torch.Tensor, bptt: int, start: int = 0, rng: torch.Generator | None = None
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(position, x, y) over batchified ``data`` from column ``start``; x, y: (B, T).

    With ``rng``, each window's length is drawn as in AWD-LSTM: around ``bptt`` (95%) or
    ``bptt / 2`` (5%), normal with deviation 5, at least 5 and at most ``bptt + 10``;
    every column is still used exactly once per pass. The draws come from ``rng`` alone,
    so saving its state saves the position in the sequence of lengths."""
    last = data.size(1) - 1
    i = start
    while i < last:
        t = bptt
        if rng is not None:
            base = bptt if torch.rand((), generator=rng).item() < 0.95 else bptt / 2
            t = min(bptt + 10, max(5, int(base + 5 * torch.randn((), generator=rng).item())))
        t = min(t, last - i)
        yield i, data[:, i : i + t], data[:, i + 1 : i + 1 + t]
        i += t


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
    mask = torch.ones(lane * batch_size, dtype=torch.bool, device=stream.device)
    if pad:
        mask[n:] = False
        inputs = torch.cat([inputs, inputs.new_zeros(pad)])
        stream = torch.cat([stream, stream.new_zeros(pad)])
    shape = (batch_size, lane)
    return inputs.view(shape), stream.view(shape), mask.view(shape)
