"""Benchmarks behind ``lm bench`` / ``make bench``. Speed and memory targets live here,
never in timed tests. Each measurement runs in a child process so that its peak RSS is
its own."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm.corpus import open_corpus
from lm.errors import DataError

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
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(fn: str, *args: str) -> dict:
    """Run ``python -m lm.bench fn args`` in a fresh process and return its JSON result
    (which carries the child's own peak RSS)."""
    proc = subprocess.run([sys.executable, "-m", "lm.bench", fn, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    if proc.returncode:
        raise DataError(f"benchmark {fn} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def bench_train_heads(base: str = "wikitext-2", emb: int = 200, hidden: int = 200, batch: int = 20,
                      bptt: int = 35, steps: int = 20, rounds: int = 3, warmup: int = 3) -> dict:
    """Training tokens/s of one architecture with a full softmax and with the adaptive
    head, measured side by side in this process: rounds of ``steps`` steps alternate
    between the two, so drift on a shared machine hits both alike."""
    import torch

    from lm.batching import batchify, bptt_windows
    from lm.config import ModelConfig, TokenizerConfig
    from lm.data import load_tokenizer, token_stream
    from lm.model import LSTMLM, detach
    from lm.train import set_threads

    set_threads(0)
    corpus = open_corpus(base)
    tok = load_tokenizer(corpus, TokenizerConfig(text="tokenized"))
    data = batchify(token_stream(corpus, "train", tok), batch)
    runs = {}
    for head in ("full", "adaptive"):
        torch.manual_seed(0)
        model = LSTMLM(ModelConfig(emb_dim=emb, hidden_dim=hidden, head=head), tok.vocab_size)
        runs[head] = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=1.0),
                      "windows": bptt_windows(data, bptt), "hidden": None, "seconds": 0.0, "tokens": 0}

    def step(r: dict, timed: bool) -> None:
        _, x, y = next(r["windows"])
        t0 = time.perf_counter()
        features, r["hidden"] = r["model"](x, detach(r["hidden"]) if r["hidden"] else None)
        loss = r["model"].nll(features, y).mean()
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 0.25)
        r["opt"].step()
        if timed:
            r["seconds"] += time.perf_counter() - t0
            r["tokens"] += y.numel()

    for r in runs.values():
        for _ in range(warmup):
            step(r, timed=False)
    for _ in range(rounds):
        for r in runs.values():
            for _ in range(steps):
                step(r, timed=True)
    rate = {h: r["tokens"] / r["seconds"] for h, r in runs.items()}
    return {"arch": f"2x{hidden} tied, emb {emb}, batch {batch}x{bptt}", "full_tokens_per_s": round(rate["full"]),
            "adaptive_tokens_per_s": round(rate["adaptive"]), "speedup": round(rate["adaptive"] / rate["full"], 2)}


def run(only: list[str] | None = None, log=print) -> dict:
    results: dict = {}
    for name, kw in (("train-2x200", {}), ("train-default", {"emb": 256, "hidden": 256, "batch": 64})):
        if not only or "train" in only:
            r = bench_train_heads(**kw)
            results[name] = r
            log(f"training {r['arch']}: full softmax {r['full_tokens_per_s']:,} tok/s, adaptive "
                f"{r['adaptive_tokens_per_s']:,} tok/s: {r['speedup']:.2f}x")
    if not only or "cache" in only:
        r = bench_cache()
        results["cache"] = r
        log(f"token cache: {r['tokens']:,} tokens in {r['cache_seconds']:.1f} s = {r['cache_tokens_per_s'] / 1e6:.2f}M "
            f"tokens/s (vocabulary pass {r['vocab_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB "
            f"[target >= 1M tokens/s, < 1024 MB]")
    return results


if __name__ == "__main__":
    fn, *args = sys.argv[1:]
    print(json.dumps({"_cache": _cache_child}[fn](*args)))
