import torch

from lm.batching import batchify, bptt_windows, eval_lanes


def test_batchify_lanes_are_contiguous_slices():
    data = batchify(torch.arange(13), 3)
    assert data.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_windows_cover_every_target_once_with_shifted_targets():
    data = batchify(torch.arange(40), 2)  # lanes of 20
    pairs = [(x, y) for _, x, y in bptt_windows(data, 6)]
    assert len(pairs) == 4
    xs = torch.cat([x for x, _ in pairs], 1)
    ys = torch.cat([y for _, y in pairs], 1)
    assert torch.equal(ys, xs + 1)
    assert torch.equal(ys, data[:, 1:])
    assert [x.size(1) for x, _ in pairs] == [6, 6, 6, 1]
    assert [x[0, 0].item() for _, x, _ in bptt_windows(data, 6, start=12)] == [12, 18]


def test_variable_windows_cover_every_column_once_and_repeat_with_the_rng_state():
    data = batchify(torch.arange(2000), 2)  # lanes of 1000
    rng = torch.Generator().manual_seed(3)
    spans = [(pos, x.size(1)) for pos, x, _ in bptt_windows(data, 35, rng=rng)]
    assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] == 999
    assert len({n for _, n in spans[:-1]}) > 5 and all(5 <= n <= 45 for _, n in spans[:-1])
    again = [(pos, x.size(1)) for pos, x, _ in bptt_windows(data, 35, rng=torch.Generator().manual_seed(3))]
    assert again == spans


def test_eval_lanes_predict_every_token_exactly_once():
    stream = torch.arange(100, 123)
    for b in (1, 3, 5, 23, 40):
        x, y, mask = eval_lanes(stream, b, bos_id=7)
        assert sorted(y[mask].tolist()) == stream.tolist()
        assert x[0, 0].item() == 7  # the first token is predicted from <eos>
        # every other target's input is its predecessor in the stream
        flat_x, flat_y = x[mask], y[mask]
        assert torch.equal(flat_x[1:], flat_y[:-1])


def test_eval_lanes_keep_the_stream_on_its_device():
    # "meta" stands in for a GPU here: a mask left on the CPU fails masked_fill on CUDA
    x, y, mask = eval_lanes(torch.arange(10, device="meta"), 3, bos_id=0)
    assert x.device == y.device == mask.device == torch.device("meta")
