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


def _child(fn: str, *args: str) -> dict:
    """Run ``python -m lm.bench fn args`` and return its JSON result plus its peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "lm.bench", fn, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    if proc.returncode:
        raise DataError(f"benchmark {fn} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of children is a running maximum: exact when this child is the largest so far
    result["peak_rss_mb"] = round(max(peak_kb, before) / 1024, 1)
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
            "cache_seconds": round(t2 - t1, 2), "cache_tokens_per_s": round(n / (t2 - t1))}


def run(only: list[str] | None = None, log=print) -> dict:
    results: dict = {}
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
