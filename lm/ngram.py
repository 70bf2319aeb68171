"""Interpolated modified Kneser-Ney n-gram model: the count-based baseline.

Chen and Goodman's (1998) interpolated Kneser-Ney with three discounts per order, the
model behind the KN5 perplexities quoted for PTB (see ANCHORS), trained on the same
token stream as the LSTM: one ``<eos>`` per line, contexts running across line ends
just as the LSTM's state does, and the first token predicted from an ``<eos>`` context.
``<eos>`` is an ordinary predictable word; ``<unk>`` is an ordinary word too.

For a context h (the last k - 1 tokens) and word w, with h' its last k - 2 tokens::

    p_k(w | h) = max(c_k(hw) - D_k(c_k(hw)), 0) / c_k(h.) + gamma_k(h) * p_{k-1}(w | h')
    gamma_k(h) = (sum over w of the amount discounted from c_k(hw)) / c_k(h.)
    p_0(w)     = 1 / V                                   (every word has some mass)

where c_k(h.) is the sum of c_k(hw) over w, and a context never seen at order k
(c_k(h.) = 0) backs off entirely: p_k = p_{k-1}. At the highest order c is the raw
count; at lower orders it is the continuation count: the number of distinct words seen
just before the n-gram, plus one for each occurrence that has no word before it (the
very start of the stream), which is SRILM's treatment of n-grams at a sentence start.
Discounts come from the count-of-counts n_1..n_4 of each order:
Y = n_1 / (n_1 + 2 n_2), D(c) = c - (c + 1) Y n_{c+1} / n_c for c = 1, 2 and D(3+) at
c = 3; an order whose statistics give a discount outside (0, c) takes 0.5, 1, 1.5
instead (see ``discounts``). The probabilities sum to one over the vocabulary exactly
(up to rounding), for every context: what is discounted at an order is what gamma
hands down, and the recursion ends in the uniform distribution.

Storage is a trie flattened into sorted arrays, one per order: a k-gram is the key
``ctx * V + w``, where ``ctx`` is the index of its first k - 1 words in the order
k - 1 table (the unigram table is dense: index = word id). Sorting the keys groups each
context's words into one contiguous range, so looking an n-gram up is a binary search
(``np.searchsorted``) and a context's whole row of followers is a slice::

    order 2 keys (V = 10):   [ 3*10+1, 3*10+4, 3*10+7,   5*10+2, ... ]
                               '----- context "3" -----'  '-- "5" --'

Counting is vectorised: the k-grams ending at every position are keyed from the
(k-1)-gram ids one position earlier, and one ``np.unique`` per order gives the
table, every position's k-gram id, and each distinct k-gram's first position (whose
(k-1)-gram suffix gets one continuation count). Only counts are saved (``.npz``, no
pickle); discounts and per-context weights are derived when a model is loaded.
"""
from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm import __version__
from lm.checkpoint import atomic_write, check_replaceable
from lm.errors import CheckpointError, ConfigError
from lm.tokenizer import Tokenizer

FORMAT = "lm-ngram"
VERSION = 1
DEFAULT_ORDER = 5
MAX_ORDER = 9  # a sanity bound: longer n-grams are nearly all seen once


def check_order(order: int) -> None:
    """Refuse an order outside 1..MAX_ORDER. Callers check before they read the corpus:
    tokenizing a large one takes minutes, and the order alone decides this."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ConfigError(f"--order must be between 1 and {MAX_ORDER}, got {order}")


class KneserNey:
    """An interpolated modified Kneser-Ney model over a fixed vocabulary of V ids.

    ``keys[k]`` and ``counts[k]`` describe order k + 1: for k = 0 the dense (V,) unigram
    counts (``keys[0]`` is None), for k >= 1 the sorted int64 keys ``ctx * V + w`` (below
    2^63 for any stream under 2^31 tokens) and their counts: raw at the top order,
    continuation counts below.
    """

    def __init__(self, keys: list[np.ndarray | None], counts: list[np.ndarray], vocab_size: int, bos_id: int,
                 tokenizer: Tokenizer | None = None, meta: dict | None = None):
        self.order, self.V, self.bos_id = len(counts), vocab_size, bos_id
        self.keys, self.counts = keys, counts
        self.tokenizer, self.meta = tokenizer, dict(meta or {})
        self.discounts = [discounts(c) for c in counts]  # per order: D(1), D(2), D(3+)
        self._weights: list[np.ndarray] = []  # per order: discounted count of each n-gram
        self._scale: list[np.ndarray] = []  # per order, per context: 1 / c(h.), 0 if unseen
        self._gamma: list[np.ndarray] = []  # per order, per context: backoff weight, 1 if unseen
        self._offsets: list[np.ndarray | None] = [None]  # order >= 2: context h's range in keys
        self._words: list[np.ndarray | None] = [None]  # order >= 2: the w of each key
        for k, c in enumerate(counts):
            d = self.discounts[k][np.clip(c, 1, 3) - 1] * (c > 0)
            kept = c - d  # (n_k,): what the n-gram keeps after discounting
            if k == 0:
                ctx, n_ctx = np.zeros(c.size, np.int64), 1
            else:
                ctx, n_ctx = keys[k] // self.V, counts[k - 1].size
                self._offsets.append(np.concatenate([[0], np.cumsum(np.bincount(ctx, minlength=n_ctx))]))
                self._words.append((keys[k] % self.V).astype(np.int64))
            total = np.bincount(ctx, weights=c.astype(np.float64), minlength=n_ctx)  # (n_ctx,)
            seen = total > 0
            scale = np.divide(1.0, total, out=np.zeros(n_ctx), where=seen)
            gamma = np.where(seen, 1.0 - np.bincount(ctx, weights=kept, minlength=n_ctx) * scale, 1.0)
            self._weights.append(kept)
            self._scale.append(scale)
            self._gamma.append(gamma)
        # p_1: the unigram level over the uniform base, identical for every context.
        self._unigram = self._weights[0] * self._scale[0][0] + self._gamma[0][0] / self.V  # (V,)

    # -- training ------------------------------------------------------------------------
    @classmethod
    def train(cls, stream: np.ndarray | torch.Tensor, vocab_size: int, bos_id: int, order: int = DEFAULT_ORDER,
              tokenizer: Tokenizer | None = None, meta: dict | None = None, progress: bool = False) -> "KneserNey":
        """Count every n-gram of ``stream`` (ids, (N,)) up to ``order``, the first token
        predicted from a ``bos_id`` context."""
        check_order(order)
        ids = torch.as_tensor(stream).numpy() if isinstance(stream, torch.Tensor) else np.asarray(stream)
        s = np.concatenate([[bos_id], ids]).astype(np.int64)  # (N + 1,): position 0 is the context only
        n, V = s.size, vocab_size
        if n < 2 or s.min() < 0 or s.max() >= V:
            raise ConfigError(f"cannot train an n-gram model: the stream is empty or has ids outside [0, {V})")
        keys: list[np.ndarray | None] = [None]
        counts: list[np.ndarray] = []
        prev = s  # ids of the (k-1)-grams ending at each position: order 1 is the word itself
        for k in tqdm(range(2, order + 1), desc="counting n-grams", unit="order",
                      disable=None if progress else True, leave=False):
            ctx = prev[k - 2 : n - 1]  # the (k-1)-gram before each position that can end a k-gram
            at = np.flatnonzero(ctx >= 0) + (k - 1)  # those positions
            uniq, first, inverse = np.unique(ctx[at - (k - 1)] * V + s[at], return_index=True, return_inverse=True)
            cur = np.full(n, -1, np.int64)
            cur[at] = inverse.reshape(-1)
            counts.append(_continuation(prev, cur, at[first], size=V if k == 2 else keys[-1].size, order=k - 1))
            keys.append(uniq)
            prev = cur
        # the top order keeps its raw counts
        counts.append(np.bincount(s[1:], minlength=V) if order == 1 else
                      np.bincount(prev[prev >= 0], minlength=keys[-1].size))
        return cls(keys, counts, V, bos_id, tokenizer, meta)

    def sizes(self) -> list[int]:
        """Distinct n-grams per order (order 1: the words seen)."""
        return [int(np.count_nonzero(self.counts[0]))] + [k.size for k in self.keys[1:]]

    # -- scoring -------------------------------------------------------------------------
    def _gram_ids(self, e: np.ndarray) -> list[np.ndarray]:
        """For each order k, the table index of the k-gram of ``e`` ending at each position
        (-1 where it was never seen or would start before the stream): k x (N,)."""
        ids = [e]
        for k in range(1, self.order):
            prev, keys = ids[-1], self.keys[k]
            cur = np.full(e.size, -1, np.int64)
            ids.append(cur)
            if keys.size == 0:  # a stream shorter than the order
                continue
            at = np.flatnonzero(prev[:-1] >= 0) + 1
            query = prev[at - 1] * self.V + e[at]
            j = np.minimum(np.searchsorted(keys, query), keys.size - 1)
            found = keys[j] == query
            cur[at[found]] = j[found]
        return ids

    def _target_probs(self, ids: list[np.ndarray], e: np.ndarray) -> np.ndarray:
        """p(e[i] | e[:i]) for i >= 1: (N - 1,) float64, the recursion run bottom-up."""
        p = self._unigram[e[1:]]
        for k in range(1, self.order):
            h = ids[k - 1][:-1]  # context of order k + 1: the k-gram ending just before
            g = ids[k][1:]
            ok = h >= 0
            kept = np.where(g >= 0, self._weights[k][np.maximum(g, 0)], 0.0)
            p = np.where(ok, kept * self._scale[k][np.maximum(h, 0)] + self._gamma[k][np.maximum(h, 0)] * p, p)
        return p

    def score(self, stream: torch.Tensor | np.ndarray, bos_id: int | None = None) -> dict:
        """Every token of ``stream`` scored once, the first from a ``bos_id`` context:
        the same keys as ``lm.evaluate.evaluate``."""
        start = time.perf_counter()
        e = self._with_bos(stream, bos_id)
        total = -np.log(self._target_probs(self._gram_ids(e), e)).sum()
        seconds = time.perf_counter() - start
        n = e.size - 1
        loss = float(total) / n
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
                "tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}

    def _with_bos(self, stream, bos_id: int | None) -> np.ndarray:
        ids = torch.as_tensor(stream).numpy() if isinstance(stream, torch.Tensor) else np.asarray(stream)
        e = np.concatenate([[self.bos_id if bos_id is None else bos_id], ids]).astype(np.int64)
        if e.size < 2 or e.min() < 0 or e.max() >= self.V:
            raise ConfigError(f"cannot score: the stream is empty or has ids outside the model's "
                              f"vocabulary [0, {self.V})")
        return e

    # -- full distributions --------------------------------------------------------------
    def _prob_rows(self, ids: list[np.ndarray], ends: np.ndarray, dtype=np.float64) -> np.ndarray:
        """The whole next-word distribution after each context ending at ``ends``: (B, V).

        Unrolled, p_n = G_2 p_1 + sum over k >= 2 of G_{k+1} a_k, where a_k is order k's
        sparse row of discounted counts and G_k the product of the backoff weights of
        orders k..n: one dense pass over V per row, then each order's followers of the
        row's context scattered in.
        """
        G = np.ones(ends.size)  # product of the gammas of the orders above the current one
        sparse = []
        for k in range(self.order - 1, 0, -1):
            h = ids[k - 1][ends]  # (B,) the context of order k + 1, -1 if unseen
            rows = np.flatnonzero(h >= 0)
            h = h[rows]
            sparse.append((k, rows, h, G[rows] * self._scale[k][h]))
            G[rows] *= self._gamma[k][h]
        P = np.multiply(G[:, None], self._unigram[None, :], dtype=dtype)  # (B, V)
        for k, rows, h, weight in sparse:
            lo, lens = self._offsets[k][h], self._offsets[k][h + 1] - self._offsets[k][h]
            r = np.repeat(rows, lens)  # one entry per (row, follower) pair
            j = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            P[r, self._words[k][j]] += np.repeat(weight, lens) * self._weights[k][j]
        return P

    def log_probs(self, context_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """log p(w | context) for every word w: (V,) float64. The context is the ids seen
        so far; empty means the start of a text (an ``<eos>`` context)."""
        ctx = [int(i) for i in context_ids]
        ctx = ctx[max(0, len(ctx) - self.order + 1):]  # the last order - 1 ids
        if len(ctx) < self.order - 1 or not ctx:  # the text's start is within reach
            ctx = [self.bos_id] + ctx
        e = np.asarray(ctx, np.int64)
        if e.min() < 0 or e.max() >= self.V:
            raise ConfigError(f"context ids must lie in the model's vocabulary [0, {self.V})")
        return torch.from_numpy(np.log(self._prob_rows(self._gram_ids(e), np.array([e.size - 1])))[0])

    def log_prob_rows(self, stream: torch.Tensor | np.ndarray, bos_id: int | None = None,
                      chunk: int = 256) -> Iterator[torch.Tensor]:
        """Row i is log p(. | bos, stream[:i]): (T, V) float32 chunks covering the stream
        in order, for metrics that need the whole distribution at every position."""
        e = self._with_bos(stream, bos_id)
        ids = self._gram_ids(e)
        for i in range(0, e.size - 1, chunk):
            ends = np.arange(i, min(i + chunk, e.size - 1))
            yield torch.from_numpy(self._prob_rows(ids, ends, np.float32)).log_()

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically as ``.npz``: numpy arrays only (read back without pickle), the
        tokenizer's bytes among them, so the file needs nothing else to type text into."""
        path, tok = Path(path), self.tokenizer
        if tok is None:
            raise ValueError("a model is saved with its tokenizer: pass tokenizer= to KneserNey.train")
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "lm_version": __version__,
                "order": self.order, "vocab_size": self.V, "bos_id": self.bos_id,
                "tokenizer": {"kind": tok.kind, "text": tok.text, "lowercase": tok.lowercase,
                              "fingerprint": tok.fingerprint}}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                  "tokenizer": np.frombuffer(tok.model_bytes, np.uint8)}
        for k in range(self.order):
            if k:
                arrays[f"keys{k + 1}"] = self.keys[k]
            arrays[f"counts{k + 1}"] = self.counts[k].astype(np.uint32)
        check_replaceable(path, "--out", "an n-gram model", is_ngram_model)  # never a checkpoint or a text
        # np.savez gets a file object: given a name, it would append ".npz"
        return atomic_write(path, lambda f: np.savez(f, **arrays), hint="choose another --out")

    @classmethod
    def load(cls, path: str | Path) -> "KneserNey":
        """Read and check a saved model; every failure is a one-line CheckpointError."""
        path = Path(path).expanduser()
        if path.is_dir():  # a run directory: the model lm ngram train wrote there by default
            found = sorted(path.glob("kn*.npz"))
            if len(found) > 1:
                raise CheckpointError(f"{path} holds {len(found)} n-gram models ({', '.join(f.name for f in found)}): "
                                      "pass one of them")
            path = found[0] if found else path
        if not path.is_file():
            raise CheckpointError(f"n-gram model {path} not found: make one with lm ngram train")
        bad = f"{path} is not a readable lm n-gram model"
        try:
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files:
                    if any(f.endswith("data.pkl") for f in z.files):  # torch.save's archive
                        raise CheckpointError(f"{path} is a neural checkpoint, not an n-gram model: score it with "
                                              f"lm eval {path}, or make an n-gram model with lm ngram train {path}")
                    raise CheckpointError(f"{bad} (no 'meta' entry): make one with lm ngram train")
                meta = json.loads(z["meta"].tobytes().decode())
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise CheckpointError(f"{bad} (no '{FORMAT}' format tag)")
                if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
                    raise CheckpointError(f"{path} has n-gram format version {meta.get('version')}, newer than "
                                          f"this lm ({__version__}) reads ({VERSION}): upgrade lm")
                order, V, bos_id = int(meta["order"]), int(meta["vocab_size"]), int(meta["bos_id"])
                if not (1 <= order <= MAX_ORDER and 0 <= bos_id < V):
                    raise CheckpointError(f"{bad} (order {order} or bos_id {bos_id} out of range); retrain it")
                keys = [None] + [z[f"keys{k}"].astype(np.int64) for k in range(2, order + 1)]
                counts = [z[f"counts{k}"].astype(np.int64) for k in range(1, order + 1)]
                t = meta["tokenizer"]
                tokenizer = Tokenizer(z["tokenizer"].tobytes(), t["kind"], t["text"], t["lowercase"])
                if tokenizer.fingerprint != t["fingerprint"] or tokenizer.vocab_size != V:
                    raise CheckpointError(f"{bad}: its tokenizer does not match the counts; retrain it")
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, zipfile.BadZipFile,
                UnicodeDecodeError) as e:
            raise CheckpointError(f"{bad} (truncated or corrupt: {type(e).__name__}); retrain it with "
                                  "lm ngram train") from None
        _check_tables(keys, counts, V, path)
        return cls(keys, counts, V, bos_id, tokenizer, meta)


def is_ngram_model(path: str | Path) -> bool:
    """Whether ``path`` is a file that ``lm ngram train`` wrote: an .npz archive whose
    meta entry carries this format's tag (its arrays are not read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                return False
            meta = json.loads(z["meta"].tobytes().decode())
    except Exception:  # noqa: BLE001 - anything unreadable as such is not one
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # what KenLM's --discount_fallback takes


def discounts(counts: np.ndarray) -> np.ndarray:
    """Chen and Goodman's D(1), D(2), D(3+) from one order's count-of-counts.

    On a small or unusual corpus the count-of-counts need not fall (n_4 > n_3, say), and
    the formula gives a discount outside (0, c). One of 0 lets a context whose words all
    have that count keep its whole mass, so every word it has not seen gets probability
    0 (an infinite perplexity); one of c leaves the order's n-grams nothing. Such an order
    takes the fixed discounts 0.5, 1, 1.5 instead, as KenLM does when asked to."""
    n = np.bincount(np.clip(counts, 0, 5), minlength=6)[1:5].astype(np.float64)  # n_1..n_4
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.0
    ratio = np.divide(n[1:], n[:3], out=np.zeros(3), where=n[:3] > 0)  # n_{c+1} / n_c
    c = np.arange(1.0, 4.0)
    d = c - (c + 1) * y * ratio
    return d if bool(np.all((d > 0) & (d < c))) else np.array(FALLBACK_DISCOUNTS)


def _continuation(prev: np.ndarray, cur: np.ndarray, firsts: np.ndarray, size: int, order: int) -> np.ndarray:
    """Continuation counts of the order-``order`` grams (ids ``prev`` per position): the
    distinct grams one order up (first positions ``firsts``) each add one to their
    suffix, and every occurrence with nothing before it (it starts the stream) adds one."""
    c = np.bincount(prev[firsts], minlength=size)
    lone = prev[max(1, order - 1):]
    lone = lone[(lone >= 0) & (cur[max(1, order - 1):] < 0)]
    return c + np.bincount(lone, minlength=size)


def _check_tables(keys, counts, V: int, path: Path) -> None:
    """Shapes and ranges a loaded model relies on, so a damaged file fails here in one
    line rather than as an index error deep in scoring."""
    ok = V > 0 and counts[0].shape == (V,)
    for k in range(1, len(counts)):
        kk = keys[k]
        ok = ok and kk.ndim == 1 and kk.shape == counts[k].shape and (kk.size == 0 or (
            kk[0] >= 0 and kk[-1] // V < counts[k - 1].size and bool(np.all(kk[1:] > kk[:-1]))))
    if not ok or any(c.ndim != 1 or (c.size and c.min() < 0) for c in counts):
        raise CheckpointError(f"{path} is not a readable lm n-gram model (inconsistent tables); retrain it")
