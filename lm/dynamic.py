"""Dynamic evaluation (Krause et al. 2018, "Dynamic evaluation of neural sequence models"):
let the model keep learning from the text it is scoring.

The stream is cut into windows of ``bptt`` tokens (batch size 1, the state carried
across windows as in plain evaluation). Each window is scored first, with the weights
as they are, and only then used for one gradient step on its own mean loss, so every
token is still predicted before it is learnt from. Two update rules:

    sgd:  theta <- theta - lr * g + decay * (theta0 - theta)
    rms:  theta <- theta - lr * g / (sqrt(MS) + eps) + decay * (theta0 - theta)

theta0 are the trained weights; the decay pulls the adapted weights back toward them,
so what was learnt from one article fades over the next ones. MS is each parameter's
mean squared gradient measured beforehand on other text (``gradient_ms``: the training
split, or the first part of a stream): parameters whose gradients are usually small,
such as the vectors of rare words, get proportionally larger steps.

All of it happens on a copy of the model: the caller's model and the checkpoint it
came from are never touched.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor
from tqdm import tqdm

from lm.batching import eval_lanes
from lm.errors import ConfigError, LMError
from lm.evaluate import perplexity
from lm.model import LSTMLM, detach

METHODS = ("sgd", "rms")
LR = {"sgd": 0.5, "rms": 1e-4}  # default step size per method (tuned on WikiText-2 valid, see README)
DECAY = {"sgd": 0.0, "rms": 0.002}  # default pull toward the trained weights per window
BPTT = 20  # tokens per window: one update per window
EPS = 1e-5  # rms: added to sqrt(MS), bounds the step of parameters never seen with a gradient
MS_TOKENS = 200_000  # training tokens for the gradient statistics (the CLI's default)
MS_BATCH = 20  # lanes for the gradient statistics


def check_settings(method: str, lr: float, decay: float, bptt: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"--dynamic must be one of {', '.join(METHODS)}, got {method!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"--dynamic-lr must be a finite number >= 0, got {lr}")
    if not 0 <= decay <= 1:
        raise ConfigError(f"--dynamic-decay must be between 0 and 1, got {decay}")
    if bptt < 1:
        raise ConfigError(f"--dynamic-bptt must be at least 1, got {bptt}")


def _learner(model: LSTMLM) -> LSTMLM:
    """A copy to take gradients on: eval mode (no dropout, as when scoring)."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(True)
    return work


@torch.enable_grad()
def gradient_ms(model: LSTMLM, stream: Tensor, *, bos_id: int, bptt: int = BPTT, batch_size: int = MS_BATCH,
                progress: bool = False, desc: str = "gradient stats") -> dict[str, Tensor]:
    """Each parameter's mean squared gradient of the window loss (mean over the B x T
    tokens of a window) over ``stream``: name -> tensor shaped like the parameter."""
    work = _learner(model)
    x, y, mask = eval_lanes(stream, max(1, min(batch_size, stream.numel())), bos_id)  # (B, L) each
    ms = {name: torch.zeros_like(p) for name, p in work.named_parameters()}
    hidden, steps = None, 0
    for i in tqdm(range(0, x.size(1), bptt), desc=desc, unit="win", disable=None if progress else True, leave=False):
        work.zero_grad(set_to_none=True)
        features, hidden = work(x[:, i : i + bptt], hidden)  # (B, T, D)
        keep = mask[:, i : i + bptt]
        nll = work.nll(features, y[:, i : i + bptt]).masked_fill(~keep, 0.0)  # (B, T)
        (nll.sum() / keep.sum()).backward()
        hidden = detach(hidden)
        steps += 1
        with torch.no_grad():
            for name, p in work.named_parameters():
                if p.grad is not None:
                    ms[name].addcmul_(p.grad, p.grad)
    return {name: m / steps for name, m in ms.items()}


@torch.enable_grad()
def dynamic_evaluate(model: LSTMLM, stream: Tensor, *, bos_id: int, method: str = "rms", lr: float | None = None,
                     decay: float | None = None, bptt: int = BPTT, ms: dict[str, Tensor] | None = None,
                     eps: float = EPS, progress: bool = False, desc: str = "dynamic",
                     keep_tokens: bool = False) -> dict:
    """Perplexity of ``stream`` under dynamic evaluation (see the module docstring);
    ``lr`` and ``decay`` default to the method's values, ``ms`` (from ``gradient_ms``)
    is needed by ``rms``. ``model`` itself is left as it was. With ``keep_tokens`` the
    result also holds ``token_log_probs`` (N,)."""
    lr = LR[method] if lr is None and method in LR else lr
    decay = DECAY[method] if decay is None and method in DECAY else decay
    check_settings(method, lr, decay, bptt)
    if method == "rms" and ms is None:
        raise ValueError("dynamic evaluation with rms needs the gradient statistics: pass ms=gradient_ms(...)")
    start = time.perf_counter()
    work = _learner(model)
    named = list(work.named_parameters())
    params = [p for _, p in named]
    theta0 = [p.detach().clone() for p in params]
    scale = [1.0 / (ms[name].sqrt() + eps) for name, _ in named] if method == "rms" else [None] * len(params)
    x, y, _ = eval_lanes(stream, 1, bos_id)  # (1, N) each
    n = stream.numel()
    log_probs = torch.empty(n)
    hidden = None
    for i in tqdm(range(0, n, bptt), desc=desc, unit="win", disable=None if progress else True, leave=False):
        features, hidden = work(x[:, i : i + bptt], hidden)  # (1, T, D)
        nll = work.nll(features, y[:, i : i + bptt])[0]  # (T,)
        log_probs[i : i + bptt] = -nll.detach()
        if i + bptt >= n:
            break  # nothing left to adapt to
        work.zero_grad(set_to_none=True)
        nll.mean().backward()
        hidden = detach(hidden)
        with torch.no_grad():
            for p, p0, s in zip(params, theta0, scale):
                if p.grad is not None and s is None:
                    p.add_(p.grad, alpha=-lr)
                elif p.grad is not None:
                    p.addcmul_(p.grad, s, value=-lr)
                if decay:
                    p.lerp_(p0, decay)  # p + decay * (p0 - p)
    seconds = time.perf_counter() - start
    total = -log_probs.sum(dtype=torch.float64).item()
    if not math.isfinite(total):
        raise LMError(f"dynamic evaluation diverged (a non-finite loss) with {method} at --dynamic-lr {lr:g}: "
                      "lower --dynamic-lr")
    out = {"method": method, "lr": lr, "decay": decay, "bptt": bptt, "ppl": perplexity(total, n), "loss": total / n,
           "tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}
    if method == "rms":
        out["eps"] = eps
    if keep_tokens:
        out["token_log_probs"] = log_probs
    return out
