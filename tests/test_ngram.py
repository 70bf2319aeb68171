"""The Kneser-Ney n-gram baseline: exact against a textbook reference, normalized,
saved without pickle, and wired into the command line."""
import collections
import json
import random

import numpy as np
import pytest
import torch

from lm.cli import main
from lm.errors import CheckpointError, ConfigError
from lm.ngram import KneserNey, check_order, discounts

from test_cli import assert_one_line_error, run_lm


def reference_probability(train: list[int], V: int, bos: int, order: int):
    """Interpolated modified Kneser-Ney written out with dictionaries, straight from the
    formulas (Chen and Goodman 1998), as the oracle for the vectorised model."""
    s = [bos] + train
    count = {}  # order -> Counter of n-gram tuples
    for k in range(1, order + 1):
        occurrences = [tuple(s[i - k + 1 : i + 1]) for i in range(max(1, k - 1), len(s))]
        if k == order:
            count[k] = collections.Counter(occurrences)
            continue
        before, lone = collections.defaultdict(set), collections.Counter()
        for i in range(max(1, k - 1), len(s)):
            g = tuple(s[i - k + 1 : i + 1])
            if i - k >= 0:
                before[g].add(s[i - k])  # a distinct word seen just before g
            else:
                lone[g] += 1  # g starts the stream: nothing before it
        count[k] = {g: len(before[g]) + lone[g] for g in set(occurrences)}
    D = {k: discounts(np.array(list(c.values()))) for k, c in count.items()}

    def p(w: int, h: tuple, k: int) -> float:
        if k == 0:
            return 1.0 / V
        if len(h) < k - 1:  # not enough history for this order
            return p(w, h, k - 1)
        h = h[len(h) - (k - 1):] if k > 1 else ()
        lower = p(w, h[1:], k - 1) if k > 1 else 1.0 / V
        follow = {g[-1]: c for g, c in count[k].items() if g[:-1] == h}
        total = sum(follow.values())
        if total == 0:
            return lower
        kept = {v: c - D[k][min(c, 3) - 1] for v, c in follow.items()}
        return kept.get(w, 0.0) / total + (1 - sum(kept.values()) / total) * lower

    return p


def random_stream(n: int, V: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 + (i % 4) * 3 for i in range(V - 1)] + [0]  # the last word never occurs
    return rng.choices(range(V), weights=weights, k=n)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_equal_the_textbook_reference(order):
    V, bos = 8, 1
    train, test = random_stream(400, V, 0), random_stream(60, V, 1)
    model = KneserNey.train(np.array(train), V, bos, order)
    p = reference_probability(train, V, bos, order)
    e = [bos] + test
    ref = np.array([p(e[i], tuple(e[max(0, i - order + 1) : i]), order) for i in range(1, len(e))])
    r = model.score(torch.tensor(test), bos)
    assert r["tokens"] == len(test)
    assert r["loss"] == pytest.approx(-np.log(ref).mean(), rel=1e-12)
    assert r["ppl"] == pytest.approx(np.exp(r["loss"]))
    # the full-distribution path gives the same numbers at the targets
    rows = torch.cat(list(model.log_prob_rows(torch.tensor(test), bos, chunk=7)))  # (N, V)
    assert rows.shape == (len(test), V)
    np.testing.assert_allclose(rows[torch.arange(len(test)), test].double().exp().numpy(), ref, rtol=1e-5)


def test_distributions_sum_to_one_for_every_context():
    V, bos, order = 12, 0, 5
    train = random_stream(600, V, 2)
    model = KneserNey.train(np.array(train), V, bos, order)
    rng = random.Random(3)
    contexts = [[], [5], train[:2], train[10:14], train[:30]]  # start of text, short, seen, long
    contexts += [[rng.randrange(V) for _ in range(rng.randrange(1, 8))] for _ in range(40)]
    contexts += [[V - 1] * 4, [V - 1, 3, V - 1]]  # a word never seen in training
    for ctx in contexts:
        lp = model.log_probs(ctx)
        assert lp.shape == (V,) and torch.isfinite(lp).all()
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # <eos>-context convention: an empty context is the start of a text
    torch.testing.assert_close(model.log_probs([]), model.log_probs([bos]))
    rows = torch.cat(list(model.log_prob_rows(torch.tensor(train[:50]), bos, chunk=16))).double()
    torch.testing.assert_close(rows.exp().sum(1), torch.ones(50, dtype=torch.float64), atol=1e-5, rtol=0)


def test_learns_a_deterministic_pattern():
    pattern = [2, 3, 4, 5, 6, 0]  # 0 plays <eos>
    model = KneserNey.train(np.array(pattern * 200), 7, 0, order=3)
    assert model.score(np.array(pattern * 20), 0)["ppl"] < 1.05
    assert model.log_probs([4, 5]).argmax().item() == 6


def test_discounts_follow_count_of_counts():
    counts = np.array([1] * 50 + [2] * 20 + [3] * 10 + [4] * 5 + [9] * 3)
    y = 50 / (50 + 2 * 20)
    np.testing.assert_allclose(discounts(counts), [1 - 2 * y * 20 / 50, 2 - 3 * y * 10 / 20, 3 - 4 * y * 5 / 10])
    for degenerate in ([1, 1, 1],  # no n_2..n_4: the formula gives D(c) = c, nothing kept
                       [1] * 30 + [2] * 9 + [3] * 4 + [4] * 5):  # n_4 > n_3: D(3+) < 0
        np.testing.assert_allclose(discounts(np.array(degenerate)), [0.5, 1.0, 1.5])


def test_every_word_keeps_some_probability_where_count_of_counts_do_not_fall():
    # a small Zipfian stream whose order-3 count-of-counts rise from n_3 to n_4: with the
    # formula's D(3+) clipped to 0, contexts kept all their mass and unseen words got p = 0
    rng = np.random.default_rng(1)
    V = 12
    p = 1 / np.arange(1, V + 1) ** 1.2
    train, test = rng.choice(V, size=400, p=p / p.sum()), rng.choice(V, size=60, p=p / p.sum())
    model = KneserNey.train(train, V, bos_id=0, order=4)
    assert np.isfinite(model.score(test)["ppl"]) and model.score(test)["ppl"] < V
    for i in range(len(test)):
        lp = model.log_probs(list(test[:i]))
        assert bool(torch.isfinite(lp).all()) and float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_ngram(tiny_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("ngram") / "kn3.npz"
    assert main(["ngram", "train", str(tiny_corpus), "--order", "3", "--out", str(path), "--json"]) == 0
    return path


def test_save_load_round_trip(tiny_ngram, tiny_tokenizer):
    model = KneserNey.load(tiny_ngram)
    assert model.order == 3 and model.tokenizer.fingerprint == tiny_tokenizer.fingerprint
    stream = torch.tensor(tiny_tokenizer.encode_typed("the cat sat on the mat .\nthe dog ran to a tree ."))
    again = KneserNey.load(model.save(tiny_ngram.with_name("copy.npz")))
    assert again.score(stream)["loss"] == model.score(stream)["loss"]
    torch.testing.assert_close(again.log_probs(stream[:4]), model.log_probs(stream[:4]))


def test_cli_train_and_eval(tiny_ngram, tiny_corpus, capsys):
    capsys.readouterr()
    assert main(["ngram", "eval", str(tiny_ngram), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    lines = (tiny_corpus / "test.txt").read_text().splitlines()
    assert r["tokens"] == sum(len(line.split()) + 1 for line in lines)  # words + one <eos> per line
    assert 1 < r["ppl"] < 10 and r["order"] == 3 and r["split"] == "test"
    assert main(["ngram", "eval", str(tiny_ngram)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tiny valid: ppl ") and "KN3" in out[0]


def test_train_from_a_checkpoint_shares_its_tokenizer(tiny_run, tmp_path, capsys):
    from lm.checkpoint import load_model

    out = tmp_path / "kn.npz"
    assert main(["ngram", "train", str(tiny_run), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    _, _, tok, _ = load_model(tiny_run / "best.pt")
    model = KneserNey.load(out)
    assert model.tokenizer.fingerprint == tok.fingerprint and model.order == 5
    assert summary["train_tokens"] == model.meta["train_tokens"] > 0


def test_bad_model_files_give_one_line_errors(tiny_ngram, tiny_run, tmp_path, capsys):
    data = tiny_ngram.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.npz").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    np.savez(tmp_path / "foreign.npz", x=np.arange(3))
    for name in ("truncated.npz", "random.npz", "foreign.npz"):
        with pytest.raises(CheckpointError):
            KneserNey.load(tmp_path / name)
    with pytest.raises(CheckpointError, match="is a neural checkpoint, not an n-gram model: score it with lm eval"):
        KneserNey.load(tiny_run / "best.pt")  # an LSTM checkpoint is a zip too
    with np.load(tiny_ngram) as z:  # a well-formed file whose meta lies: no bos_id, order 0, bos_id past V
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    for change in ({"bos_id": None}, {"order": 0}, {"bos_id": meta["vocab_size"]}):
        m = {k: v for k, v in (meta | change).items() if v is not None}
        np.savez(tmp_path / "lying.npz", **(arrays | {"meta": np.frombuffer(json.dumps(m).encode(), np.uint8)}))
        with pytest.raises(CheckpointError):
            KneserNey.load(tmp_path / "lying.npz")
    assert_one_line_error(run_lm("ngram", "eval", tmp_path / "truncated.npz"), code=1, match="corrupt")
    for path in (tmp_path / "missing.npz", tiny_run / "best.pt"):
        assert main(["ngram", "eval", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lm ngram: error: ")
    assert main(["eval", str(tiny_ngram)]) == 1  # and the other way round
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lm eval: error: {tiny_ngram} is an n-gram model, not a neural checkpoint: "
                   f"score it with lm ngram eval {tiny_ngram}"]


def test_eval_finds_the_one_ngram_model_in_a_run_directory(tiny_ngram, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["ngram", "eval", str(run)]) == 1
    assert "not found" in capsys.readouterr().err
    (run / "kn3.npz").write_bytes(tiny_ngram.read_bytes())
    assert main(["ngram", "eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["order"] == 3
    (run / "kn5.npz").write_bytes(tiny_ngram.read_bytes())
    assert main(["ngram", "eval", str(run)]) == 1
    assert "holds 2 n-gram models (kn3.npz, kn5.npz): pass one of them" in capsys.readouterr().err


def test_order_is_checked_on_its_own_before_any_data():
    """`lm ngram train` can check --order before tokenizing a corpus (minutes on a large
    one); KneserNey.train refuses a bad order before it looks at the stream."""
    for order in range(1, 10):
        check_order(order)
    for bad in (0, 10, -1, 2.5, True, "5"):
        with pytest.raises(ConfigError, match=rf"--order must be between 1 and 9, got {bad}$"):
            check_order(bad)
    with pytest.raises(ConfigError, match="--order must be between 1 and 9, got 10"):
        KneserNey.train(None, 0, 0, order=10)  # no stream at all: the order alone decides


def test_ngram_train_checks_the_order_before_it_reads_the_corpus(tmp_path, monkeypatch):
    import lm.cli as cli

    def never(*a, **k):
        raise AssertionError("the corpus was opened before --order was checked")

    monkeypatch.setattr(cli, "_ngram_source", never)
    with pytest.raises(ConfigError, match="--order must be between 1 and 9, got 12"):
        cli.cmd_ngram_train(cli.build_parser().parse_args(["ngram", "train", str(tmp_path), "--order", "12"]))


def test_out_never_replaces_a_checkpoint_or_a_text_file(tiny_run, tiny_corpus, tmp_path):
    """--out RUN/last.pt once replaced the run's resume checkpoint with an n-gram model,
    and --out heldout.txt turned a text into an npz: both are refused, before any
    counting, and the file keeps its bytes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    text = tmp_path / "heldout.txt"
    shutil.copy(tiny_corpus / "valid.txt", text)
    for source, out, kind in ((run, run / "last.pt", "a checkpoint"), (run, run / "best.pt", "a checkpoint"),
                              (tiny_corpus / "train.txt", text, "a text file")):
        before = out.read_bytes()
        proc = run_lm("ngram", "train", source, "--order", "2", "--out", out)
        assert_one_line_error(proc, 2, f"--out {out} already exists and is {kind}, not an n-gram model")
        assert "choose another --out" in proc.stderr
        assert out.read_bytes() == before
    assert run_lm("train", "--resume", run, "--epochs", "4", "--max-steps", "1", "--quiet").returncode == 0


def test_out_replaces_an_earlier_ngram_model(tiny_ngram, tmp_path, capsys):
    out = tmp_path / "kn.npz"
    out.write_bytes(tiny_ngram.read_bytes())
    corpus = KneserNey.load(tiny_ngram).meta["corpus"]
    assert main(["ngram", "train", corpus, "--order", "2", "--out", str(out)]) == 0
    assert KneserNey.load(out).order == 2  # the order-3 model it replaced is gone, as asked
    with pytest.raises(ConfigError, match="is a text file, not an n-gram model"):  # the library refuses too
        text = tmp_path / "notes.txt"
        text.write_text("my notes\n")
        KneserNey.load(out).save(text)
    assert text.read_text() == "my notes\n"
