"""Pure scoring: the exact perplexity of a model over a token stream, its OOV rate, and
the per-token dump. (Evaluation-time methods that change the prediction live in
``lm.cache`` and ``lm.dynamic``.)"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lm.batching import eval_lanes
from lm.errors import LMError
from lm.model import LSTMLM


def add_word_level(result: dict, words: int) -> dict:
    """Per-word perplexity of a subword evaluation: the same total log-likelihood
    divided by the number of words (with one <eos> per line) instead of pieces."""
    total = result["loss"] * result["tokens"]
    return result | {"words": words, "word_ppl": perplexity(total, words), "tokens_per_word": result["tokens"] / words}


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood), guarded against overflow."""
    return math.exp(min(total_nll / max(tokens, 1), 700.0))


def fmt_ppl(ppl: float) -> str:
    """A perplexity for people: two decimals, or three digits once it is astronomical
    (a diverged model's 1e304 is not 305 digits)."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"


@torch.inference_mode()
def evaluate(model: LSTMLM, stream: torch.Tensor, *, bos_id: int, batch_size: int = 10,
             bptt: int = 256, progress: bool = False, desc: str = "eval", unk_id: int | None = None,
             keep_tokens: bool = False) -> dict:
    """Score every token of ``stream`` once (the first from a ``bos_id`` context).

    Returns loss (nats per token), ppl, bits per token, tokens and tokens/s. Batch size
    1 is the reference setting; B lanes start B - 1 extra times from an empty state,
    which costs a tiny amount of context (see the README for the measured difference).
    With ``unk_id``, also ``oov_rate``: the fraction of targets that are <unk> (their
    probability is the whole unknown class's, which flatters perplexity when high).
    With ``keep_tokens``, also ``token_log_probs`` (N,): each target's log-probability.
    """
    model.eval()
    batch_size = max(1, min(batch_size, stream.numel()))
    x, y, mask = eval_lanes(stream, batch_size, bos_id)  # each (B, L)
    log_probs = torch.zeros(x.shape, device=x.device)  # (B, L); the lanes are contiguous slices, so row-major = stream order
    hidden = None
    start = time.perf_counter()
    steps = range(0, x.size(1), bptt)
    for i in tqdm(steps, desc=desc, unit="win", disable=None if progress else True, leave=False):
        features, hidden = model(x[:, i : i + bptt], hidden)  # (B, T, D)
        log_probs[:, i : i + bptt] = -model.nll(features, y[:, i : i + bptt])  # (B, T)
    seconds = time.perf_counter() - start
    n = stream.numel()
    total = -log_probs.masked_fill(~mask, 0.0).sum(dtype=torch.float64).item()
    loss = total / n
    out = {"loss": loss, "ppl": perplexity(total, n), "bits_per_token": loss / math.log(2),
           "tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}
    if unk_id is not None:
        out["oov_rate"] = (stream == unk_id).sum().item() / n
    if keep_tokens:
        out["token_log_probs"] = log_probs.reshape(-1)[:n].cpu()
    return out


def write_token_dump(path: str | Path, stream: torch.Tensor, tokens: list[str], columns: dict[str, torch.Tensor]) -> Path:
    """Write one record per target token: its position in the split's stream (0-based),
    the token, and one natural-log probability per entry of ``columns`` (name -> (N,)).

    A path ending in ``.jsonl`` gets JSON lines ({"position": 0, "token": "the",
    "logprob": -3.2, ...}); any other gets tab-separated values with a header row
    (``position  token  logprob ...``). ``tokens[i]`` is the display string of id i.

    The file is written atomically (a failure leaves what was there), and only over
    nothing, an empty file or an earlier dump (``is_token_dump``): never over a
    checkpoint or a text. A device such as /dev/stdout is written in place."""
    from lm.checkpoint import atomic_write, check_replaceable

    path = Path(path)
    check_replaceable(path, "--dump-tokens", "a token dump", is_token_dump)
    names = list(columns)
    values = torch.stack([columns[k].double() for k in names], dim=1).tolist()  # (N, C)
    ids = stream.tolist()

    def write(raw) -> None:
        f = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        if path.suffix == ".jsonl":
            for pos, (i, row) in enumerate(zip(ids, values)):
                f.write(json.dumps({"position": pos, "token": tokens[i], **dict(zip(names, row))}) + "\n")
        else:
            f.write("\t".join(["position", "token", *names]) + "\n")
            for pos, (i, row) in enumerate(zip(ids, values)):
                f.write(f"{pos}\t{tokens[i]}\t" + "\t".join(f"{v:.6f}" for v in row) + "\n")
        f.flush()
        f.detach()  # the caller closes (and fsyncs) the file

    hint = "choose another path"
    if path.exists() and not path.is_file():  # /dev/stdout, a fifo: nothing to replace, written in place
        try:
            with open(path, "wb") as raw:
                write(raw)
        except OSError as e:
            raise LMError(f"cannot write --dump-tokens file {path}: {e.strerror or e}; {hint}") from None
        return path
    return atomic_write(path, write, hint=hint, error=LMError)


def is_token_dump(path: str | Path) -> bool:
    """Whether ``path`` starts as ``write_token_dump`` starts its files: the header row
    ``position<TAB>token<TAB>...``, or a JSON line {"position": 0, "token": ...}."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
    except OSError:
        return False
    if first.startswith(b"position\ttoken\t"):
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and list(record)[:2] == ["position", "token"] and record["position"] == 0
