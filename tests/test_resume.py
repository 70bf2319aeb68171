"""Exact resume: a run killed with SIGKILL and resumed equals a run never interrupted."""
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from lm import checkpoint
from lm.config import TrainConfig
from lm.errors import ConfigError
from lm.train import _after_evaluation, averaged_weights, make_optimizer, resume_config

from conftest import REPO

FLAGS = ["--emb-dim", "16", "--hidden-dim", "24", "--cutoffs", "10,20", "--batch-size", "4", "--bptt", "8",
         "--epochs", "3", "--max-minutes", "0", "--lr", "5", "--save-every", "10", "--log-every", "5",
         "--variable-bptt", "--weight-drop", "0.3", "--dropout-embed", "0.1", "--alpha", "1", "--beta", "1",
         "--optimizer", "ntasgd", "--nonmono", "1", "--threads", "1", "--quiet"]


def lm(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "lm", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def losses(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l) and "tokens_per_s" in json.loads(l)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (dropout masks come from the GPU's generator there)"))])
def test_sigkill_then_resume_is_bit_identical(tiny_corpus, tmp_path, device):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*FLAGS, "--device", device]
    lm("train", "--corpus", tiny_corpus, "--run", a, *flags)
    killed = lm("train", "--corpus", tiny_corpus, "--run", b, *flags, env={"LM_FAIL_AT_STEP": "117"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.load(b / "last.pt")["state"]["step"] == 110  # the last periodic save
    lm("train", "--resume", b / "last.pt", "--quiet")  # a checkpoint in the run stands for its folder
    ca, cb = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    assert ca["state"]["step"] == cb["state"]["step"] > 117
    assert ca["state"]["averaging"] == cb["state"]["averaging"]
    if device == "cpu":
        assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
        assert [(r["step"], r["loss"]) for r in losses(a)] == [(r["step"], r["loss"]) for r in losses(b)]
    else:  # CUDA's atomic adds reorder float sums, so only close; other dropout masks would be far off
        assert all(torch.allclose(ca["model"][k], cb["model"][k], rtol=1e-3, atol=1e-5) for k in ca["model"])
        assert [r["step"] for r in losses(a)] == [r["step"] for r in losses(b)]
        assert [r["loss"] for r in losses(b)] == pytest.approx([r["loss"] for r in losses(a)], rel=1e-3)


def test_resume_refuses_to_change_the_model(tiny_run):
    with pytest.raises(ConfigError, match="--emb-dim cannot change when resuming"):
        resume_config(tiny_run, {"model": {"emb_dim": 99}})
    cfg = resume_config(tiny_run, {"train": {"epochs": 9, "bf16": False}})  # budgets and precision may change
    assert cfg.train.epochs == 9


def test_a_run_that_stopped_early_stays_stopped_on_resume_until_the_rule_is_lifted(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = checkpoint.load(run / "last.pt")
    step = ckpt["state"]["step"]
    ckpt["state"].update(lr=0.001)  # as a plateau decay below --min-lr (0.01) leaves it
    checkpoint.save(ckpt, run / "last.pt")
    stopped = json.loads(lm("train", "--resume", run, "--epochs", "4", "--json", "--quiet").stdout)
    assert stopped["steps"] == step and stopped["stopped"].startswith("nothing trained: the run had stopped")
    assert "lower --min-lr" in stopped["stopped"]
    resumed = json.loads(lm("train", "--resume", run, "--epochs", "4", "--min-lr", "1e-4", "--json", "--quiet").stdout)
    assert resumed["steps"] > step and resumed["epochs"] == 4


def test_resuming_a_run_that_reached_max_steps_takes_no_step_past_it(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    lm("train", "--corpus", tiny_corpus, "--run", run, *FLAGS[:FLAGS.index("--epochs")], "--max-steps", "5", "--quiet")
    for _ in range(2):  # each resume took one more step (6, then 7), each "--max-steps 5 reached"
        again = json.loads(lm("train", "--resume", run, "--json", "--quiet").stdout)
        assert again["steps"] == 5 and "--max-steps 5 is reached: resume with a larger --max-steps" in again["stopped"]
    assert json.loads(lm("train", "--resume", run, "--max-steps", "7", "--json", "--quiet").stdout)["steps"] == 7


def test_the_min_lr_rule_does_not_end_a_run_that_starts_below_it():
    # AdamW's rates sit below the default --min-lr (0.01): its first plateau must not end the run
    tc = TrainConfig(optimizer="adamw", lr=0.003, lr_decay=0.1)
    state = {"best_val_loss": 4.0, "bad_evals": 0, "val_history": [], "averaging": False, "lr": 0.003}
    notes = [_after_evaluation(tc, state, 4.1, improved=False) for _ in range(4)]  # 3e-4, 3e-5, 3e-6, 3e-7
    assert notes[:3] == ["", "", ""] and "below --min-lr 1.5e-06" in notes[3]  # --lr x 0.01 / 20


def test_resume_refuses_the_flags_it_would_ignore(tiny_run, tmp_path, capsys):
    import shutil

    from lm.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "last.pt").read_bytes()
    (tmp_path / "c.toml").write_text("[train]\nepochs = 4\nlr = 1.0\n")
    budget = "give budget changes as flags (--epochs, --max-steps, --max-minutes; also --min-lr"
    for extra, says in ((["--config", tmp_path / "c.toml"], "--config does not apply with --resume: "),
                        (["--recipe", "wt2-cpu"], f"--recipe does not apply with --resume: a resumed run keeps "
                                                  f"the config it was trained with; {budget}"),
                        (["--run", tmp_path / "elsewhere"], f"--run {tmp_path / 'elsewhere'} does not apply with "
                                                            f"--resume: the run is the one --resume names ({run})"),
                        (["--overwrite"], f"--overwrite does not apply with --resume: resuming continues the run in {run}")):
        assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet", *map(str, extra)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert (run / "last.pt").read_bytes() == before and not (tmp_path / "elsewhere").exists()
    from lm.cli import _check_resume_flags, build_parser

    same = build_parser().parse_args(["train", "--resume", str(run / "last.pt"), "--run-dir", f"{run}/."])
    _check_resume_flags(same, run)  # the run's own folder again is no change (as torchrun launches pass it)


def test_resume_without_a_run_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=r"nope does not exist: nothing to resume there\. .* lm train --run "):
        resume_config(tmp_path / "nope", {})
    with pytest.raises(ConfigError, match="holds no last.pt: nothing to resume there"):
        resume_config(tmp_path, {})


def test_ntasgd_starts_averaging_non_monotonically_and_evaluates_averaged_weights():
    tc = TrainConfig(optimizer="ntasgd", nonmono=2)
    state = {"best_val_loss": 5.0, "bad_evals": 0, "val_history": [6.0, 5.0, 4.0], "averaging": False, "lr": 30.0}
    assert _after_evaluation(tc, state, 4.5, improved=False) == ""  # 4.5 < min(6.0): not yet
    assert _after_evaluation(tc, state, 6.5, improved=False) == "average"  # worse than min(6, 5)
    assert state["averaging"] and state["lr"] == 30.0  # NT-ASGD keeps its learning rate
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(tc, model, 0.1, averaging=True)
    assert isinstance(opt, torch.optim.ASGD)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    current = model.weight.detach().clone()
    with averaged_weights(model, opt, on=True):
        assert torch.equal(model.weight, opt.state[model.weight]["ax"])
        assert not torch.equal(model.weight, current)
    assert torch.equal(model.weight, current)


def test_plateau_decay_and_early_stopping():
    tc = TrainConfig(lr_decay=0.5, patience=2)
    state = {"best_val_loss": 4.0, "bad_evals": 0, "val_history": [], "averaging": False, "lr": 20.0}
    assert _after_evaluation(tc, state, 4.1, improved=False) == "" and state["lr"] == 10.0
    assert "patience" in _after_evaluation(tc, state, 4.2, improved=False)


def test_a_hangup_saves_even_though_the_terminal_is_gone(tiny_corpus, tmp_path):
    """SIGHUP (an SSH session dropped) stops the run like SIGTERM. Its terminal is gone, so
    every write to it fails: lm points the terminal's descriptors at /dev/null first."""
    run = tmp_path / "run"
    main_fd, term_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lm", "train", "--corpus", str(tiny_corpus), "--run", str(run),
                             "--emb-dim", "16", "--hidden-dim", "16", "--batch-size", "4", "--epochs", "100000",
                             "--max-minutes", "0", "--save-every", "0", "--log-every", "1", "--threads", "1"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL,
                            stdout=term_fd, stderr=term_fd)
    os.close(term_fd)
    stop = threading.Event()
    drain = threading.Thread(target=_read_until, args=(main_fd, stop), daemon=True)
    drain.start()  # a terminal that nobody reads would block the run's progress bar
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    stop.set()
    drain.join()
    os.close(main_fd)  # the terminal goes away: writes to it now fail with EIO
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 0
    assert checkpoint.load(run / "last.pt")["state"]["step"] >= 1


def _read_until(fd, stop):
    while not stop.is_set():
        if select.select([fd], [], [], 0.1)[0]:
            try:
                os.read(fd, 1 << 16)
            except OSError:
                return


def test_sigterm_saves_and_exits_cleanly_with_a_resume_hint(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lm", "train", "--corpus", str(tiny_corpus), "--run", str(run),
                             "--emb-dim", "16", "--hidden-dim", "16", "--batch-size", "4", "--epochs", "100000",
                             "--max-minutes", "0", "--save-every", "0", "--log-every", "1", "--threads", "1",
                             "--quiet"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"lm train --resume {run}" in out
    assert checkpoint.load(run / "last.pt")["state"]["step"] >= 1


def _run_whose_best_is_behind_its_last(corpus, run):
    """A run whose best.pt holds step 20 and its last.pt step 30 (the validation at 30 was
    worse, as happens)."""
    from conftest import tiny_config
    from lm.train import train

    quiet = {"progress": False, "log": lambda *a: None}
    train(tiny_config(corpus, epochs=1, max_steps=20), run, **quiet)
    best = (run / "best.pt").read_bytes()
    train(tiny_config(corpus, epochs=1, max_steps=30), run, resume=True, **quiet)
    (run / "best.pt").write_bytes(best)
    assert [checkpoint.load(run / n)["state"]["step"] for n in ("best.pt", "last.pt")] == [20, 30]


def test_resume_from_best_pt_continues_from_best_pt(tiny_corpus, tmp_path):
    """--resume RUN/best.pt once resumed from RUN/last.pt without a word."""
    run = tmp_path / "run"
    _run_whose_best_is_behind_its_last(tiny_corpus, run)
    proc = lm("train", "--resume", run / "best.pt", "--max-steps", 25)
    assert f"resuming at step 20 from best.pt (the next save replaces {run / 'last.pt'}; the log drops later " \
           "steps)" in proc.stdout
    assert max(json.loads(l).get("step", 0) for l in (run / "metrics.jsonl").read_text().splitlines()) <= 25
    assert checkpoint.load(run / "last.pt")["state"]["step"] == 25
    assert "--max-steps 25 reached" in proc.stdout
    proc = lm("train", "--resume", run, "--max-steps", 27)  # the folder: its last.pt, as before
    assert "resuming at step 25" in proc.stdout and "from best.pt" not in proc.stdout


def test_a_corrupt_last_pt_names_a_resume_that_works(tiny_corpus, tmp_path):
    """With a corrupt last.pt, --resume RUN/best.pt still loaded last.pt, and the error said
    'use another checkpoint (last.pt / best.pt)', which did not help."""
    run = tmp_path / "run"
    _run_whose_best_is_behind_its_last(tiny_corpus, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    proc = lm("train", "--resume", run, "--max-steps", 40, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    advice = f"resume from the other one with lm train --resume {run / 'best.pt'}, or retrain"
    assert f"{run / 'last.pt'} is truncated or corrupt" in proc.stderr and advice in proc.stderr
    proc = lm("train", "--resume", run / "best.pt", "--max-steps", 22)  # the advice works
    assert "resuming at step 20 from best.pt" in proc.stdout
    assert checkpoint.load(run / "last.pt")["state"]["step"] == 22


def test_resume_refuses_a_corpus_that_changed_and_keeps_the_run(tiny_corpus, tmp_path):
    """Cutting the training text to a third and resuming once went on silently, on new
    text, recording a new "best" on another validation set."""
    text = tmp_path / "notes.txt"  # a single file: valid and test are held out of it
    text.write_bytes((tiny_corpus / "train.txt").read_bytes())
    run = tmp_path / "run"
    lm("train", "--corpus", text, "--run", run, *FLAGS[:FLAGS.index("--epochs")], "--epochs", 1, "--max-steps", 5,
       "--max-minutes", 0, "--threads", 1, "--quiet")
    saved = {n: (run / n).read_bytes() for n in ("best.pt", "last.pt", "metrics.jsonl")}
    assert set(checkpoint.load(run / "last.pt")["data"]) == {"train", "valid"}
    lines = text.read_text().splitlines(keepends=True)
    text.write_text("".join(lines[: len(lines) // 3]))
    proc = lm("train", "--resume", run, "--max-steps", 10, check=False)
    errors = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("lm: warning:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1  # the cut text's valid split also warns
    assert f"the training data changed since {run / 'last.pt'} was saved (its train split had " in proc.stderr
    assert f"Restore the text it was trained on ({text})" in proc.stderr and "--overwrite" in proc.stderr
    assert {n: (run / n).read_bytes() for n in saved} == saved  # nothing saved is lost
    text.write_text("".join(lines))  # the text restored: the run goes on
    lm("train", "--resume", run, "--max-steps", 7)
    assert checkpoint.load(run / "last.pt")["state"]["step"] == 7


def test_a_checkpoint_from_before_data_fingerprints_still_resumes(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = checkpoint.load(run / "last.pt")
    del ckpt["data"]
    checkpoint.save(ckpt, run / "last.pt")
    step = ckpt["state"]["step"]
    lm("train", "--resume", run, "--epochs", 4, "--max-steps", step + 2, "--quiet")
    resumed = checkpoint.load(run / "last.pt")
    assert resumed["state"]["step"] == step + 2 and set(resumed["data"]) == {"train", "valid"}


def test_data_fingerprint_tells_other_tokens_of_the_same_count():
    from lm.train import _data_change, data_fingerprint

    a = data_fingerprint(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6]))
    assert _data_change(a, data_fingerprint(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6]))) == ""
    assert _data_change(a, data_fingerprint(torch.tensor([1, 2, 4, 3]), torch.tensor([5, 6]))) == \
        "its train split has as many tokens as before (4), but other ones"
    assert _data_change(a, data_fingerprint(torch.tensor([1, 2, 3, 4]), torch.tensor([5]))) == \
        "its valid split had 2 tokens, and has 1 now"
