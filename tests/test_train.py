import json
import os
import subprocess
import sys

import pytest
import torch

from lm import checkpoint
from lm.config import ModelConfig
from lm.train import native_bf16, train

from conftest import REPO, tiny_config


def test_tiny_model_learns_a_deterministic_sequence(tmp_path):
    """A cycle of 7 words is fully predictable after one word: perplexity -> 1."""
    words = "alpha beta gamma delta epsilon zeta eta".split()
    line = " ".join(words * 6)
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join([line] * (40 if split == "train" else 4)) + "\n")
    cfg = tiny_config(tmp_path, epochs=6, lr=2.0)
    cfg.model = ModelConfig(emb_dim=24, hidden_dim=24, n_layers=1, dropout=0.0, head="full")
    summary = train(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert summary["best_valid_ppl"] < 1.15


def test_run_writes_best_last_and_metrics(tiny_run):
    assert (tiny_run / "best.pt").is_file() and (tiny_run / "last.pt").is_file()
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "valid_ppl" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["valid_ppl"] < epochs[0]["valid_ppl"]  # it learns
    assert records[-1]["summary"]["epochs"] == 3
    best = checkpoint.load(tiny_run / "best.pt")
    assert best["metrics"]["valid_ppl"] == min(r["valid_ppl"] for r in epochs)


def test_checkpoint_round_trip_gives_identical_logits(tiny_run, tmp_path):
    cfg, model, tok, ckpt = checkpoint.load_model(tiny_run / "last.pt")
    x = torch.tensor([tok.encode_line("the cat sat on the mat .")])
    before, _ = model(x)
    again = checkpoint.restore(checkpoint.load(checkpoint.save(ckpt, tmp_path / "copy.pt")))[1]
    after, _ = again(x)
    assert torch.equal(model.log_probs(before), again.log_probs(after))
    assert ckpt["state"]["step"] > 0 and "optimizer" in ckpt and ckpt["format"] == "lm-checkpoint"


def test_max_steps_budget_stops_mid_epoch(tiny_corpus, tmp_path):
    summary = train(tiny_config(tiny_corpus, epochs=50, max_steps=7), tmp_path, progress=False,
                    log=lambda *a: None)
    state = checkpoint.load(tmp_path / "last.pt")["state"]
    assert summary["steps"] == 7 and 0 < summary["epochs"] == round(state["pos"] / state["columns"], 2) < 1
    assert "max-steps" in summary["stopped"]


def test_summary_counts_the_epochs_trained_also_when_a_stop_falls_on_an_epoch_end(tiny_corpus, tmp_path):
    # a --max-steps budget that runs out exactly at the end of epoch 1: one epoch, not two
    steps = checkpoint.load(_one_epoch_run(tiny_corpus, tmp_path / "one") / "last.pt")["state"]["step"]
    summary = train(tiny_config(tiny_corpus, epochs=5, max_steps=steps), tmp_path / "b", progress=False,
                    log=lambda *a: None)
    assert summary["steps"] == steps and summary["epochs"] == 1


def _one_epoch_run(corpus, run):
    train(tiny_config(corpus, epochs=1), run, progress=False, log=lambda *a: None)
    return run


def test_overwrite_takes_the_old_runs_checkpoints_away_with_its_log(tiny_corpus, tmp_path):
    run = _one_epoch_run(tiny_corpus, tmp_path / "run")
    assert (run / "best.pt").exists()
    # the new run stops before its first evaluation: the old best.pt must not pass for its result
    env = dict(os.environ, PYTHONPATH=str(REPO), LM_STOP_AT_STEP="2")
    proc = subprocess.run([sys.executable, "-m", "lm", "train", "--corpus", str(tiny_corpus), "--run", str(run),
                           "--overwrite", "--emb-dim", "8", "--hidden-dim", "8", "--cutoffs", "10,20",
                           "--batch-size", "4", "--bptt", "8", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (run / "best.pt").exists()
    assert checkpoint.load(run / "last.pt")["config"]["model"]["hidden_dim"] == 8


def test_a_model_too_large_for_memory_is_a_one_line_error(tiny_corpus, tmp_path):
    import resource

    def limit():  # 4 GB of address space, and a model of 4 x 60,000 x 60,016 floats (58 GB)
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run([sys.executable, "-m", "lm", "train", "--corpus", str(tiny_corpus), "--run",
                           str(tmp_path / "big"), "--emb-dim", "16", "--hidden-dim", "60000", "--cutoffs", "10,20",
                           "--batch-size", "4", "--bptt", "8", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=120, preexec_fn=limit)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "out of memory" in proc.stderr and "--hidden-dim" in proc.stderr


def test_training_from_local_text_and_its_token_cache_never_imports_datasets(tiny_corpus, tmp_path):
    # A GPU machine without a package registry may lack `datasets`: local corpora must not
    # need it. A fresh interpreter where `import datasets` fails runs the real `lm train`
    # twice: the first run builds the token cache, the second trains from it.
    script = ("import sys; sys.modules['datasets'] = None; from lm.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    for run in ("first", "again"):
        proc = subprocess.run([sys.executable, "-c", script, "train", "--corpus", str(tiny_corpus), "--run",
                               str(tmp_path / run), "--emb-dim", "16", "--hidden-dim", "16", "--cutoffs", "10,20",
                               "--batch-size", "4", "--bptt", "8", "--max-steps", "3", "--quiet", "--json"],
                              capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3


def test_same_seed_same_weights(tiny_corpus, tmp_path):
    a = train(tiny_config(tiny_corpus, epochs=1, max_steps=5), tmp_path / "a", progress=False, log=lambda *a: None)
    b = train(tiny_config(tiny_corpus, epochs=1, max_steps=5), tmp_path / "b", progress=False, log=lambda *a: None)
    wa = checkpoint.load(tmp_path / "a" / "last.pt")["model"]
    wb = checkpoint.load(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["best_valid_ppl"] == b["best_valid_ppl"]


def test_bf16_autocast_is_used_where_the_cpu_has_bf16_and_trains_like_fp32(tiny_corpus, tmp_path):
    """On a CPU with native bf16 the forward pass runs in bf16 (different rounding, the
    same learning); elsewhere --bf16 changes nothing, since emulated bf16 is slower."""
    runs = {}
    for bf16 in (False, True):
        lines = []
        summary = train(tiny_config(tiny_corpus, epochs=1, max_steps=30, bf16=bf16), tmp_path / str(bf16),
                        progress=False, log=lines.append)
        runs[bf16] = (summary, checkpoint.load(tmp_path / str(bf16) / "last.pt")["model"], lines[0])
    (fp32, w32, start32), (half, w16, start16) = runs[False], runs[True]
    assert "bf16" not in start32
    assert all(w.dtype == torch.float32 for w in w16.values())  # master weights stay fp32
    if native_bf16(torch.device("cpu")):
        assert "bf16 autocast" in start16
        assert any(not torch.equal(w32[k], w16[k]) for k in w32)
        assert abs(half["best_valid_ppl"] / fp32["best_valid_ppl"] - 1) < 0.05
    else:
        assert "bf16" not in start16 and all(torch.equal(w32[k], w16[k]) for k in w32)


def test_learning_rate_anneals_over_the_end_of_whichever_budget_ends_first():
    from lm.config import TrainConfig
    from lm.train import anneal_factor, budget_used

    tc = TrainConfig(epochs=4, max_steps=1000, max_minutes=10)
    assert budget_used(tc, 1.0, 100, 60) == 0.25  # epochs lead
    assert budget_used(tc, 1.0, 500, 60) == 0.5  # steps lead
    assert budget_used(tc, 1.0, 100, 540) == 0.9  # time leads
    assert budget_used(tc, 9.0, 100, 60) == 1.0
    assert anneal_factor(0.3, 0.5) == 1.0 and abs(anneal_factor(0.3, 0.85) - 0.5) < 1e-12
    assert anneal_factor(0.3, 1.0) == 0.0 and anneal_factor(0.0, 0.99) == 1.0


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tiny_run, tmp_path):
    import pytest

    from lm.errors import CheckpointError

    good = checkpoint.load(tiny_run / "best.pt")
    path = checkpoint.save(good, tmp_path / "best.pt")
    before = path.read_bytes()
    bad = dict(good, model={k: v.clone() for k, v in good["model"].items()})
    bad["model"]["embedding.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        checkpoint.save(bad, path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))


def _clip_case(weight_decay=0.0, scale=1.0, optimizer=torch.optim.SGD, **opt_args):
    """Two identical little models with the same gradients (times ``scale``): one to step
    with clipped_step, one with clip_grad_norm_ then the optimiser's own step."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(11, 7)
    for net in nets:
        (net(x).pow(2).sum() * scale).backward()
    opts = [optimizer(net.parameters(), lr=0.7, weight_decay=weight_decay, **opt_args) for net in nets]
    return nets, opts


def test_clipped_step_is_clip_grad_norm_then_step():
    from lm.train import clipped_step

    for scale in (10.0, 1e-4):  # the norm far above the clip, and below it
        for optimizer, wd, args in ((torch.optim.SGD, 0.0, {}), (torch.optim.SGD, 0.1, {}),
                                    (torch.optim.AdamW, 0.0, {}), (torch.optim.ASGD, 0.0, {"t0": 0, "lambd": 0.0})):
            (folded, plain), (opt_f, opt_p) = _clip_case(wd, scale, optimizer, **args)
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
            assert (norm > 0.25) == (scale > 1)
            clipped_step(opt_f, list(folded.parameters()), 0.25)
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.25)
            opt_p.step()
            for a, b in zip(folded.parameters(), plain.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert opt_f.param_groups[0]["lr"] == 0.7  # the folded scale does not stay in the group


@pytest.mark.parametrize("averaging", [False, True])
def test_the_learning_rate_set_is_the_one_the_step_applies(averaging):
    """NT-ASGD's averaging phase runs torch's ASGD, which steps with the rate stored after
    its previous step: set_lr must reach that too, or each step takes the rate before."""
    from lm.config import TrainConfig
    from lm.train import clipped_step, make_optimizer, set_lr

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = make_optimizer(TrainConfig(optimizer="ntasgd", clip=0.0), model, lr=20.0, averaging=averaging)
    applied = []
    for lr in (10.0, 5.0, 1.0, 0.0):
        set_lr(opt, lr)
        model.weight.grad = torch.ones_like(model.weight)  # gradient 1: the step is -lr
        before = model.weight.item()
        clipped_step(opt, list(model.parameters()), 0.0)
        applied.append(before - model.weight.item())
    assert applied == pytest.approx([10.0, 5.0, 1.0, 0.0])


def test_clipped_step_without_clip_is_the_plain_step_and_keeps_non_finite_gradients_visible():
    from lm.train import clipped_step

    (a, b), (opt_a, opt_b) = _clip_case()
    clipped_step(opt_a, list(a.parameters()), 0.0)
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    (a, _), (opt_a, _) = _clip_case()
    next(a.parameters()).grad[0, 0] = float("inf")
    clipped_step(opt_a, list(a.parameters()), 0.25)
    assert not all(torch.isfinite(p).all() for p in a.parameters())  # the trainer's finiteness check sees it


def _tied_case(deferred: bool, autocast: bool, optimizer=torch.optim.SGD, backwards: int = 1, scale: float = 1.0):
    """A small tied adaptive model after ``backwards`` backward passes (same dropout masks
    either way), with its shared gradient collected as factors or written into .grad."""
    from lm.config import ModelConfig
    from lm.model import LSTMLM

    torch.manual_seed(0)
    net = LSTMLM(ModelConfig(emb_dim=24, hidden_dim=32, head="adaptive", cutoffs=[30, 120, 400]), 900)
    tied = net.defer_tied_gradient(deferred)
    words = torch.randint(0, 900, (6, 9))
    words[0, :4] = torch.tensor([850, 850, 5, 200])  # looked-up rows in the shortlist and in clusters, repeated
    targets = torch.randint(0, 900, (6, 9))
    targets[1, :3] = torch.tensor([850, 200, 5])  # the same words in the head's blocks
    opt = optimizer(net.parameters(), lr=0.5)
    for i in range(backwards):
        torch.manual_seed(1 + i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features, _ = net(words)
            loss = net.nll(features, targets).float().mean() * scale
        loss.backward()
    return net, opt, tied


def test_deferred_tied_gradient_gives_the_same_step_as_the_written_out_gradient():
    from lm.model import TiedGradient
    from lm.train import clipped_step

    for autocast in (False, True):
        for clip, scale, backwards in ((0.25, 1.0, 1), (0.25, 1e-4, 1), (0.0, 1.0, 1), (0.25, 1.0, 2)):
            plain, opt_p, none = _tied_case(False, autocast, backwards=backwards, scale=scale)
            fact, opt_f, tied = _tied_case(True, autocast, backwards=backwards, scale=scale)
            assert none is None and isinstance(tied, TiedGradient) and tied.pending()
            assert fact.embedding.weight.grad is None  # nothing written out
            # the factors' norm is the written-out gradient's norm
            dense = plain.embedding.weight.grad
            torch.testing.assert_close(tied.norm_sq().sqrt(), dense.norm(), rtol=1e-4, atol=0)
            clipped_step(opt_p, list(plain.parameters()), clip)
            clipped_step(opt_f, list(fact.parameters()), clip, tied)
            assert not tied.pending() and fact.embedding.weight.grad is None
            tol = dict(rtol=0, atol=1e-6) if not autocast else dict(rtol=0, atol=2e-4 * 0.5 * 0.25)
            for (name, a), b in zip(plain.named_parameters(), fact.parameters()):
                torch.testing.assert_close(a, b, **tol, msg=f"{name} (autocast {autocast}, clip {clip}, scale {scale})")


def test_deferred_tied_gradient_keeps_the_bf16_copy_that_forward_uses():
    """Under autocast the update rewrites the weight's bf16 copy as it goes; the next
    forward pass uses it while the weight is unchanged, and casts afresh after any
    other change. Several steps give the same weights as the written-out path."""
    from lm.config import ModelConfig
    from lm.model import LSTMLM
    from lm.train import clipped_step

    def run(deferred: bool, steps: int = 4):
        torch.manual_seed(0)
        net = LSTMLM(ModelConfig(emb_dim=24, hidden_dim=32, head="adaptive", cutoffs=[30, 120, 400]), 900)
        tied = net.defer_tied_gradient(deferred)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        for i in range(steps):
            torch.manual_seed(10 + i)
            words, targets = torch.randint(0, 900, (6, 9)), torch.randint(0, 900, (6, 9))
            targets[0, :2] = torch.tensor([899, 150])  # the last block and a middle one always have tokens
            if tied is not None:
                tied.clear()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                features, _ = net(words)
                loss = net.nll(features, targets).float().mean()
            loss.backward()
            clipped_step(opt, list(net.parameters()), 0.25, tied)
        return net, tied

    plain, _ = run(False)
    fact, tied = run(True)
    weight = fact.embedding.weight
    copy = tied.cast(torch.bfloat16)
    assert copy is tied._copy and torch.equal(copy, weight.to(torch.bfloat16))  # kept, and current
    assert tied.cast(torch.float32) is weight
    for (name, a), b in zip(plain.named_parameters(), fact.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
    with torch.no_grad():
        weight.mul_(2)  # any other change to the weight (a checkpoint load, a rollback)
    fresh = tied.cast(torch.bfloat16)
    assert fresh is not tied._copy and torch.equal(fresh, weight.to(torch.bfloat16))
    fact.load_state_dict(plain.state_dict())
    assert torch.equal(tied.cast(torch.bfloat16), plain.embedding.weight.to(torch.bfloat16))


def test_deferred_tied_gradient_is_written_out_for_other_optimisers():
    from lm.train import clipped_step

    for optimizer in (torch.optim.AdamW, torch.optim.ASGD):
        plain, opt_p, _ = _tied_case(False, False, optimizer)
        fact, opt_f, tied = _tied_case(True, False, optimizer)
        clipped_step(opt_f, list(fact.parameters()), 0.25, tied)  # writes .grad, clips, steps
        clipped_step(opt_p, list(plain.parameters()), 0.25)
        torch.testing.assert_close(fact.embedding.weight.grad, plain.embedding.weight.grad, rtol=1e-5, atol=1e-8)
        for a, b in zip(plain.parameters(), fact.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gram,fp32_rows", [(True, 128), (False, 128), (False, 0)])
def test_the_clip_norm_from_grams_or_written_out_blocks_is_the_written_out_gradients(gram, fp32_rows, monkeypatch):
    """Either way of taking a block's share of the clip's norm (its factors' Gram
    matrices, or the block written out once for the norm and the update, from an fp32
    or, under autocast, a bf16 product) gives the norm and the step of the gradient
    written into .grad, fp32 and under autocast."""
    import lm.model
    from lm.train import clipped_step

    monkeypatch.setattr(lm.model, "_gram_cheaper", lambda n, size, dim: gram)
    monkeypatch.setattr(lm.model, "FP32_GRAD_ROWS", fp32_rows)
    for autocast in (False, True):
        plain, opt_p, _ = _tied_case(False, autocast)
        fact, opt_f, tied = _tied_case(True, autocast)
        torch.testing.assert_close(tied.norm_sq().sqrt(), plain.embedding.weight.grad.norm(), rtol=1e-4, atol=0)
        clipped_step(opt_p, list(plain.parameters()), 0.25)
        clipped_step(opt_f, list(fact.parameters()), 0.25, tied)
        tol = dict(rtol=0, atol=1e-6) if not autocast else dict(rtol=0, atol=2e-4 * 0.5 * 0.25)
        for (name, a), b in zip(plain.named_parameters(), fact.parameters()):
            torch.testing.assert_close(a, b, **tol, msg=f"{name} (autocast {autocast})")


def test_gram_rule_takes_grams_only_for_few_rows_and_blocks_larger_than_them():
    from lm.model import GRAM_ROWS, _gram_cheaper

    assert _gram_cheaper(17, 13278, 200) and _gram_cheaper(GRAM_ROWS, 6000, 256)
    assert not _gram_cheaper(GRAM_ROWS + 1, 6000, 256)  # many rows: written out
    assert not _gram_cheaper(60, 50, 200)  # Gram matrices larger than the block itself


def test_threads_follow_the_cores_available_also_where_the_os_has_no_affinity(monkeypatch):
    """Linux counts the cores this process may use (a container's limit); macOS and
    Windows have no affinity call, and every core counts there."""
    from lm import train as train_module

    before = torch.get_num_threads()
    try:
        assert train_module.set_threads(0) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        monkeypatch.delattr(os, "sched_getaffinity")
        monkeypatch.setattr(os, "cpu_count", lambda: 3)
        assert train_module.available_cores() == 3 and train_module.set_threads(0) == 3
        assert train_module.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
