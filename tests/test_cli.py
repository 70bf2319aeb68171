"""The command line: results, JSON shapes, and one-line errors with no traceback."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from lm import checkpoint
from lm.cli import main

from conftest import REPO


def run_lm(*args, stdin: str | None = None):
    """The real command in a subprocess, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "lm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def assert_one_line_error(proc, code=None, match=""):
    assert proc.returncode != 0 if code is None else proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert match in lines[0]


def test_eval_json(tiny_run, tiny_corpus, capsys):
    assert main(["eval", str(tiny_run / "best.pt"), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"ppl", "loss", "tokens", "split"} <= set(r) and r["split"] == "test"
    lines = (tiny_corpus / "test.txt").read_text().splitlines()
    assert r["tokens"] == sum(len(l.split()) + 1 for l in lines)  # words + one <eos> per line
    assert 1 < r["ppl"] < 20


def test_eval_summary_line_and_run_directory(tiny_run, capsys):
    assert main(["eval", str(tiny_run)]) == 0  # a run directory means its best.pt
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tiny valid: ppl ")


def test_complete_json_next_words_and_completions(tiny_run, capsys):
    assert main(["complete", str(tiny_run / "best.pt"), "the cat sat on the", "--k", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # what /complete answers: the kind of list, the prefix, the list
    assert (r["kind"], r["prefix"]) == ("next", "") and len(r["suggestions"]) == 3
    assert all(set(i) == {"word", "prob"} for i in r["suggestions"])
    assert main(["complete", str(tiny_run / "best.pt"), "the cat sat on the m", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["kind"], r["prefix"]) == ("complete", "m") and {i["word"] for i in r["suggestions"]} == {"mat", "man", "my"}


def test_info_describes_a_checkpoint(tiny_run, tmp_path, capsys):
    assert main(["info", str(tiny_run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "valid_ppl" in r]
    best = min(epochs, key=lambda r: r["valid_ppl"])
    assert d["file"] == str(tiny_run / "best.pt") and d["bytes"] == (tiny_run / "best.pt").stat().st_size
    assert (d["layers"], d["emb_dim"], d["tied"], d["head"], d["cutoffs"]) == ([24, 16], 16, True, "adaptive", [10, 20])
    assert d["valid_ppl"] == pytest.approx(best["valid_ppl"]) and d["step"] == best["step"] and d["epoch"] == best["epoch"]
    assert d["resumable"] and d["config"]["model"]["hidden_dim"] == 24
    from lm.checkpoint import load_model

    _, model, tok, _ = load_model(tiny_run / "best.pt")
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) and d["vocab_size"] == tok.vocab_size
    assert main(["info", str(tiny_run / "last.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].startswith(f"{tiny_run / 'last.pt'}: ")
    assert out[1].startswith("model: LSTM 24 + 16, embeddings 16, tied, adaptive head, cutoffs 10,20; ")
    assert out[4].endswith(f"the run has finished, all 3 epochs done: resume with a larger --epochs to train on "
                           f"(lm train --resume {tiny_run})")
    ckpt = checkpoint.load(tiny_run / "last.pt")
    ckpt["state"].update(epoch=3, pos=5)  # as if stopped inside its last epoch
    (tmp_path / "mid").mkdir()
    checkpoint.save(ckpt, tmp_path / "mid" / "last.pt")
    assert main(["info", str(tmp_path / "mid" / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] is None
    assert main(["info", str(tmp_path / "mid" / "last.pt")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"lm train --resume {tmp_path / 'mid'} continues it")
    weights = {k: v for k, v in torch.load(tiny_run / "best.pt", weights_only=True).items() if k not in ("state", "optimizer")}
    torch.save(weights, tmp_path / "weights.pt")
    assert main(["info", str(tmp_path / "weights.pt")]) == 0
    assert capsys.readouterr().out.strip().endswith("no loop state to resume from")
    assert_one_line_error(run_lm("info", "README.md"), 1, "README.md is not a checkpoint file")


def test_generate_same_seed_same_text(tiny_run):
    a = run_lm("generate", tiny_run / "best.pt", "--prompt", "the dog", "--max-words", 20, "--seed", 5)
    b = run_lm("generate", tiny_run / "best.pt", "--prompt", "the dog", "--max-words", 20, "--seed", 5)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("the dog ")
    assert "generated 20 words" in a.stderr and "words/s" in a.stderr


def test_repl_scripted_one_line_per_input_line(tiny_run):
    script = "the cat sat on the\n:k 2\nm\n:context\n:reset\n:k zero\n:bogus\n\n:quit\nnever read\n"
    proc = run_lm("repl", tiny_run / "best.pt", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 9
    assert out[0].startswith("next: ") and len(out[0].split("%")) - 1 == 5
    assert out[1] == "k = 2"
    assert out[2].startswith("m… mat")
    assert out[3] == "context: the cat sat on the m"
    assert out[4] == "context cleared"
    assert out[5].startswith("usage: :k N")
    assert out[6].startswith("unknown command")
    assert out[7].startswith("next: ") and len(out[7].split("%")) - 1 == 2
    assert out[8] == "bye"


@pytest.mark.parametrize("args, code, match", [
    (["train", "--epochs", "abc"], 2, "invalid int value"),
    (["train", "--epochs", "-3"], 2, "--epochs must be between"),
    (["train", "--lr", "nan"], 2, "finite"),
    (["train", "--dropout", "1.5"], 2, "--dropout"),
    (["train", "--head", "magic"], 2, "--head must be one of"),
    (["train", "--corpus", "/no/such/corpus"], 1, "not found"),
    (["train", "--frobnicate"], 2, "unrecognized arguments"),
    (["eval", "/no/such.pt"], 1, "not found"),
    (["eval", "/dev/null"], 1, "/dev/null is not a regular file"),
    (["eval", "tests"], 1, "tests is a directory with no best.pt or last.pt in it"),
    (["complete", "/no/such.pt", "x", "--k", "0"], 2, "--k must be"),
    (["repl", "/no/such.pt", "--k", "101"], 2, "--k must be between 1 and 100"),  # the REPL's own :k bound
    (["generate", "/no/such.pt", "--top-p", "0"], 2, "--top-p"),
    (["train", "--config", "/no/such.toml"], 2, "config file /no/such.toml not found"),
    (["train", "--config", "tests"], 2, "config file tests is a directory: give a TOML file"),
    (["train", "--config", "README.md"], 2, "config file README.md is not valid TOML"),
])
def test_bad_flags_and_missing_files_are_one_line_errors(args, code, match):
    assert_one_line_error(run_lm(*args), code, match)


def test_config_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    from lm.config import load_config_file
    f = tmp_path / "my.toml"
    f.write_bytes(b"\xef\xbb\xbf[model]\nemb_dim = 64\n")  # as Notepad saves UTF-8
    assert load_config_file(f) == {"model": {"emb_dim": 64}}


def test_corrupt_truncated_and_foreign_checkpoints_are_refused(tiny_run, tmp_path):
    good = (tiny_run / "best.pt").read_bytes()
    cases = {"random.pt": (b"\x00" + os.urandom(4095), "not a checkpoint file"),
             "text.pt": (b"hello, I am not a model\n", "not a checkpoint file"),
             "truncated.pt": (good[: len(good) // 2], "truncated or corrupt"), "empty.pt": (b"", "is empty")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        proc = run_lm("eval", tmp_path / name)
        assert_one_line_error(proc, 1, name)
        assert why in proc.stderr
    torch.save({"some": "dict"}, tmp_path / "foreign.pt")
    assert_one_line_error(run_lm("eval", tmp_path / "foreign.pt"), 1, "not an lm checkpoint")
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save(ckpt | {"version": 99}, tmp_path / "newer.pt")
    assert_one_line_error(run_lm("eval", tmp_path / "newer.pt"), 1, "upgrade lm")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run_code(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "lm-checkpoint", "x": _Exploit()}, f)
    proc = run_lm("complete", tmp_path / "evil.pt", "hello")
    assert_one_line_error(proc, 1, "not a safe lm checkpoint")
    assert not (tmp_path / "pwned").exists()


def test_empty_corpus_is_a_one_line_error(tmp_path):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.txt").write_text("")
    assert_one_line_error(run_lm("train", "--corpus", tmp_path, "--run", tmp_path / "run"), 1, "no words")


def test_corpus_smaller_than_one_batch(tmp_path):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.txt").write_text("a b c\n")
    proc = run_lm("train", "--corpus", tmp_path, "--run", tmp_path / "run", "--batch-size", 64)
    assert_one_line_error(proc, 1, "lower --batch-size")


def test_subword_model_reports_per_word_perplexity_and_refuses_autocomplete(tiny_corpus, tmp_path, capsys):
    from lm.train import train

    from conftest import tiny_config

    cfg = tiny_config(tiny_corpus, epochs=1)
    cfg.tokenizer.kind, cfg.tokenizer.vocab_size = "bpe", 320
    train(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert main(["eval", str(tmp_path / "best.pt"), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    lines = (tiny_corpus / "test.txt").read_text().splitlines()
    assert r["words"] == sum(len(l.split()) + 1 for l in lines)
    assert r["tokens"] >= r["words"] and r["word_ppl"] >= r["ppl"]
    assert_one_line_error(run_lm("complete", tmp_path / "best.pt", "the"), 1, "word-level model")


def test_training_into_an_existing_run_is_refused_so_nothing_is_lost(tiny_run, tiny_corpus):
    before = (tiny_run / "best.pt").read_bytes()
    proc = run_lm("train", "--corpus", tiny_corpus, "--run", tiny_run, "--max-steps", 1)
    assert_one_line_error(proc, 2, "already holds a run: continue it with --resume")
    assert (tiny_run / "best.pt").read_bytes() == before


def test_any_garbage_bytes_are_a_checkpoint_error_not_a_crash(tmp_path):
    """Random bytes break torch's unpickler in many ways (IndexError, KeyError, ...);
    every one of them is the one-line 'truncated or corrupt' error, never a traceback.
    Seeded, so the same 300 files every run."""
    import random

    from lm import checkpoint
    from lm.errors import CheckpointError

    rng = random.Random(7)
    for i in range(300):
        path = tmp_path / f"garbage{i}.pt"
        path.write_bytes(rng.randbytes(rng.choice((8, 64, 4096))))
        with pytest.raises(CheckpointError, match="garbage"):
            checkpoint.load(path)


def test_every_command_parses_without_unix_only_modules():
    """Windows has no resource, fcntl or termios: building the command line (which every
    command does, lm --help included) must not import them."""
    code = """
import builtins, sys
real = builtins.__import__
def guard(name, *args, **kwargs):
    if name.split(".")[0] in ("resource", "fcntl", "termios"):
        raise ImportError(f"no module named {name!r} on this platform")
    return real(name, *args, **kwargs)
builtins.__import__ = guard
from lm.cli import build_parser
build_parser().parse_args(["info", "x.pt"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_an_unknown_flag_is_reported_by_its_command():
    for argv, prog in ((["train", "--bogus"], "lm train"), (["ngram", "train", "x", "--bogus", "1"], "lm ngram train")):
        proc = run_lm(*argv)
        assert_one_line_error(proc, 2, f"{prog}: error: unrecognized arguments: {' '.join(argv[argv.index('--bogus'):])} "
                                       f"(see {prog} --help)")


def test_dump_tokens_never_replaces_a_checkpoint_or_a_text(tiny_run, tmp_path):
    """--dump-tokens RUN/last.pt (or any file) once overwrote it with rc 0: now only an
    earlier dump (or an empty file) is replaced; anything else keeps its bytes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    text = tmp_path / "notes.txt"
    text.write_text("my own notes\n")
    for target, kind in ((run / "last.pt", "a checkpoint"), (text, "a text file")):
        before = target.read_bytes()
        proc = run_lm("eval", run, "--dump-tokens", target)
        assert_one_line_error(proc, 2, f"--dump-tokens {target} already exists and is {kind}, not a token dump")
        assert "choose another --dump-tokens" in proc.stderr
        assert target.read_bytes() == before


def test_dump_tokens_replaces_an_earlier_dump_and_writes_atomically(tiny_run, tmp_path, capsys):
    from lm.evaluate import is_token_dump, write_token_dump

    for name in ("t.tsv", "t.jsonl"):
        dump = tmp_path / name
        assert main(["eval", str(tiny_run), "--dump-tokens", str(dump)]) == 0
        first = dump.read_bytes()
        assert is_token_dump(dump)
        assert main(["eval", str(tiny_run), "--dump-tokens", str(dump)]) == 0  # an earlier dump: replaced
        assert dump.read_bytes() == first
        with pytest.raises(IndexError):  # fails after writing a few rows (token 5 has no string)
            write_token_dump(dump, torch.tensor([0, 1, 5]), ["a", "b"], {"logprob": torch.zeros(3)})
        assert dump.read_bytes() == first  # the earlier dump is whole, and no temporary stays behind
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    empty = tmp_path / "empty.tsv"
    empty.touch()  # as mktemp makes one: nothing to lose
    assert main(["eval", str(tiny_run), "--dump-tokens", str(empty)]) == 0 and is_token_dump(empty)


@pytest.mark.parametrize("command", [["complete", "{run}", "the"], ["generate", "{run}"], ["eval", "{run}"],
                                     ["repl", "{run}"], ["serve", "{run}", "--port", "0"], ["train"]])
@pytest.mark.parametrize("threads", ["100000", "-1"])
def test_threads_out_of_range_is_the_same_one_line_error_for_every_command(tiny_run, command, threads):
    """--threads 100000 once segfaulted (rc 139) and 20000 failed in libgomp everywhere but
    lm train; -1 said "must be at least 1" though 0 is allowed. One check, one message."""
    argv = [a.format(run=tiny_run) for a in command] + ["--threads", threads]
    proc = run_lm(*argv, stdin="")
    assert_one_line_error(proc, 2, f"lm {command[0]}: error: --threads must be between 0 and 1024 "
                                   f"(0 = one per available core), got {threads}")


def test_threads_zero_and_the_top_of_the_range_are_accepted(tiny_run, capsys):
    from lm.config import MAX_THREADS, check_threads
    from lm.errors import ConfigError
    from lm.train import set_threads

    threads = torch.get_num_threads()
    try:
        assert main(["complete", str(tiny_run), "the", "--threads", "0", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = run_lm("complete", tiny_run, "the", "--threads", MAX_THREADS)  # its own process: a big thread pool
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ConfigError, match="--threads must be between 0 and 1024"):
        set_threads(MAX_THREADS + 1)  # the library checks too (lm.bench, scripts)
    for bad in (True, 1.5, "2"):
        with pytest.raises(ConfigError):
            check_threads(bad)


def _nan_copy(src, dst):
    """``src`` with every float weight multiplied by NaN, saved (as damage would) to ``dst``."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize("command", [["complete", "{ckpt}", "the"], ["generate", "{ckpt}"], ["eval", "{ckpt}"],
                                     ["repl", "{ckpt}"], ["serve", "{ckpt}", "--port", "0"], ["info", "{ckpt}"]])
def test_a_checkpoint_with_nan_weights_is_one_line_for_every_command(tiny_run, tmp_path, command):
    """NaN weights gave 50-line tracebacks (complete, generate, repl, serve: int8
    quantisation's 'min should be less than or equal to max'), 'ppl nan' with rc 0 (eval),
    and nothing at all (info)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny_run / "last.pt").read_bytes())
    ckpt = _nan_copy(tiny_run / "best.pt", run / "best.pt")
    proc = run_lm(*[a.format(ckpt=ckpt) for a in command], stdin="")
    assert_one_line_error(proc, 1, f"{ckpt} has non-finite weights (NaN/inf, first in ")
    assert proc.stderr.strip().endswith(f"it is damaged; use another checkpoint, e.g. {run / 'last.pt'}, or retrain")
    if command[0] == "info":  # the description still comes, then the error
        assert proc.stdout.startswith(f"{ckpt}: ")


def test_nan_weights_info_json_and_advice_only_that_works(tiny_run, tmp_path, capsys):
    from lm.checkpoint import load_model

    ckpt = _nan_copy(tiny_run / "best.pt", tmp_path / "best.pt")  # no healthy last.pt beside it
    assert main(["info", str(ckpt), "--json"]) == 1
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["finite"] is False and err.strip() == f"lm info: error: {d['damage']}"
    assert d["damage"].endswith("it is damaged; retrain")
    _nan_copy(tiny_run / "last.pt", tmp_path / "last.pt")  # a damaged last.pt is no way out either
    with pytest.raises(checkpoint.CheckpointError, match="it is damaged; retrain$"):
        load_model(ckpt)
    assert main(["info", str(tiny_run), "--json"]) == 0 and json.loads(capsys.readouterr().out)["finite"] is True


def test_resuming_from_a_last_pt_with_nan_weights_is_refused_with_a_way_on(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((tiny_run / "best.pt").read_bytes())
    before = _nan_copy(tiny_run / "last.pt", run / "last.pt").read_bytes()
    proc = run_lm("train", "--resume", run, "--epochs", "4", "--quiet")
    assert_one_line_error(proc, 1, f"{run / 'last.pt'} has non-finite weights (NaN/inf")
    assert proc.stderr.strip().endswith(f"resume from the other one with lm train --resume {run / 'best.pt'}, or retrain")
    assert (run / "last.pt").read_bytes() == before
