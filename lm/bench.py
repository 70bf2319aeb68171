"""Benchmarks behind ``lm bench`` / ``make bench``. Speed and memory targets live here,
never in timed tests. Each measurement runs in a child process so that its peak RSS is
its own."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from lm import errors
from lm.corpus import open_corpus
from lm.errors import DataError

LM_ERROR_EXIT = 3  # a child benchmark's exit code for an lm error, reported as JSON on stdout

CACHE_TARGET_TOKENS = 100_000_000  # the data-layer target: a 100M-token corpus


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, so it starts afresh
    at exec; ru_maxrss would carry over the parent's peak from before the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource  # here, not at the top: Windows has no resource module, and every command imports lm.bench

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(fn: str, *args: str) -> dict:
    """Run ``python -m lm.bench fn args`` in a fresh process and return its JSON result
    (which carries the child's own peak RSS)."""
    proc = subprocess.run([sys.executable, "-m", "lm.bench", fn, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode in (0, LM_ERROR_EXIT) else None
    if proc.returncode == LM_ERROR_EXIT:  # an expected failure: the child's own error, raised again here
        raise getattr(errors, result["error"], errors.LMError)(result["message"])
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise DataError(f"benchmark {fn} failed: {last}")
    return result


def bench_cache(base: str = "wikitext-2", tokens: int = CACHE_TARGET_TOKENS) -> dict:
    """Token-cache build over ``base``'s training text repeated to ``tokens`` tokens."""
    src = open_corpus(base)
    lines = list(src.lines("train"))
    per_copy = sum(len(l.split()) + 1 for l in lines)
    copies = max(1, -(-tokens // per_copy))
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        d = Path(tmp) / f"{base}-x{copies}"
        d.mkdir()
        text = "\n".join(lines) + "\n"
        with open(d / "train.txt", "w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(text)
        for split in ("valid", "test"):
            (d / f"{split}.txt").write_text("\n".join(src.lines(split)) + "\n", encoding="utf-8")
        return _child("_cache", str(d), str(Path(tmp) / "cache"))


def _cache_child(corpus_dir: str, cache: str) -> dict:
    """In the child: vocabulary from the train split, then the train split's cache."""
    os.environ["LM_CACHE"] = cache
    from lm.config import TokenizerConfig
    from lm.data import load_tokenizer, token_array

    corpus = open_corpus(corpus_dir)
    t0 = time.perf_counter()
    tok = load_tokenizer(corpus, TokenizerConfig(text="tokenized"))  # WikiText is already split
    t1 = time.perf_counter()
    n = token_array(corpus, "train", tok).size
    t2 = time.perf_counter()
    return {"tokens": int(n), "vocab": tok.vocab_size, "vocab_seconds": round(t1 - t0, 2),
            "cache_seconds": round(t2 - t1, 2), "cache_tokens_per_s": round(n / (t2 - t1)),
            "peak_rss_mb": _peak_rss_mb()}


def _examples_model(vocab_size: int, size: int, dropout: float = 0.2):
    """pytorch/examples word_language_model's tied LSTM, as its ``main.py`` trains it by
    default (2 layers, dropout 0.2, sequence-first, log-softmax over the vocabulary),
    written out here to time its step next to ``lm``'s."""
    import torch
    from torch import nn

    class ExamplesLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.encoder = nn.Embedding(vocab_size, size)
            self.rnn = nn.LSTM(size, size, 2, dropout=dropout)
            self.decoder = nn.Linear(size, vocab_size)
            self.decoder.weight = self.encoder.weight
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

        def forward(self, words, hidden):  # words: (T, B)
            out, hidden = self.rnn(self.drop(self.encoder(words)), hidden)
            return torch.log_softmax(self.decoder(self.drop(out)).view(-1, vocab_size), dim=1), hidden

    return ExamplesLM()


def bench_train_heads(base: str = "wikitext-2", emb: int = 200, hidden: int = 200, batch: int = 20,
                      bptt: int = 35, round_s: float = 3.0, rounds: int = 8, warmup_s: float = 6.0,
                      model: dict | None = None, examples: bool = False) -> dict:
    """Training tokens/s of one architecture with a full softmax and with the adaptive
    head (and, where the CPU has native bf16, the adaptive head under bf16 autocast as
    ``lm train`` runs it), measured side by side in this process: rounds of ``round_s``
    seconds of training alternate between them, so drift on a shared machine hits all
    alike, and each variant's rate is the median of its rounds' rates (a burst of load
    from elsewhere that slows one round does not count, for any variant). The full
    softmax runs in fp32, as pytorch/examples does, and where bf16 is native also under
    bf16 autocast (as ``lm train --head full`` runs it), so that the head's own gain at
    equal precision shows beside the one against fp32 (``speedup_same_precision``). With
    ``examples`` (where the embedding and hidden sizes are equal), pytorch/examples' own
    training step runs in the rounds too (``_examples_model``: its model,
    ``clip_grad_norm_`` and its manual SGD update), under the same allocator settings.
    Each variant first trains untimed for ``warmup_s`` seconds (at least two steps):
    oneDNN builds a kernel for each new matrix shape, and the adaptive head meets a new
    one whenever a cluster gets a token count it has not had before, so its first
    hundred-odd steps run up to a third slower than the rest of a training run (the full
    softmax's shapes never change)."""
    import torch

    from lm.batching import batchify, bptt_windows
    from lm.config import ModelConfig, TokenizerConfig
    from lm.data import load_tokenizer, token_stream
    from lm.model import LSTMLM, detach
    from lm.train import bf16_autocast, clipped_step, set_threads

    set_threads(0)
    corpus = open_corpus(base)
    tok = load_tokenizer(corpus, TokenizerConfig(text="tokenized"))
    data = batchify(token_stream(corpus, "train", tok), batch)
    variants = [("full", "full", None), ("adaptive", "adaptive", None)]
    if bf16 := bf16_autocast(torch.device("cpu")):
        variants += [("full_bf16", "full", bf16), ("adaptive_bf16", "adaptive", bf16)]
    runs = {}
    for name, head, autocast in variants:
        torch.manual_seed(0)
        net = LSTMLM(ModelConfig(**(model or {"emb_dim": emb, "hidden_dim": hidden}) | {"head": head}), tok.vocab_size)
        runs[name] = {"model": net, "opt": torch.optim.SGD(net.parameters(), lr=1.0),
                      "tied": net.defer_tied_gradient(),  # as lm train runs it on a CPU (None for the full softmax)
                      "windows": bptt_windows(data, bptt), "hidden": None, "round_rates": [],
                      "autocast": autocast or nullcontext(), "params": list(net.parameters())}

    if examples and emb == hidden:
        torch.manual_seed(0)
        net = _examples_model(tok.vocab_size, emb)
        runs["examples"] = {"model": net, "windows": bptt_windows(data, bptt), "hidden": None, "round_rates": [],
                            "params": list(net.parameters()), "examples": True}

    def examples_step(r: dict) -> int:  # main.py's train(): seq-first batches, its clip and update
        _, x, y = next(r["windows"])
        net, hid = r["model"], r["hidden"]
        net.zero_grad()
        log_probs, r["hidden"] = net(x.t().contiguous(), tuple(h.detach() for h in hid) if hid else None)
        torch.nn.functional.nll_loss(log_probs, y.t().reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(r["params"], 0.25)
        for p in r["params"]:
            p.data.add_(p.grad, alpha=-1.0)
        return y.numel()

    def step(r: dict) -> tuple[int, float]:
        """One training step of a variant: (tokens, seconds)."""
        if r.get("examples"):
            t0 = time.perf_counter()
            n = examples_step(r)
            return n, time.perf_counter() - t0
        _, x, y = next(r["windows"])
        t0 = time.perf_counter()
        with r["autocast"]:
            features, r["hidden"] = r["model"](x, detach(r["hidden"]) if r["hidden"] else None)
            loss = r["model"].nll(features, y).float().mean()
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(r["opt"], r["params"], 0.25, r["tied"])
        return y.numel(), time.perf_counter() - t0

    def train_for(r: dict, seconds: float, least: int) -> tuple[int, float]:
        tokens, spent, n = 0, 0.0, 0
        while n < least or spent < seconds:
            k, s = step(r)
            tokens, spent, n = tokens + k, spent + s, n + 1
        return tokens, spent

    for r in runs.values():
        train_for(r, warmup_s, 2)
    core = []  # the cores' speed at each round, to tell a shared machine's states apart
    for _ in range(rounds):
        core.append(core_gflops())
        for r in runs.values():
            tokens, seconds = train_for(r, round_s, 1)
            r["round_rates"].append(tokens / seconds)
    rate = {name: statistics.median(r["round_rates"]) for name, r in runs.items()}
    out = {"arch": f"2x{hidden} tied, emb {emb}, batch {batch}x{bptt}", "full_tokens_per_s": round(rate["full"]),
           "adaptive_tokens_per_s": round(rate["adaptive"]), "speedup": round(rate["adaptive"] / rate["full"], 2)}
    if "adaptive_bf16" in rate:
        out["adaptive_bf16_tokens_per_s"] = round(rate["adaptive_bf16"])
        out["speedup_bf16"] = round(rate["adaptive_bf16"] / rate["full"], 2)
        out["full_bf16_tokens_per_s"] = round(rate["full_bf16"])  # the same precision on both sides:
        out["speedup_same_precision"] = round(rate["adaptive_bf16"] / rate["full_bf16"], 2)  # the head's own gain
    fastest = "adaptive_bf16" if "adaptive_bf16" in runs else "adaptive"
    if "examples" in rate:
        out["examples_tokens_per_s"] = round(rate["examples"])
        out["speedup_vs_examples"] = round(rate[fastest] / rate["examples"], 2)
    # each round's ratio of the fastest adaptive variant to the full softmax in that same
    # round: on a shared machine they spread with the cores' state (round_core_gflops)
    out["round_speedups"] = [round(a / f, 2) for a, f in zip(runs[fastest]["round_rates"], runs["full"]["round_rates"])]
    out["round_tokens_per_s"] = {name: [round(x) for x in r["round_rates"]] for name, r in runs.items()}
    out["round_core_gflops"] = [round(x) for x in core]
    return out


def machine_info() -> dict:
    """What the figures were measured on: the CPU (its name and, on x86, family and
    model, which tell generations apart where a virtual machine names them all alike),
    its cores and torch's threads. Shared machines of one name differ by a third in
    speed from host to host, so a table without this cannot be compared with another."""
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30]
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        if "cpu family" in fields:
            info["cpu"] += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    except OSError:  # not Linux
        pass
    return info


def core_gflops(seconds: float = 0.05) -> float:
    """The cores' arithmetic speed now, in GFLOP/s: fp32 products of two 128 x 128
    matrices, which stay in cache, so memory does not count. On a shared virtual machine
    it can change by a fifth from one minute to the next, and a compute-bound training
    step with it; the train benchmark records it at every round."""
    import torch

    a, b = torch.randn(128, 128), torch.randn(128, 128)
    return _calls_per_s(lambda: torch.mm(a, b), seconds, least=3) * 2 * 128**3 / 1e9


def _calls_per_s(fn, seconds: float, least: int = 2) -> float:
    """How often ``fn()`` runs per second: called for ``seconds``, and at least ``least`` times."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < least:
        fn()
        n += 1
    return n / elapsed


def _core_probes(seconds: float = 0.1) -> dict:
    """The machine's state in three numbers: the two-thread probe (``core_gflops``,
    small products, so the cores' coordination counts); each core alone (one thread
    pinned to it, 512 x 512 fp32 products); memory bandwidth (copying 64 MB, GB/s read
    plus written). Changes the thread count and the affinity while it runs: call it only
    in a process of its own (``bench_host``'s child)."""
    import torch

    out: dict = {"two_thread_gflops": round(core_gflops(seconds))}
    threads = torch.get_num_threads()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per_core = []
    torch.set_num_threads(1)
    try:
        for core in cores[:8]:
            os.sched_setaffinity(0, {core})
            per_core.append(round(_calls_per_s(lambda: torch.mm(a, b), seconds) * 2 * 512**3 / 1e9))
    finally:
        if cores:
            os.sched_setaffinity(0, set(cores))
        torch.set_num_threads(threads)
    out["one_core_gflops"] = per_core
    src = torch.ones(16 * 1024 * 1024)
    dst = torch.empty_like(src)
    out["memory_gb_per_s"] = round(_calls_per_s(lambda: dst.copy_(src), seconds) * 2 * src.numel() * 4 / 1e9, 1)
    return out


def host_summary(samples: list[dict], fast_within: float = 0.1) -> dict:
    """Samples of ``bench_host`` grouped by the machine's state: "fast" where the
    two-thread probe is within ``fast_within`` of the best sample's, "slow" otherwise;
    per group, the count and each measure's median (per core for the one-core probe)."""
    best = max(s["two_thread_gflops"] for s in samples)
    groups: dict = {"fast": [], "slow": []}
    for s in samples:
        groups["fast" if s["two_thread_gflops"] >= (1 - fast_within) * best else "slow"].append(s)
    out = {}
    for name, group in groups.items():
        if not group:
            continue
        summary = {"samples": len(group)}
        for key in group[0]:
            if key == "one_core_gflops":
                summary[key] = [round(statistics.median(s[key][i] for s in group)) for i in range(len(group[0][key]))]
            else:
                summary[key] = round(statistics.median(s[key] for s in group), 2)
        out[name] = summary
    return out


def _training_stepper(base: str, batch: int, bptt: int, model: dict):
    """The adaptive head's training step as ``lm train`` runs it on a CPU (bf16 autocast
    where native, the deferred tied gradient, the clip folded into SGD), over the corpus's
    windows again and again: (the step, its architecture). Each call of the step runs one
    step and returns its seconds in phases: (whole step, LSTM forward with the embedding,
    head forward, backward, update)."""
    from lm.batching import bptt_windows
    from lm.model import detach
    from lm.train import clipped_step

    net, params, opt, tied, bf16, data = _adaptive_training(base, batch, model)
    autocast = bf16 or nullcontext()
    state = {"windows": bptt_windows(data, bptt), "hidden": None}

    def step() -> tuple[float, ...]:
        try:
            _, x, y = next(state["windows"])
        except StopIteration:
            state["windows"], state["hidden"] = bptt_windows(data, bptt), None
            _, x, y = next(state["windows"])
        t0 = time.perf_counter()
        with autocast:
            features, state["hidden"] = net(x, detach(state["hidden"]) if state["hidden"] else None)
            t1 = time.perf_counter()
            loss = net.nll(features, y).float().mean()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        clipped_step(opt, params, 0.25, tied)
        t4 = time.perf_counter()
        return t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3

    arch = (f"2x{model['hidden_dim']} tied adaptive, emb {model['emb_dim']}, batch {batch}x{bptt}"
            f"{', bf16' if bf16 else ''}")
    return step, arch


def _warm_up(step, seconds: float, least: int = 2) -> None:
    """Untimed steps first: oneDNN builds a kernel for each new matrix shape, and the
    adaptive head meets new ones (its clusters' token counts) for its first hundred-odd steps."""
    start, n = time.perf_counter(), 0
    while n < least or time.perf_counter() - start < seconds:
        step()
        n += 1


def bench_host(base: str = "wikitext-2", seconds: float = 120.0, sample_s: float = 2.0, emb: int = 200,
               hidden: int = 200, batch: int = 20, bptt: int = 35, model: dict | None = None) -> dict:
    """How the machine's state moves the 2x200 training step. A shared virtual machine
    changes state from minute to minute; this alternates ``_core_probes`` with
    ``sample_s`` seconds of the adaptive head's bf16 training step (as ``lm train`` runs
    it), timed in phases: LSTM forward (embedding and layers), head forward, backward,
    update. Runs in a child process of its own (``lm bench --only host``): the probes
    change its thread count and affinity."""
    step, arch = _training_stepper(base, batch, bptt, model or {"emb_dim": emb, "hidden_dim": hidden})
    _warm_up(step, min(6.0, 3 * sample_s))
    samples, end = [], time.perf_counter() + seconds
    while not samples or time.perf_counter() < end:
        sample = _core_probes()
        times, start = [], time.perf_counter()
        while not times or time.perf_counter() - start < sample_s:
            times.append(step())
        for i, name in enumerate(("step_ms", "lstm_forward_ms", "head_forward_ms", "backward_ms", "update_ms")):
            sample[name] = round(statistics.median(t[i] for t in times) * 1e3, 2)
        samples.append(sample)
    return {"arch": arch, "samples": samples, "states": host_summary(samples)}


def bench_ops(base: str = "wikitext-2", emb: int = 256, hidden: int = 256, batch: int = 64, bptt: int = 35,
              steps: int = 30, warmup_s: float = 6.0, top: int = 8, model: dict | None = None) -> dict:
    """Where a training step's time goes, operator by operator (``lm bench --only ops``;
    the default model unless told otherwise): ``torch.profiler`` over ``steps`` training
    steps as ``lm train`` runs them on a CPU, after ``warmup_s`` seconds of untimed ones.
    Each of the ``top`` operators with the most self time (time in the operator itself,
    not in the operators it calls; the OpenMP threads' work counts in the operator that
    started it) gets its share of the profiled total, its milliseconds and calls per
    step; the rest is summed as "other". The same number of steps is timed without the
    profiler first, whose bookkeeping per operator call makes profiled steps slower."""
    from torch.profiler import ProfilerActivity, profile

    step, arch = _training_stepper(base, batch, bptt, model or {"emb_dim": emb, "hidden_dim": hidden})
    _warm_up(step, warmup_s)
    plain = statistics.median(step()[0] for _ in range(steps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, list[float]] = {}  # operator -> [self microseconds, calls]
    for event in prof.key_averages():
        t = totals.setdefault(event.key, [0.0, 0])
        t[0] += event.self_cpu_time_total
        t[1] += event.count
    total = sum(t for t, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    ops = [{"op": name, "share": round(t / total, 3), "self_ms_per_step": round(t / 1e3 / steps, 3),
            "calls_per_step": round(n / steps, 1)} for name, (t, n) in ranked[:top]]
    return {"arch": arch, "steps": steps, "step_ms": round(plain * 1e3, 2),
            "profiled_step_ms": round(total / 1e3 / steps, 2),
            "events_per_step": round(sum(n for _, n in totals.values()) / steps),  # operator calls, nested ones too
            "ops": ops, "other_share": round(sum(t for _, (t, _) in ranked[top:]) / total, 3)}


def _ops_child(kwargs: str) -> dict:
    return bench_ops(**json.loads(kwargs))


def _host_child(seconds: str) -> dict:
    return bench_host(seconds=float(seconds))


def _default_model(checkpoint: str | None):
    """The model to time inference on: a trained checkpoint if there is one (then the
    perplexity rows mean something), else the default architecture freshly initialised
    (speed does not depend on the weights)."""
    import torch

    from lm.checkpoint import load_model
    from lm.config import Config
    from lm.data import load_tokenizer
    from lm.model import LSTMLM
    from lm.train import build_config

    if checkpoint and Path(checkpoint).is_file():
        cfg, model, tok, _ = load_model(checkpoint)
        return cfg, model.eval(), tok, checkpoint
    cfg: Config = build_config({"data": {"corpus": "wikitext-2"}})
    tok = load_tokenizer(open_corpus("wikitext-2"), cfg.tokenizer)
    torch.manual_seed(0)
    return cfg, LSTMLM(cfg.model, tok.vocab_size).eval(), tok, None


def _adaptive_training(base: str, batch: int, model: dict):
    """The adaptive-head model as ``lm train`` runs it on a CPU, for the single-model
    benchmarks: (model, its parameters, SGD, the deferred tied gradient, bf16 autocast or
    None, the batched training tokens)."""
    import torch

    from lm.batching import batchify
    from lm.config import ModelConfig, TokenizerConfig
    from lm.data import load_tokenizer, token_stream
    from lm.model import LSTMLM
    from lm.train import bf16_autocast, set_threads

    set_threads(0)
    corpus = open_corpus(base)
    tok = load_tokenizer(corpus, TokenizerConfig(text="tokenized"))
    data = batchify(token_stream(corpus, "train", tok), batch)
    torch.manual_seed(0)
    net = LSTMLM(ModelConfig(**model | {"head": "adaptive"}), tok.vocab_size).train()
    params = list(net.parameters())
    return net, params, torch.optim.SGD(params, lr=1.0), net.defer_tied_gradient(), bf16_autocast(torch.device("cpu")), data


def bench_step_profile(base: str = "wikitext-2", emb: int = 256, hidden: int = 256, batch: int = 64,
                       bptt: int = 35, steps: int = 12) -> dict:
    """Where a training step's time goes, for the default model: data (the next BPTT
    window), LSTM (embedding and LSTM layers, forward and backward), head (softmax
    forward and backward) and optimizer (clipping and the update; with the tied gradient
    kept as factors, as ``lm train`` runs it on a CPU, this includes forming the shared
    matrix's gradient products, which the head's backward no longer does). The LSTM part
    is timed by a pass through the layers alone on the same batch, interleaved with the
    full steps; the head is the rest of forward+backward.
    The precision is training's: bf16 autocast where the CPU has native bf16."""
    import torch

    from lm.batching import bptt_windows
    from lm.model import detach
    from lm.train import clipped_step

    model, params, opt, tied, bf16, data = _adaptive_training(base, batch, {"emb_dim": emb, "hidden_dim": hidden})
    windows = bptt_windows(data, bptt)
    autocast = bf16 or nullcontext()
    t = {"data": 0.0, "lstm": 0.0, "forward+backward": 0.0, "optimizer": 0.0}
    hid = None
    for i in range(steps + 2):
        timed = i >= 2
        t0 = time.perf_counter()
        _, x, y = next(windows)
        t1 = time.perf_counter()
        with autocast:
            features, _ = model(x, detach(hid) if hid else None)
        features.backward(torch.ones_like(features))
        opt.zero_grad(set_to_none=True)
        tied.clear()
        t2 = time.perf_counter()
        with autocast:
            features, hid = model(x, detach(hid) if hid else None)
            loss = model.nll(features, y).float().mean()
        loss.backward()
        t3 = time.perf_counter()
        clipped_step(opt, params, 0.25, tied)
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if timed:
            for k, v in (("data", t1 - t0), ("lstm", t2 - t1), ("forward+backward", t3 - t2), ("optimizer", t4 - t3)):
                t[k] += v
    step = t["data"] + t["forward+backward"] + t["optimizer"]
    parts = {"data": t["data"], "lstm": t["lstm"], "head": max(0.0, t["forward+backward"] - t["lstm"]),
             "optimizer": t["optimizer"]}
    return {"arch": f"2x{hidden} tied adaptive, emb {emb}, batch {batch}x{bptt}{', bf16' if bf16 else ''}",
            "step_ms": round(step / steps * 1e3, 1),
            "share": {k: round(v / step, 3) for k, v in parts.items()}}


def _train_rss_child(steps: str) -> dict:
    """In the child: the default training run for a few steps; its own peak RSS."""
    from lm.train import build_config, train

    with tempfile.TemporaryDirectory(prefix="lm-bench-run-") as tmp:
        cfg = build_config({"data": {"corpus": "wikitext-2"}, "train": {"max_steps": int(steps), "save_every": 0}})
        summary = train(cfg, Path(tmp) / "run", progress=False, log=lambda *a: None)
    return {"steps": summary["steps"], "peak_rss_mb": _peak_rss_mb()}


def bench_inference(checkpoint: str | None, words: int = 300, rounds: int = 3) -> dict:
    """Float vs int8 side by side on the default model: generation words/s (one word
    per model step, batch 1, one thread as in the REPL) and, on the WikiText-2 test
    split, evaluation wall time and perplexity."""

    from lm.data import token_stream
    from lm.evaluate import evaluate
    from lm.quantize import quantize
    from lm.sample import generate
    from lm.train import set_threads

    cfg, model, tok, used = _default_model(checkpoint)
    models = {"float": model, "int8": quantize(model)}
    set_threads(1)
    gen = {k: 0.0 for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in generate(m, [tok.eos_id], words, seed=0, banned=[tok.unk_id]):
                pass
            gen[k] += time.perf_counter() - t0
    set_threads(0)
    stream = token_stream(open_corpus("wikitext-2"), "test", tok)
    ev = {k: evaluate(m, stream, bos_id=tok.eos_id, batch_size=10) for k, m in models.items()}
    out = {"checkpoint": used or "untrained default model"}
    for k in models:
        out[k] = {"generate_words_per_s": round(words * rounds / gen[k]), "eval_seconds": round(ev[k]["seconds"], 2),
                  "eval_tokens_per_s": round(ev[k]["tokens_per_s"]), "test_ppl": round(ev[k]["ppl"], 2)}
    out["int8_generate_speedup"] = round(gen["float"] / gen["int8"], 2)
    out["int8_ppl_cost"] = round(ev["int8"]["ppl"] / ev["float"]["ppl"] - 1, 4)
    return out


def bench_autocomplete(checkpoint: str | None, chars: int = 20_000) -> dict:
    """Per-keystroke latency of the autocomplete engine as ``lm repl`` runs it (int8
    weights, session memory, one thread), typing the WikiText-2 test split character by
    character, and ``lm serve`` requests/s on loopback."""
    from lm.cache import LAMBDA, THETA, WINDOW, NeuralCache
    from lm.predict import Predictor, keystroke_latency
    from lm.quantize import quantize
    from lm.serve import requests_per_second
    from lm.text import detokenize_text
    from lm.train import set_threads

    import torch

    from lm.model import LSTMLM

    set_threads(1)
    cfg, model, tok, used = _default_model(checkpoint)
    text = "\n".join(detokenize_text(line) for line in open_corpus("wikitext-2").lines("test") if line.strip())

    def predictor(model: LSTMLM) -> Predictor:
        model = quantize(model)
        return Predictor(model, tok, memory=NeuralCache(WINDOW, THETA, LAMBDA, model.layers[-1].hidden_size))

    pred = predictor(model)
    # A 650-unit model (pytorch/examples' medium size) over the same vocabulary: untrained,
    # since the time of a step does not depend on the weights.
    torch.manual_seed(0)
    big = LSTMLM(replace(cfg.model, emb_dim=650, hidden_dim=650), tok.vocab_size).eval()
    return {"checkpoint": used or "untrained default model", "latency_ms": keystroke_latency(pred, text, chars),
            "latency_650_ms": keystroke_latency(predictor(big), text, chars // 4),
            "serve": requests_per_second(pred, text[:3000], requests=400, clients=4)}


BENCHES = ("train", "profile", "ops", "inference", "autocomplete", "cache")  # what a plain ``lm bench`` runs
EXTRAS = ("host",)  # only when asked for (--only host): a diagnosis of the machine, 2 minutes


def run(only: list[str] | None = None, checkpoint: str | None = "checkpoints/wikitext-2/best.pt",
        log=print) -> dict:
    """Every benchmark (or those in ``only``); prints a line per result and a table."""
    from lm.recipes import recipe

    results: dict = {}
    rows: list[tuple[str, str, str]] = []  # (measure, result, target or note)
    want = set(only or BENCHES)
    results["machine"] = m = machine_info()
    log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads)")
    rows.append(("machine", f"{m['cpu']}, {m['cores']} cores", f"torch {m['torch']}"))
    if "train" in want:
        wt2 = recipe("wt2-cpu")
        for name, kw in (("train-2x200", {"examples": True}),
                         ("train-wt2-cpu", {"emb": wt2["model"]["emb_dim"], "hidden": wt2["model"]["hidden_dim"],
                                            "batch": wt2["data"]["batch_size"], "model": wt2["model"]})):
            r = bench_train_heads(**kw)
            results[name] = r
            bf16 = (f", adaptive + bf16 {r['adaptive_bf16_tokens_per_s']:,} tok/s: {r['speedup_bf16']:.2f}x"
                    if "speedup_bf16" in r else "")
            cores = f"{min(r['round_core_gflops'])}-{max(r['round_core_gflops'])} GFLOP/s"
            per_round = f"rounds {min(r['round_speedups']):.2f}-{max(r['round_speedups']):.2f}x"  # the fastest head's
            log(f"training {r['arch']}: full softmax {r['full_tokens_per_s']:,} tok/s, adaptive "
                f"{r['adaptive_tokens_per_s']:,} tok/s: {r['speedup']:.2f}x{bf16} ({per_round}; core speed in the rounds: {cores})")
            rows.append((f"train tok/s, {r['arch']}", f"full {r['full_tokens_per_s']:,} / adaptive "
                         f"{r['adaptive_tokens_per_s']:,} = {r['speedup']:.2f}x",
                         "target >= 8x" + ("" if bf16 else f"; {per_round}, core speed {cores}")))
            if bf16:
                rows.append((f"train tok/s, {r['arch']}, bf16", f"full {r['full_tokens_per_s']:,} / adaptive + bf16 "
                             f"{r['adaptive_bf16_tokens_per_s']:,} = {r['speedup_bf16']:.2f}x",
                             f"target >= 8x; {per_round}, core speed {cores}"))
                log(f"  both under bf16: full softmax {r['full_bf16_tokens_per_s']:,} tok/s, adaptive "
                    f"{r['adaptive_bf16_tokens_per_s']:,} tok/s: {r['speedup_same_precision']:.2f}x (the head's own gain)")
                rows.append((f"train tok/s, {r['arch']}, both under bf16", f"full + bf16 {r['full_bf16_tokens_per_s']:,}"
                             f" / adaptive + bf16 {r['adaptive_bf16_tokens_per_s']:,} = {r['speedup_same_precision']:.2f}x",
                             f"the head's own gain; bf16 alone gives the full softmax "
                             f"{r['full_bf16_tokens_per_s'] / r['full_tokens_per_s']:.2f}x"))
            if "examples_tokens_per_s" in r:
                log(f"  pytorch/examples' own step in the same rounds: {r['examples_tokens_per_s']:,} tok/s; "
                    f"lm's fastest adaptive is {r['speedup_vs_examples']:.2f}x that")
                rows.append((f"train tok/s, {r['arch']}: pytorch/examples' own step vs lm's fastest adaptive",
                             f"examples {r['examples_tokens_per_s']:,} / lm {r.get('adaptive_bf16_tokens_per_s', r['adaptive_tokens_per_s']):,}"
                             f" = {r['speedup_vs_examples']:.2f}x", "same process and allocator settings"))
    if "profile" in want:
        r = bench_step_profile()
        r["train_peak_rss_mb"] = _child("_train_rss", "40")["peak_rss_mb"]
        results["profile"] = r
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["share"].items())
        log(f"training step of {r['arch']}: {r['step_ms']} ms = {share}; training peak RSS {r['train_peak_rss_mb']:.0f} MB")
        rows.append(("train step breakdown (default model)", f"{r['step_ms']} ms: {share}", ""))
        rows.append(("train peak RSS (default run)", f"{r['train_peak_rss_mb']:.0f} MB", ""))
    if "ops" in want:
        results["ops"] = []
        for kw in ({}, {"emb": 200, "hidden": 200, "batch": 20}):  # the default model, then the 2x200
            r = _child("_ops", json.dumps(kw))  # its own process: the profiler's notes on stderr stay there
            results["ops"].append(r)
            ops = ", ".join(f"{o['op'].removeprefix('aten::')} {o['share']:.0%}" for o in r["ops"][:6])
            log(f"training step of {r['arch']} by operator (torch.profiler, self time): {r['step_ms']} ms "
                f"unprofiled, {r['events_per_step']:,} operator calls (nested ones too); {ops}, other {r['other_share']:.0%}")
            rows.append((f"train step by operator, {r['arch']}", f"{r['step_ms']} ms: {ops}, other {r['other_share']:.0%}",
                         f"torch.profiler self time; {r['events_per_step']:,} operator calls per step, nested ones too"))
    if "inference" in want:
        r = bench_inference(checkpoint)
        results["inference"] = r
        f, q = r["float"], r["int8"]
        log(f"inference ({r['checkpoint']}): generation {f['generate_words_per_s']} -> {q['generate_words_per_s']} "
            f"words/s with int8 ({r['int8_generate_speedup']:.2f}x); test eval {f['eval_seconds']} s "
            f"({f['eval_tokens_per_s']:,} tok/s), ppl {f['test_ppl']} -> {q['test_ppl']} int8 ({r['int8_ppl_cost']:+.2%})")
        rows.append(("WikiText-2 test eval, default model", f"{f['eval_seconds']} s ({f['eval_tokens_per_s']:,} tok/s)",
                     "target < 15 s"))
        rows.append(("generation words/s, float -> int8", f"{f['generate_words_per_s']} -> {q['generate_words_per_s']} "
                     f"({r['int8_generate_speedup']:.2f}x)", "target >= 1.5x"))
        rows.append(("test ppl, float -> int8", f"{f['test_ppl']} -> {q['test_ppl']} ({r['int8_ppl_cost']:+.2%})",
                     "target <= +1%" if r["checkpoint"] != "untrained default model" else "untrained: not meaningful"))
    if "autocomplete" in want:
        r = bench_autocomplete(checkpoint)
        results["autocomplete"] = r
        log(f"autocomplete ({r['checkpoint']}): {json.dumps(r['latency_ms'])}; 2x650: {json.dumps(r['latency_650_ms'])}; "
            f"serve {json.dumps(r['serve'])}")
        for name, lat in (("default model", r["latency_ms"]), ("2x650 model", r["latency_650_ms"])):
            for kind, target in (("inside_word", 2), ("boundary", 10)):
                if kind in lat and isinstance(lat[kind], dict):
                    rows.append((f"keystroke latency, {kind.replace('_', ' ')}, {name} (int8, memory, 1 thread)",
                                 f"p50 {lat[kind]['p50_ms']:.2f} ms, p99 {lat[kind]['p99_ms']:.2f} ms",
                                 f"target p99 <= {target} ms"))
        rows.append(("lm serve POST /complete, 4 clients on loopback", f"{r['serve']['requests_per_s']:.0f} requests/s", ""))
    if "cache" in want:
        r = bench_cache()
        results["cache"] = r
        log(f"token cache: {r['tokens']:,} tokens in {r['cache_seconds']:.1f} s = {r['cache_tokens_per_s'] / 1e6:.2f}M "
            f"tokens/s (vocabulary pass {r['vocab_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB "
            f"[target >= 1M tokens/s, < 1024 MB]")
        rows.append(("token cache build", f"{r['cache_tokens_per_s'] / 1e6:.2f}M tok/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                     "target >= 1M tok/s, < 1 GB"))
    if "host" in want:
        r = _child("_host", "120")
        results["host"] = r
        for state, g in r["states"].items():
            log(f"host, {state} state ({g['samples']} samples): two-thread probe {g['two_thread_gflops']:.0f} "
                f"GFLOP/s, each core alone {g['one_core_gflops']} GFLOP/s, memory {g['memory_gb_per_s']} GB/s; "
                f"{r['arch']} step {g['step_ms']} ms = LSTM forward {g['lstm_forward_ms']} + head forward "
                f"{g['head_forward_ms']} + backward {g['backward_ms']} + update {g['update_ms']}")
            rows.append((f"host state: {state} ({g['samples']} samples of 2 s)",
                         f"step {g['step_ms']} ms (LSTM fwd {g['lstm_forward_ms']}, head fwd {g['head_forward_ms']}, "
                         f"bwd {g['backward_ms']}, update {g['update_ms']})",
                         f"probes: two threads {g['two_thread_gflops']:.0f}, each core "
                         f"{'/'.join(map(str, g['one_core_gflops']))} GFLOP/s, memory {g['memory_gb_per_s']} GB/s"))
    log(format_table(rows))
    return results


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """The results as one Markdown table (ready to paste into the README)."""
    lines = ["| measure | result | target / note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    fn, *args = sys.argv[1:]
    try:
        print(json.dumps({"_cache": _cache_child, "_train_rss": _train_rss_child, "_host": _host_child,
                          "_ops": _ops_child}[fn](*args)))
    except errors.LMError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        sys.exit(LM_ERROR_EXIT)
