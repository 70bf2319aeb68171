"""Sampling: a pure ``sample_next`` and the ``generate`` generator over it."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

from lm.model import LSTMLM
from lm.tokenizer import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from (V,) logits. Temperature 0 is greedy; top_k keeps the k most
    likely; top_p keeps the smallest set whose probability reaches p."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a temperature that is 0 in float32
        return int(logits.argmax())
    logits = (logits.float() - logits.max().float()) / temperature  # the best at 0: a tiny temperature
    # turns the others to -inf, not every logit (and softmax to NaN)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: LSTMLM, prompt: Sequence[int], max_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             banned: Sequence[int] = ()) -> Iterator[int]:
    """Yield ``max_tokens`` sampled token ids continuing ``prompt`` (which must hold at
    least one id; pass <eos> to start from scratch). ``banned`` ids are never drawn."""
    if not prompt:
        raise ValueError("generate needs a prompt of at least one id (<eos> to start from scratch)")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    features, hidden = deque(model.read(list(prompt)), maxlen=1)[0]  # the last piece's
    for n in range(max_tokens):
        logits = model.log_probs(features[-1]).float().cpu()  # (V,): log-probs are valid logits
        if banned:
            logits[list(banned)] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        if n + 1 < max_tokens:  # read the token drawn, for the next draw
            features, hidden = model(torch.tensor([[token]], device=device), hidden)
            features = features[0]


def continue_text(model: LSTMLM, tokenizer: Tokenizer, text: str, max_words: int, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, newlines: bool = True) -> Iterator[str]:
    """Continue natural ``text`` (which may be empty): yields, for each sampled word, the
    display text it adds (" word", ",", "\n"). <unk> is never drawn, nor <eos> (a new
    line) unless ``newlines``."""
    prompt = [tokenizer.eos_id] + tokenizer.encode_typed(text)
    last_line = prompt[len(prompt) - prompt[::-1].index(tokenizer.eos_id):]
    stream = TextStream(tokenizer, last_line)
    banned = [tokenizer.unk_id] + ([] if newlines else [tokenizer.eos_id])
    for token in generate(model, prompt, max_words, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          banned=banned):
        yield stream.add(token)


class TextStream:
    """Turns sampled ids into display text piece by piece: each call returns only what
    the new token adds to the rendered line (a word, ", ", "-", a newline)."""

    def __init__(self, tokenizer: Tokenizer, line: list[int]):
        self.tok, self.line = tokenizer, list(line)
        self.shown = len(tokenizer.render(self.line))

    def add(self, token: int) -> str:
        if token == self.tok.eos_id:
            self.line, self.shown = [], 0
            return "\n"
        self.line.append(token)
        text = self.tok.render(self.line)
        new, self.shown = text[self.shown:], len(text)
        return new
