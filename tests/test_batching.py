import torch

from lm.batching import batchify, eval_lanes, n_windows, windows


def test_batchify_lanes_are_contiguous_slices():
    data = batchify(torch.arange(13), 3)
    assert data.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_windows_cover_every_target_once_with_shifted_targets():
    data = batchify(torch.arange(40), 2)  # lanes of 20
    pairs = list(windows(data, 6))
    assert len(pairs) == n_windows(data, 6) == 4
    xs = torch.cat([x for x, _ in pairs], 1)
    ys = torch.cat([y for _, y in pairs], 1)
    assert torch.equal(ys, xs + 1)
    assert torch.equal(ys, data[:, 1:])
    assert [x.size(1) for x, _ in pairs] == [6, 6, 6, 1]
    assert [x[0, 0].item() for x, _ in windows(data, 6, start=2)] == [12, 18]


def test_eval_lanes_predict_every_token_exactly_once():
    stream = torch.arange(100, 123)
    for b in (1, 3, 5, 23, 40):
        x, y, mask = eval_lanes(stream, b, bos_id=7)
        assert sorted(y[mask].tolist()) == stream.tolist()
        assert x[0, 0].item() == 7  # the first token is predicted from <eos>
        # every other target's input is its predecessor in the stream
        flat_x, flat_y = x[mask], y[mask]
        assert torch.equal(flat_x[1:], flat_y[:-1])
