"""The continuous cache pointer (Grave et al. 2017, "Improving neural language models
with a continuous cache"): a training-free way to let a model copy words from its
recent past.

The cache remembers, for each of the last ``window`` positions i, the last layer's
features h_i and the word that followed, x_{i+1}. At position t it proposes

    p_cache(w) ∝ sum over remembered i with x_{i+1} = w of exp(theta * h_t . h_i)

and the prediction is the mixture p(w) = (1 - lambda) p_model(w) + lambda p_cache(w).
A rare word that appeared a few hundred tokens ago gets most of lambda's mass when the
current state resembles the state that preceded it last time: a name, once seen, is
predicted again. Before anything is remembered the cache proposes nothing and the
model's distribution is used as it is.

``NeuralCache`` is the memory (also used online, e.g. an autocomplete session);
``evaluate_cache`` scores a stream with it and ``tune_cache`` searches theta and lambda.
The search reads the model once: theta only scales the similarity scores, so each
window's dot products are computed once and reused for every theta, and lambda only
mixes two per-token numbers, so the whole lambda grid is arithmetic on stored vectors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from lm.batching import eval_lanes
from lm.errors import ConfigError
from lm.evaluate import perplexity
from lm.model import LSTMLM

WINDOW = 3785  # positions remembered (AWD-LSTM's pointer on WikiText-2)
THETA = 0.662  # similarity scale (AWD-LSTM's WikiText-2 value)
LAMBDA = 0.1279  # cache weight in the mixture (AWD-LSTM's WikiText-2 value)
THETAS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7)  # tune_cache's default grid
LAMBDAS = tuple(round(0.02 * i, 2) for i in range(31))  # 0, 0.02, ..., 0.6: free to search
SCORE_WINDOW = 256  # tokens scored per model call and per vectorised cache step


def check_settings(window: int, theta: float, lam: float) -> None:
    if not (isinstance(window, int) and window >= 1):
        raise ConfigError(f"--cache-window must be a positive number of tokens, got {window}")
    if not (math.isfinite(theta) and theta >= 0):
        raise ConfigError(f"--cache-theta must be a finite number >= 0, got {theta}")
    if not 0 <= lam < 1:  # at 1 the cache alone scores, and a word not in it gets probability 0
        raise ConfigError(f"--cache-lambda must be at least 0 and below 1 (the cache's share of the mixture), "
                          f"got {lam}")


class NeuralCache:
    """Memory of the last ``window`` (features, next word) pairs and the mixture above.

    Keys are kept in stream order (oldest first), so causal scoring can tell which
    entries a later position no longer sees."""

    def __init__(self, window: int, theta: float, lam: float, dim: int):
        check_settings(window, theta, lam)
        self.window, self.theta, self.lam, self.dim = window, float(theta), float(lam), dim
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new document or session)."""
        self.keys = torch.zeros(0, self.dim)  # (M, D), M <= window
        self.values = torch.zeros(0, dtype=torch.long)  # (M,)
        self._mask_key: tuple | None = None

    def __len__(self) -> int:
        return self.values.numel()

    def add(self, h: Tensor, next_ids: Tensor) -> None:
        """Remember h (N, D) and the word that followed each row, next_ids (N,)."""
        h = h.detach().reshape(-1, self.dim).float()
        self.keys = torch.cat([self.keys.to(h.device), h])[-self.window:]
        self.values = torch.cat([self.values.to(h.device), next_ids.detach().reshape(-1).long()])[-self.window:]

    def mix(self, log_probs: Tensor, h: Tensor) -> Tensor:
        """(N, V) model log-probabilities and (N, D) query features -> (N, V) mixed
        log-probabilities. Every query sees the memory as it is; nothing is added."""
        if len(self) == 0:
            return log_probs
        keys, values = self.keys.to(h.device), self.values.to(h.device)
        attn = torch.softmax(self.theta * (h.float() @ keys.T), dim=-1)  # (N, M)
        p_cache = attn.new_zeros(log_probs.shape).scatter_add_(1, values.expand_as(attn), attn)  # (N, V)
        return _mixture(log_probs, p_cache.log().to(log_probs.dtype), self.lam)

    def score_targets(self, h: Tensor, targets: Tensor, thetas: Sequence[float]) -> tuple[Tensor, Tensor]:
        """log p_cache(target) for consecutive positions and several thetas, without
        remembering them: h (T, D), targets (T,), thetas (K,) -> ((K, T), seen (T,)).

        Position t sees the memory plus positions < t of this call, at most ``window``
        of them (the most recent). ``seen`` is False where that is nothing: there the
        cache proposes no distribution. Worked example, window 3, memory [m0 m1 m2],
        T = 3 (rows: queries, columns: remembered then new positions, x = visible):

                 m0 m1 m2 t0 t1 t2
            t0:  x  x  x  .  .  .
            t1:  .  x  x  x  .  .
            t2:  .  .  x  x  x  .
        """
        h = h.detach().float()
        keys = torch.cat([self.keys.to(h.device), h])  # (M + T, D)
        values = torch.cat([self.values.to(h.device), targets.long()])  # (M + T,)
        M, T = len(self), targets.numel()
        hide = self._hide(M, T, h.device)  # (T, M + T): 0 where visible, -inf elsewhere
        dots = h @ keys.T  # (T, M + T), shared by every theta
        # The visible (query, position) pairs whose next word is the query's target: few
        # (mostly frequent words), so the numerators are sums over a short list.
        r, c = (values == targets.reshape(-1, 1)).nonzero(as_tuple=True)
        keep = (c < M + r) & (c >= M + r - self.window)
        r, c = r[keep], c[keep]
        out, scores = [], torch.empty_like(dots)
        for theta in thetas:
            torch.add(hide, dots, alpha=theta, out=scores)  # (T, M + T)
            log_norm = scores.logsumexp(dim=1)  # (T,)
            p = (scores[r, c] - log_norm[r]).exp()
            out.append(torch.zeros(T, device=h.device).index_add_(0, r, p).log())  # (T,)
        seen = M + torch.arange(T, device=h.device) > 0  # row t sees M + t positions, at most window
        return torch.stack(out), seen

    def _hide(self, M: int, T: int, device: torch.device) -> Tensor:
        """The additive mask of ``score_targets`` (the same for every full-memory window,
        so it is built once and kept)."""
        if self._mask_key != (M, T, device):
            col = torch.arange(M + T, device=device)
            newest = M + torch.arange(T, device=device).unsqueeze(1)  # (T, 1): first column row t may not see
            visible = (col < newest) & (col >= newest - self.window)  # (T, M + T)
            self._mask = torch.zeros(T, M + T, device=device).masked_fill_(~visible, -math.inf)
            self._mask_key = (M, T, device)
        return self._mask

    def mix_targets(self, target_log_probs: Tensor, h: Tensor, targets: Tensor) -> Tensor:
        """(T,) model log p of each target, (T, D) features in stream order, (T,) targets
        -> (T,) mixed log p; position t sees the memory and positions < t of this call.
        Then all T positions are remembered."""
        lp_cache, seen = self.score_targets(h, targets, [self.theta])
        self.add(h, targets)
        return _mixed(target_log_probs, lp_cache[0].to(target_log_probs.dtype), seen, self.lam)


def _mixture(log_p_model: Tensor, log_p_cache: Tensor, lam: float) -> Tensor:
    """log((1 - lam) p_model + lam p_cache) in log space; lam = 0 gives log_p_model
    bit for bit (logaddexp(a, -inf) = a)."""
    log_keep = math.log1p(-lam) if lam < 1 else -math.inf
    log_lam = math.log(lam) if lam > 0 else -math.inf
    return torch.logaddexp(log_p_model + log_keep, log_p_cache + log_lam)


def _mixed(lp_model: Tensor, lp_cache: Tensor, seen: Tensor, lam: float) -> Tensor:
    """The mixture where the cache had seen something, the model alone elsewhere."""
    return torch.where(seen, _mixture(lp_model, lp_cache, lam), lp_model)


def _stream_scores(model: LSTMLM, stream: Tensor, bos_id: int, window: int, thetas: Sequence[float],
                   progress: bool, desc: str) -> tuple[Tensor, Tensor, Tensor]:
    """One pass at batch size 1: the model's log p of each target (N,), the cache's
    (K, N) for each theta, and whether the cache had seen anything (N,)."""
    model.eval()
    x, y, _ = eval_lanes(stream, 1, bos_id)  # (1, N) each
    memory = NeuralCache(window, 0.0, 0.0, model.layers[-1].hidden_size)
    lp_model, lp_cache, seen, hidden = [], [], [], None
    steps = range(0, x.size(1), SCORE_WINDOW)
    for i in tqdm(steps, desc=desc, unit="win", disable=None if progress else True, leave=False):
        features, hidden = model(x[:, i : i + SCORE_WINDOW], hidden)  # (1, T, D)
        targets = y[0, i : i + SCORE_WINDOW]  # (T,)
        lp_model.append(-model.nll(features, y[:, i : i + SCORE_WINDOW])[0])
        lpc, s = memory.score_targets(features[0], targets, thetas)
        lp_cache.append(lpc)
        seen.append(s)
        memory.add(features[0], targets)
    return torch.cat(lp_model), torch.cat(lp_cache, dim=1), torch.cat(seen)


def _mixed_nll(lp_model: Tensor, lp_cache: Tensor, seen: Tensor, lam: float) -> Tensor:
    """Total negative log-likelihood of the mixture: (N,), (..., N), (N,) -> (...) float64."""
    return -_mixed(lp_model, lp_cache, seen, lam).sum(dim=-1, dtype=torch.float64)


@torch.inference_mode()
def evaluate_cache(model: LSTMLM, stream: Tensor, *, bos_id: int, window: int = WINDOW, theta: float = THETA,
                   lam: float = LAMBDA, progress: bool = False, desc: str = "cache",
                   keep_tokens: bool = False) -> dict:
    """Perplexity of ``stream`` with the cache, and without it from the same pass (both
    at batch size 1, the exact reference setting). With ``keep_tokens`` the result also
    holds ``token_log_probs`` (N,), each target's mixed log-probability."""
    check_settings(window, theta, lam)
    start = time.perf_counter()
    lp_model, lp_cache, seen = _stream_scores(model, stream, bos_id, window, [theta], progress, desc)
    return cache_result(lp_model, lp_cache[0], seen, window=window, theta=theta, lam=lam,
                        seconds=time.perf_counter() - start, keep_tokens=keep_tokens)


def cache_result(lp_model: Tensor, lp_cache: Tensor, seen: Tensor, *, window: int, theta: float, lam: float,
                 seconds: float, keep_tokens: bool = False) -> dict:
    """``evaluate_cache``'s result from one pass's scores: the model's (N,), the cache's
    (N,) for ``theta``, and where the cache had seen something (N,)."""
    mixed = _mixed(lp_model, lp_cache, seen, lam)
    n = lp_model.numel()
    total, plain = -mixed.sum(dtype=torch.float64).item(), -lp_model.sum(dtype=torch.float64).item()
    out = {"ppl": perplexity(total, n), "loss": total / n, "plain_ppl": perplexity(plain, n), "plain_loss": plain / n,
           "window": window, "theta": theta, "lambda": lam, "tokens": n, "seconds": seconds,
           "tokens_per_s": n / max(seconds, 1e-9)}
    if keep_tokens:
        out["token_log_probs"] = mixed
    return out


@torch.inference_mode()
def tune_cache(model: LSTMLM, stream: Tensor, *, bos_id: int, window: int = WINDOW,
               thetas: tuple[float, ...] = THETAS, lambdas: tuple[float, ...] = LAMBDAS,
               progress: bool = False, desc: str = "tune cache", keep_scores: bool = False) -> dict:
    """Grid search of theta x lambda for the lowest perplexity of ``stream`` (the
    validation split). One model pass; returns the best ``theta``, ``lambda`` and
    ``ppl``, the ``plain_ppl``, and the whole grid (``ppl_grid[k][l]`` for
    ``thetas[k]``, ``lambdas[l]``). With ``keep_scores`` also ``scores``: the pass's
    (model, cache at the best theta, seen) scores, from which ``cache_result`` gives
    ``evaluate_cache``'s result for this stream without a second pass."""
    for t in thetas:
        check_settings(window, t, 0.0)
    for lam in lambdas:
        check_settings(window, 0.0, lam)
    start = time.perf_counter()
    lp_model, lp_cache, seen = _stream_scores(model, stream, bos_id, window, thetas, progress, desc)
    n = stream.numel()
    grid = torch.stack([_mixed_nll(lp_model, lp_cache, seen, lam) for lam in lambdas], dim=1) / n  # (K, L) loss
    k, l = divmod(int(grid.argmin()), len(lambdas))
    scores = {"scores": (lp_model, lp_cache[k], seen)} if keep_scores else {}
    return scores | {"theta": thetas[k], "lambda": lambdas[l], "ppl": math.exp(grid[k, l].item()),
            "plain_ppl": perplexity(-lp_model.sum(dtype=torch.float64).item(), n), "window": window,
            "thetas": list(thetas), "lambdas": list(lambdas),
            "ppl_grid": grid.clamp(max=700).exp().tolist(), "tokens": n, "seconds": time.perf_counter() - start}
