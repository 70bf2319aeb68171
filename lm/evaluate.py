"""Pure scoring: the exact perplexity of a model over a token stream."""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from lm.batching import eval_lanes
from lm.model import LSTMLM


def add_word_level(result: dict, words: int) -> dict:
    """Per-word perplexity of a subword evaluation: the same total log-likelihood
    divided by the number of words (with one <eos> per line) instead of pieces."""
    total = result["loss"] * result["tokens"]
    return result | {"words": words, "word_ppl": perplexity(total, words), "tokens_per_word": result["tokens"] / words}


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood), guarded against overflow."""
    return math.exp(min(total_nll / max(tokens, 1), 700.0))


@torch.inference_mode()
def evaluate(model: LSTMLM, stream: torch.Tensor, *, bos_id: int, batch_size: int = 10,
             bptt: int = 256, progress: bool = False, desc: str = "eval") -> dict:
    """Score every token of ``stream`` once (the first from a ``bos_id`` context).

    Returns loss (nats per token), ppl, bits per token, tokens and tokens/s. Batch size
    1 is the reference setting; B lanes start B - 1 extra times from an empty state,
    which costs a tiny amount of context (see the README for the measured difference).
    """
    model.eval()
    batch_size = max(1, min(batch_size, stream.numel()))
    x, y, mask = eval_lanes(stream, batch_size, bos_id)  # each (B, L)
    total = torch.zeros((), dtype=torch.float64)
    hidden = None
    start = time.perf_counter()
    steps = range(0, x.size(1), bptt)
    for i in tqdm(steps, desc=desc, unit="win", disable=None if progress else True, leave=False):
        features, hidden = model(x[:, i : i + bptt], hidden)  # (B, T, D)
        nll = model.nll(features, y[:, i : i + bptt])  # (B, T)
        total += nll.masked_fill(~mask[:, i : i + bptt], 0.0).sum(dtype=torch.float64)
    seconds = time.perf_counter() - start
    n = stream.numel()
    loss = total.item() / n
    return {"loss": loss, "ppl": perplexity(total.item(), n), "bits_per_token": loss / math.log(2),
            "tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}
