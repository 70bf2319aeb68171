import json
import math
import os
import statistics
from pathlib import Path

import pytest
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


def test_oov_rate_counts_unknown_targets():
    m = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=8), V)
    stream = torch.tensor([0, 5, 6, 0, 7, 8, 9, 0, 3, 4])  # three <unk> (id 0) among 10 targets
    assert evaluate(m, stream, bos_id=1, batch_size=3, unk_id=0)["oov_rate"] == 0.3
    assert "oov_rate" not in evaluate(m, stream, bos_id=1)


def test_token_log_probs_are_in_stream_order_for_any_batch_size():
    m = LSTMLM(ModelConfig(emb_dim=8, hidden_dim=12, cutoffs=[5, 20]), V).eval()
    stream = torch.randint(0, V, (103,))
    one = evaluate(m, stream, bos_id=1, batch_size=1, bptt=9, keep_tokens=True)
    lp = one["token_log_probs"]
    assert lp.shape == (103,) and math.isclose(-lp.double().sum().item() / 103, one["loss"], rel_tol=1e-9)
    # 4 lanes of 26: the second predicts token 26 from token 25 alone (an empty state)
    four = evaluate(m, stream, bos_id=1, batch_size=4, bptt=9, keep_tokens=True)["token_log_probs"]
    with torch.no_grad():
        f, _ = m(stream[25].view(1, 1))
        assert math.isclose(four[26].item(), m.log_probs(f)[0, 0, stream[26]].item(), rel_tol=1e-5)
    assert torch.allclose(four[:26], lp[:26], atol=1e-6) and not math.isclose(four[26], lp[26], rel_tol=1e-4)


def test_token_dump_as_tsv_and_json_lines(tmp_path):
    from lm.evaluate import write_token_dump

    stream = torch.tensor([2, 0, 1])
    words = ["<unk>", "<eos>", "the"]
    cols = {"logprob": torch.tensor([-1.5, -2.25, -0.125]), "logprob_cache": torch.tensor([-1.0, -2.0, -0.5])}
    tsv = write_token_dump(tmp_path / "t.tsv", stream, words, cols).read_text().splitlines()
    assert tsv == ["position\ttoken\tlogprob\tlogprob_cache", "0\tthe\t-1.500000\t-1.000000",
                   "1\t<unk>\t-2.250000\t-2.000000", "2\t<eos>\t-0.125000\t-0.500000"]
    rows = [json.loads(line) for line in write_token_dump(tmp_path / "t.jsonl", stream, words, cols).open()]
    assert rows[1] == {"position": 1, "token": "<unk>", "logprob": -2.25, "logprob_cache": -2.0}


def test_cli_eval_with_cache_dynamic_and_dump(tiny_run, tiny_corpus, tmp_path, capsys):
    from lm.cli import main

    dump = tmp_path / "tokens.tsv"
    assert main(["eval", str(tiny_run), "--split", "test", "--batch-size", "1", "--tune-cache",
                 "--cache-window", "50", "--dynamic", "sgd", "--dynamic-lr", "0.1", "--dump-tokens", str(dump)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("tiny test: ppl ") and " oov 0.00% " in lines[0]
    assert [line.split(" ")[0] for line in lines[1:]] == ["cache", "+", "+", "per-token"]
    rows = [line.split("\t") for line in dump.read_text().splitlines()]
    assert rows[0] == ["position", "token", "logprob", "logprob_cache", "logprob_dynamic"]
    words = " ".join(tiny_corpus.joinpath("test.txt").read_text().split("\n")).split(" ")
    assert len(rows) - 1 == sum(len(line.split()) + 1 for line in tiny_corpus.joinpath("test.txt").read_text().splitlines())
    assert rows[1][1] == words[0] and all(float(v) <= 0 for row in rows[1:] for v in row[2:])

    assert main(["eval", str(tiny_run), "--split", "test", "--cache", "--cache-lambda", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cache"]["lambda"] == 0 and r["cache"]["ppl"] == r["cache"]["plain_ppl"]
    assert r["oov_rate"] == 0.0


def test_cli_tune_cache_on_valid_scores_valid_once(tiny_run, monkeypatch, capsys):
    """Tuning on valid and scoring valid share one cache pass, and give what a separate
    ``--cache`` pass with the tuned settings gives."""
    import lm.cache
    from lm.cli import main

    passes = []
    real = lm.cache._stream_scores
    monkeypatch.setattr(lm.cache, "_stream_scores", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert main(["eval", str(tiny_run), "--split", "valid", "--tune-cache", "--cache-window", "50", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert len(passes) == 1 and "scores" not in tuned["cache_tuning"]
    t, c = tuned["cache_tuning"], tuned["cache"]
    assert (c["theta"], c["lambda"], c["window"]) == (t["theta"], t["lambda"], 50)
    assert c["ppl"] == pytest.approx(t["ppl"], rel=1e-9)
    assert main(["eval", str(tiny_run), "--split", "valid", "--cache", "--cache-window", "50", "--cache-theta",
                 str(t["theta"]), "--cache-lambda", str(t["lambda"]), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["cache"]
    assert len(passes) == 2
    assert again["ppl"] == pytest.approx(c["ppl"], rel=1e-9) and again["plain_ppl"] == pytest.approx(c["plain_ppl"], rel=1e-9)


@pytest.mark.parametrize("flags,match", [(["--cache", "--cache-lambda", "2"], "--cache-lambda"),
                                         (["--dynamic", "sgd", "--dynamic-lr", "-1"], "--dynamic-lr"),
                                         (["--dump-tokens", "/no/such/dir/t.tsv"], "--dump-tokens"),
                                         (["--dump-tokens", "/tmp"], "is a directory")])
def test_cli_eval_bad_method_settings_are_usage_errors(tiny_run, flags, match, capsys):
    from lm.cli import main

    assert main(["eval", str(tiny_run), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


ALONE = "has no effect with --autocomplete, which types FILE and reports keyboard metrics only: drop one of them"


@pytest.mark.parametrize("flags,says", [
    (["--autocomplete", "T", "--cache", "--dynamic", "sgd", "--dump-tokens", "D", "--split", "test"], f"--split {ALONE}"),
    (["--autocomplete", "T", "--split", "valid"], f"--split {ALONE}"),  # even the default, typed: it changes nothing
    (["--autocomplete", "T", "--cache"], f"--cache {ALONE}"),
    (["--autocomplete", "T", "--dynamic", "rms"], f"--dynamic {ALONE}"),
    (["--autocomplete", "T", "--dump-tokens", "D"], f"--dump-tokens {ALONE}"),
    (["--autocomplete", "T", "--batch-size", "1"], f"--batch-size {ALONE}"),
    (["--autocomplete", "T", "--corpus", "T"], f"--corpus {ALONE}"),
    (["--k", "7", "--max-words", "3", "--cache-window", "5"], "--k has no effect without --autocomplete FILE"),
    (["--max-words", "3"], "--max-words has no effect without --autocomplete FILE"),
    (["--cache-window", "5"], "--cache-window has no effect without --cache or --tune-cache"),
    (["--cache-lambda", "0"], "--cache-lambda has no effect without --cache or --tune-cache"),  # 0 is a value given
    (["--tune-cache", "--cache-theta", "0.5"], "--cache-theta has no effect with --tune-cache, which chooses it"),
    (["--cache", "--tune-cache", "--cache-lambda", "0.2"], "--cache-lambda has no effect with --tune-cache"),
    (["--dynamic-lr", "0.1"], "--dynamic-lr has no effect without --dynamic sgd or --dynamic rms"),
    (["--dynamic-bptt", "5", "--split", "test"], "--dynamic-bptt has no effect without --dynamic"),
    (["--dynamic", "sgd", "--dynamic-ms-tokens", "500"], "--dynamic-ms-tokens has no effect with --dynamic sgd"),
])
def test_cli_eval_refuses_a_flag_the_other_flags_leave_without_effect(tiny_run, tiny_corpus, tmp_path, flags, says,
                                                                      capsys):
    from lm.cli import main

    files = {"T": str(tiny_corpus / "test.txt"), "D": str(tmp_path / "tokens.tsv")}
    assert main(["eval", str(tiny_run), *[files.get(f, f) for f in flags]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lm eval: error: {says}"), err
    assert not (tmp_path / "tokens.tsv").exists()


def test_cli_ngram_eval_refuses_the_same_unused_flags(tiny_run, tiny_corpus, tmp_path, capsys):
    from lm.cli import main

    kn = tmp_path / "kn.npz"
    assert main(["ngram", "train", str(tiny_run), "--order", "2", "--out", str(kn), "--json"]) == 0
    for flags, says in ((["--k", "2"], "--k has no effect without --autocomplete FILE"),
                        (["--autocomplete", str(tiny_corpus / "test.txt"), "--split", "test"], f"--split {ALONE}")):
        capsys.readouterr()
        assert main(["ngram", "eval", str(kn), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lm ngram: error: {says}"), err


@pytest.mark.parametrize("path,match", [("/no/such/dir/b.json", "no such directory"), ("/tmp", "is a directory")])
def test_bench_json_to_an_unwritable_place_fails_before_measuring(path, match, capsys, monkeypatch):
    import lm.bench
    from lm.cli import main

    monkeypatch.setattr(lm.bench, "run", lambda *a, **k: pytest.fail("measured before checking --json"))
    assert main(["bench", "--json", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_bench_json_replaces_only_an_earlier_bench_result(tmp_path, capsys, monkeypatch):
    import lm.bench
    from lm.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    monkeypatch.setattr(lm.bench, "run", lambda *a, **k: pytest.fail("measured before checking --json"))
    assert main(["bench", "--json", str(notes)]) == 2
    assert "is a text file, not an earlier lm bench result" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"  # left as it was
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"machine": {"cpu": "x"}, "cache": {}}))
    monkeypatch.setattr(lm.bench, "run", lambda *a, **k: {"machine": {"cpu": "y"}})
    assert main(["bench", "--only", "cache", "--json", str(earlier)]) == 0
    assert json.loads(earlier.read_text())["machine"] == {"cpu": "y"}  # an earlier result is replaced


def test_bench_times_both_heads_side_by_side_on_the_same_data(tiny_corpus):
    from lm.bench import bench_train_heads
    from lm.train import native_bf16

    r = bench_train_heads(str(tiny_corpus), emb=16, hidden=16, batch=4, bptt=8, round_s=0, rounds=2, warmup_s=0,
                          model={"emb_dim": 16, "hidden_dim": 16, "cutoffs": [10, 20]}, examples=True)
    assert r["full_tokens_per_s"] > 0 and r["adaptive_tokens_per_s"] > 0 and r["examples_tokens_per_s"] > 0
    fastest = r.get("adaptive_bf16_tokens_per_s", r["adaptive_tokens_per_s"])
    assert math.isclose(r["speedup_vs_examples"], fastest / r["examples_tokens_per_s"], rel_tol=0.02, abs_tol=0.006)
    assert math.isclose(r["speedup"], r["adaptive_tokens_per_s"] / r["full_tokens_per_s"], rel_tol=0.02, abs_tol=0.006)
    assert ("speedup_bf16" in r) == native_bf16(torch.device("cpu")) == ("full_bf16_tokens_per_s" in r)
    if "speedup_bf16" in r:  # the head's gain at equal precision, beside its gain over the fp32 full softmax
        assert math.isclose(r["speedup_same_precision"], r["adaptive_bf16_tokens_per_s"] / r["full_bf16_tokens_per_s"],
                            rel_tol=0.02, abs_tol=0.006)
        assert math.isclose(r["speedup_bf16"], r["adaptive_bf16_tokens_per_s"] / r["full_tokens_per_s"], rel_tol=0.02, abs_tol=0.006)
    # (the ratios are rounded to 2 decimals: a tiny model's can be 0.2, where that is 2.5%)
    rounds = r["round_tokens_per_s"]  # each variant's rate is the median of its rounds
    assert all(len(v) == 2 for v in rounds.values())
    assert abs(r["full_tokens_per_s"] - statistics.median(rounds["full"])) <= 1
    assert len(r["round_core_gflops"]) == 2 and all(g > 0 for g in r["round_core_gflops"])
    fastest = rounds.get("adaptive_bf16", rounds["adaptive"])  # each round's ratio, from that round's rates
    assert len(r["round_speedups"]) == 2
    assert all(math.isclose(s, a / f, rel_tol=0.01, abs_tol=0.006) for s, a, f in zip(r["round_speedups"], fastest, rounds["full"]))


def test_core_gflops_counts_the_products_it_times(monkeypatch):
    import lm.bench as B

    clock = iter(range(100))  # every perf_counter call: one more second
    monkeypatch.setattr(B.time, "perf_counter", lambda: float(next(clock)))
    # starts at 0 s; a product after the checks at 1 and 2 s; at 3 s the time is up, but
    # it makes at least three; at 4 s it stops: 3 products in 4 s
    assert B.core_gflops(seconds=2.5) == 3 * 2 * 128**3 / 4 / 1e9


def test_machine_info_names_the_cpu_and_the_threads():
    from lm.bench import machine_info

    m = machine_info()
    assert m["cores"] == os.cpu_count() and m["threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__ and m["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        name = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert m["cpu"].startswith(name.split(":", 1)[1].strip())


def test_bench_table_names_the_machine_and_each_rounds_ratio_range(monkeypatch):
    import lm.bench as B

    fake = {"arch": "2x8 tied", "full_tokens_per_s": 100, "adaptive_tokens_per_s": 500, "speedup": 5.0,
            "adaptive_bf16_tokens_per_s": 800, "speedup_bf16": 8.0, "round_speedups": [7.5, 8.25, 8.5],
            "full_bf16_tokens_per_s": 250, "speedup_same_precision": 3.2,
            "round_core_gflops": [120, 150, 180]}
    monkeypatch.setattr(B, "bench_train_heads", lambda **kw: fake)
    lines: list[str] = []
    results = B.run(only=["train"], log=lines.append)
    table = lines[-1].splitlines()
    assert results["machine"]["cores"] == os.cpu_count() and table[2].startswith("| machine |")
    bf16_rows = [row for row in table if ", bf16 |" in row]
    assert len(bf16_rows) == 2 and all("rounds 7.50-8.50x, core speed 120-180 GFLOP/s" in row for row in bf16_rows)
    same = [row for row in table if "both under bf16" in row]  # the head's own gain, and bf16's alone
    assert len(same) == 2 and all("full + bf16 250 / adaptive + bf16 800 = 3.20x" in row and "2.50x" in row
                                  for row in same)


def test_host_summary_groups_samples_by_the_two_thread_probe():
    from lm.bench import host_summary

    def sample(probe, step, cores):
        return {"two_thread_gflops": probe, "one_core_gflops": cores, "memory_gb_per_s": 30.0, "step_ms": step}

    samples = [sample(170, 24.0, [100, 102]), sample(180, 23.0, [98, 104]), sample(140, 29.0, [97, 101]),
               sample(163, 25.0, [99, 100]), sample(130, 30.0, [95, 99])]
    s = host_summary(samples)  # fast: within 10% of the best probe (180), so from 162 up
    assert s["fast"]["samples"] == 3 and s["slow"]["samples"] == 2
    assert s["fast"]["step_ms"] == 24.0 and s["slow"]["step_ms"] == 29.5
    assert s["fast"]["one_core_gflops"] == [99, 102] and s["slow"]["one_core_gflops"] == [96, 100]
    assert list(host_summary(samples[:2])) == ["fast"]  # one state seen: no empty group


def test_bench_host_times_the_step_in_phases_beside_the_probes(tiny_corpus):
    from lm.bench import bench_host

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as in the bench's own child process, where it runs
    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    r = bench_host(str(tiny_corpus), seconds=0, sample_s=0.05, emb=16, hidden=16, batch=4, bptt=8,
                   model={"emb_dim": 16, "hidden_dim": 16, "cutoffs": [10, 20]})
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == affinity  # the probes put both back
    (sample,) = r["samples"]
    assert len(sample["one_core_gflops"]) == min(len(affinity), 8) and all(g > 0 for g in sample["one_core_gflops"])
    assert sample["two_thread_gflops"] > 0 and sample["memory_gb_per_s"] > 0
    phases = [sample[k] for k in ("lstm_forward_ms", "head_forward_ms", "backward_ms", "update_ms")]
    assert all(p > 0 for p in phases) and max(phases) <= sample["step_ms"]
    assert r["states"]["fast"]["samples"] == 1


def test_bench_host_runs_only_when_named_and_fills_a_row_per_state(monkeypatch):
    import lm.bench as B

    state = {"samples": 2, "two_thread_gflops": 170, "one_core_gflops": [100, 101], "memory_gb_per_s": 33.0,
             "step_ms": 24.0, "lstm_forward_ms": 3.1, "head_forward_ms": 4.2, "backward_ms": 9.5, "update_ms": 6.4}
    calls = []
    monkeypatch.setattr(B, "_child", lambda fn, *a: calls.append(fn) or {"arch": "2x200", "samples": [],
                                                                          "states": {"fast": state, "slow": state}})
    for name in B.BENCHES:  # a plain lm bench does not run it
        monkeypatch.setattr(B, {"train": "bench_train_heads", "profile": "bench_step_profile", "inference": "bench_inference",
                                "autocomplete": "bench_autocomplete", "cache": "bench_cache", "ops": "bench_ops"}[name],
                            lambda *a, **k: pytest.fail("ran a benchmark that was not asked for"))
    lines: list[str] = []
    results = B.run(only=["host"], log=lines.append)
    assert calls == ["_host"] and set(results) == {"machine", "host"}
    rows = [row for row in lines[-1].splitlines() if row.startswith("| host state")]
    assert len(rows) == 2 and "each core 100/101 GFLOP/s" in rows[0] and "step 24.0 ms" in rows[1]
    assert "host" not in B.BENCHES


def test_bench_ops_ranks_every_operator_of_the_real_step_by_self_time(tiny_corpus):
    from lm.bench import _child, bench_ops

    model = {"emb_dim": 16, "hidden_dim": 16, "cutoffs": [10, 20]}
    r = bench_ops(str(tiny_corpus), batch=4, bptt=8, steps=3, warmup_s=0, top=10_000, model=model)
    ops = r["ops"]
    assert [o["share"] for o in ops] == sorted((o["share"] for o in ops), reverse=True)
    assert r["other_share"] == 0 and sum(o["share"] for o in ops) == pytest.approx(1, abs=0.02)
    assert sum(o["self_ms_per_step"] for o in ops) == pytest.approx(r["profiled_step_ms"], rel=0.02)
    names = {o["op"] for o in ops}
    assert any("lstm" in n or "rnn" in n for n in names)  # the step it profiles runs the LSTM kernel,
    assert any("Optimizer.step" in n for n in names)  # and the optimiser's step
    assert r["events_per_step"] >= sum(o["calls_per_step"] for o in ops) - 1 and r["step_ms"] > 0
    # as lm bench runs it: in a process of its own, the result as JSON on stdout
    top = _child("_ops", json.dumps({"base": str(tiny_corpus), "batch": 4, "bptt": 8, "steps": 3, "warmup_s": 0,
                                     "top": 3, "model": model}))
    assert len(top["ops"]) == 3 and top["other_share"] > 0
    assert sum(o["share"] for o in top["ops"]) + top["other_share"] == pytest.approx(1, abs=0.01)


def test_bench_ops_fills_a_row_per_model_with_the_operators_shares(monkeypatch):
    import lm.bench as B

    def fake(**kw):
        return {"arch": f"2x{kw.get('hidden', 256)}", "step_ms": 20.5, "events_per_step": 1800, "other_share": 0.2,
                "ops": [{"op": "aten::mm", "share": 0.5, "self_ms_per_step": 10.0, "calls_per_step": 40.0},
                        {"op": "Optimizer.step#SGD.step", "share": 0.3, "self_ms_per_step": 6.0, "calls_per_step": 1.0}]}

    monkeypatch.setattr(B, "_child", lambda fn, kwargs: fake(**json.loads(kwargs)) if fn == "_ops" else pytest.fail(fn))
    lines: list[str] = []
    results = B.run(only=["ops"], log=lines.append)
    assert [r["arch"] for r in results["ops"]] == ["2x256", "2x200"]  # the default model, then the 2x200
    rows = [row for row in lines[-1].splitlines() if row.startswith("| train step by operator")]
    assert len(rows) == 2 and "20.5 ms: mm 50%, Optimizer.step#SGD.step 30%, other 20%" in rows[0]
    assert "1,800 operator calls per step" in rows[1]


def test_step_profile_shares_cover_the_step(tiny_corpus):
    from lm.bench import bench_step_profile

    r = bench_step_profile(str(tiny_corpus), emb=16, hidden=16, batch=4, bptt=8, steps=3)
    assert r["step_ms"] > 0 and set(r["share"]) == {"data", "lstm", "head", "optimizer"}
    # data + forward/backward + optimizer is the step; lstm + head split forward/backward
    # (the LSTM is timed in a pass of its own, so on a tiny model noise may tip it over)
    assert all(v >= 0 for v in r["share"].values()) and sum(r["share"].values()) >= 0.99
    assert r["share"]["data"] + r["share"]["optimizer"] < 1


def test_a_failing_bench_child_raises_the_childs_own_lm_error_again(tmp_path):
    from lm.bench import _child
    from lm.corpus import open_corpus
    from lm.errors import DataError

    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError) as expected:
        open_corpus(missing)
    with pytest.raises(DataError) as e:  # the same class and the same one-line message, from the child process
        _child("_ops", json.dumps({"base": missing}))
    assert str(e.value) == str(expected.value) and "\n" not in str(e.value)


def test_cli_eval_scores_a_held_out_file_given_to_corpus_whole_and_says_what_it_scored(tiny_run, tmp_path, capsys):
    """`lm eval RUN --corpus held.txt` scored only the 5% valid slice of the file (690 of
    15,682 tokens) and did not say so: a file, glob or folder without train.txt given to
    --corpus is scored whole; --split picks a slice, and the summary names either."""
    from conftest import sentences
    from lm.cli import main

    lines = sentences(300, 7)
    held = tmp_path / "held.txt"
    held.write_text("\n".join(lines) + "\n")
    whole = sum(len(line.split()) + 1 for line in lines)
    assert main(["eval", str(tiny_run), "--corpus", str(held), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["tokens"], r["split"], r["scored"]) == (whole, "all", f"{held} (whole file)")
    assert main(["eval", str(tiny_run), "--corpus", str(held)]) == 0
    assert capsys.readouterr().out.startswith(f"{held} (whole file): ppl ")
    assert main(["eval", str(tiny_run), "--corpus", str(held), "--split", "valid", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == sum(len(line.split()) + 1 for line in lines[270:285])
    assert r["scored"] == f"{held} valid split (the 5% before the last 5% of its lines)"
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    (only_test / "test.txt").write_text("\n".join(lines) + "\n")
    assert main(["eval", str(tiny_run), "--corpus", str(only_test), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["tokens"], r["scored"]) == (whole, f"{only_test} (whole text)")
    for flags, hint in ((["--tune-cache"], "--tune-cache chooses its settings on the valid split"),
                        (["--dynamic", "rms"], "--dynamic rms takes gradient statistics from the train split")):
        assert main(["eval", str(tiny_run), "--corpus", str(held), *flags]) == 2  # they would see scored text
        assert hint in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--corpus", str(held), "--split", "test", "--tune-cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "test"


def test_cli_eval_on_the_runs_own_split_corpus_is_unchanged_and_refuses_split_all(tiny_run, tiny_corpus, capsys):
    from lm.cli import main

    assert main(["eval", str(tiny_run), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["split"], r["scored"]) == ("test", f"tiny test ({tiny_corpus / 'test.txt'})")
    assert main(["eval", str(tiny_run), "--split", "all"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lm eval: error: --split all scores the whole text of a file, glob or folder without split files; "
        f"{tiny_corpus} has train/valid/test of its own: choose --split train, valid or test")


def test_cli_eval_of_a_run_trained_on_a_plain_file_scores_its_valid_slice_and_names_it(tmp_path, capsys):
    from conftest import sentences, tiny_config
    from lm.cli import main
    from lm.train import train

    notes = tmp_path / "notes.txt"
    lines = sentences(400, 3)
    notes.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    cfg = tiny_config(notes, epochs=1)
    cfg.train.max_steps = 3
    train(cfg, run, progress=False, log=lambda *a: None)
    for extra in ([], ["--corpus", str(notes)]):  # its own text: never scored whole by default
        assert main(["eval", str(run)] + extra) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{notes} valid split (the 5% before the last 5% of its lines): ppl "), out
        assert f" tokens {sum(len(line.split()) + 1 for line in lines[360:380]):,} " in out
