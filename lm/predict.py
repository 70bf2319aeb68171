"""The stateful next-word predictor behind ``lm complete`` and the REPL.

It holds the LSTM state after the text seen so far, so a new word costs one model step
and completing the word being typed costs no model work: the distribution for the
current position is kept and filtered by the typed prefix.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lm.model import LSTMLM
from lm.tokenizer import Tokenizer


@dataclass
class Suggestions:
    kind: str  # "next" (a word boundary) or "complete" (inside a word)
    prefix: str  # the partial word being completed ("" for next)
    items: list[tuple[str, float]]  # (word, probability), most likely first

    def to_json(self) -> list[dict]:
        return [{"word": w, "prob": p} for w, p in self.items]


class Predictor:
    def __init__(self, model: LSTMLM, tokenizer: Tokenizer):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        special = {tokenizer.unk_id, tokenizer.eos_id}
        pairs = sorted((w, i) for i, w in enumerate(tokenizer.words) if i not in special)
        self._sorted_words = [w for w, _ in pairs]  # for prefix ranges by bisection
        self._sorted_ids = torch.tensor([i for _, i in pairs], dtype=torch.long)
        self._suggestable = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        self._suggestable[list(special)] = False
        self.reset()

    def reset(self) -> None:
        """Forget the context: the next word is predicted as at the start of a text."""
        self.hidden = None
        self._log_probs = self._step([self.tok.eos_id])

    @torch.inference_mode()
    def _step(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)  # (1, T)
        features, self.hidden = self.model(x, self.hidden)
        return self.model.log_probs(features[0, -1]).float().cpu()  # (V,)

    def feed_words(self, words: list[str]) -> None:
        """Advance the context by whole (already pretokenized) words, one model call."""
        if words:
            ids = [self.tok.word_to_id.get(w, self.tok.unk_id) for w in words]
            self._log_probs = self._step(ids)

    def next_words(self, k: int) -> list[tuple[str, float]]:
        probs = self._log_probs.exp().masked_fill(~self._suggestable, 0.0)
        top = torch.topk(probs, min(k, int(self._suggestable.sum())))
        return [(self.tok.words[i], float(p)) for p, i in zip(top.values, top.indices)]

    def completions(self, prefix: str, k: int) -> list[tuple[str, float]]:
        """The k most likely vocabulary words starting with ``prefix``, by model probability."""
        lo = bisect.bisect_left(self._sorted_words, prefix)
        hi = bisect.bisect_left(self._sorted_words, prefix + "\U0010ffff")
        if lo == hi:
            return []
        ids = self._sorted_ids[lo:hi]
        probs = self._log_probs[ids].exp()
        top = torch.topk(probs, min(k, ids.numel()))
        return [(self.tok.words[int(ids[j])], float(p)) for p, j in zip(top.values, top.indices)]

    def split_partial(self, text: str) -> tuple[list[str], str]:
        """(complete words, partial word) of typed natural text. The text ends inside a
        word when it does not end in whitespace and its last token is not a whole
        vocabulary word: "Hello, wor" -> (["Hello", ","], "wor")."""
        words = self.tok.typed_words(text)
        if words and not text[-1].isspace() and words[-1] not in self.tok.word_to_id:
            return words[:-1], words[-1]
        return words, ""

    def suggest(self, prefix: str, k: int) -> Suggestions:
        if prefix:
            return Suggestions("complete", prefix, self.completions(prefix, k))
        return Suggestions("next", "", self.next_words(k))

    def complete_text(self, text: str, k: int) -> Suggestions:
        """Suggestions after ``text`` from a fresh context."""
        self.reset()
        words, partial = self.split_partial(text)
        self.feed_words(words)
        return self.suggest(partial, k)
