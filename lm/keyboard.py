"""Autocomplete (keyboard) metrics: next-word accuracy and keystroke savings.

Every model is scored by the same code: it only hands over its next-word log-probability
rows, (T, V) chunks in stream order (``lstm_rows`` for the LSTM,
``KneserNey.log_prob_rows`` for the n-gram), and this module ranks the intended word
among the suggestions a keyboard would show.

**The text.** Each line of the file is split into tokens the way typed text always is
(``Tokenizer.typed_words``: "Hello, world." -> ``Hello , world .``) and shown back as
natural text by the display rules (``Tokenizer.display``). That natural text is what
the typist types. Its characters are the denominator: each token counts its surface
form there (WikiText's ``@-@`` is "-"), the space after it if the text has one (a
comma sticks to the word before it, so "world," has no space inside), and each line
ends in one line break. The model reads the standard stream, the tokens' ids with one
``<eos>`` per line, the first token predicted from an ``<eos>`` context.

**The typist**, token by token. Before each character of a token, its first included,
the keyboard shows k suggestions: at the token's start, the k most likely next tokens;
after j typed characters, the k most likely vocabulary words starting with those
characters, ranked by the same next-token probability. ``<unk>`` and ``<eos>`` are
never suggested; equal probabilities go to the lower id (the more frequent word). As
soon as the intended token is shown the typist accepts it: one keystroke, which types
the rest of the token and the space after it if the text has one there (before a token
that sticks to it, such as ",", the keyboard drops its automatic space, as phone
keyboards do). A token never shown is typed in full, then its space. Every line break
costs one keystroke (Enter), after an accepted token too; a blank line is one Enter.
Out-of-vocabulary tokens, the corpus's own ``<unk>`` placeholders included, can never
be shown: they are typed in full at their surface length. A token whose surface differs
from its vocabulary entry (``@-@`` typed as "-") is offered only at its start.

**The metrics.**

* top-k accuracy, k = 1, 3, 5: the share of tokens (words and punctuation; line breaks
  excluded; out-of-vocabulary tokens included, as misses) that are among the k most
  likely suggestions at their start: next-word recall as Gboard reports it.
* keystroke savings = 1 - keystrokes / characters, with the keyboard's k (default 3).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lm.errors import UTF8_BOM, ConfigError, DataError, refuse_non_utf8
from lm.model import LSTMLM
from lm.predict import WordIndex
from lm.tokenizer import Tokenizer

ACCURACY_KS = (1, 3, 5)


@dataclass(frozen=True)
class Token:
    pos: int  # index of its id in the stream
    id: int
    word: str  # vocabulary form ("@-@")
    surface: str  # as typed ("-")
    space: bool  # the text has a space after it


@dataclass
class TypedText:
    stream: torch.Tensor  # (N,) ids: each line's tokens, then <eos> when the line is finished
    tokens: list[Token]
    chars: int  # characters of the natural text, one per line break
    line_breaks: int


def typed_text(text: str, tokenizer: Tokenizer, max_words: int | None = None) -> TypedText:
    """The text as a typist meets it, optionally only its first ``max_words`` tokens."""
    ids: list[int] = []
    tokens: list[Token] = []
    chars = breaks = 0
    for line in text.splitlines():
        words = tokenizer.typed_words(line)
        layout = _layout(words, tokenizer)
        cut = max_words is not None and len(tokens) + len(words) > max_words
        if cut:  # the space after the last word typed still belongs to the text
            words = words[: max_words - len(tokens)]
        for w, (surface, space) in zip(words, layout):
            tokens.append(Token(len(ids), tokenizer.word_to_id.get(w, tokenizer.unk_id), w, surface, space))
            ids.append(tokens[-1].id)
            chars += len(surface) + space
        if cut:
            break
        ids.append(tokenizer.eos_id)
        chars, breaks = chars + 1, breaks + 1
        if max_words is not None and len(tokens) == max_words:
            break
    return TypedText(torch.tensor(ids, dtype=torch.long), tokens, chars, breaks)


def _layout(words: list[str], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """(surface, space after) of each token of one line, read off its display text,
    which joins the tokens' surfaces with a single space or nothing."""
    shown = tokenizer.display(words)
    out, p = [], 0
    for w in words:
        surface = tokenizer.display([w])
        if not shown.startswith(surface, p):
            raise RuntimeError(f"display text {shown!r} does not align with its tokens at {w!r}")
        p += len(surface)
        space = shown.startswith(" ", p)  # no surface starts with a space: this one separates
        out.append((surface, space))
        p += space
    return out


class Ranker:
    """Ranks of intended words among the suggestions, over one vocabulary.

    The suggestable words are sorted as strings once, so the words sharing a typed
    prefix are one contiguous range [lo, hi). A word's rank within a range is the number
    of words there ranked ahead of it, read off a cumulative sum over the sorted order:

        sorted:  car  card  care  cat  the  then     (target "card", typed "car")
        ahead:    1     0     1    0    1     0      p > p(card), or equal with a lower id
        cumsum:   1     1     2    2    3     3
        pool "car" = words [0, 3): rank = cumsum[2] - 0 = 2 ("car" and "care" ahead)
    """

    def __init__(self, tokenizer: Tokenizer):
        self.index = WordIndex(tokenizer)  # the same word order and prefix ranges as suggestions
        self.ids = self.index.sorted_ids  # (S,) suggestable ids in string order
        self.special = {tokenizer.unk_id, tokenizer.eos_id}
        self._arange = torch.arange(tokenizer.vocab_size)
        self._ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def suggestable(self, token: Token) -> bool:
        return token.id not in self.special

    def ranges(self, token: Token) -> list[tuple[int, int]]:
        """The suggestion pool before each character the typist may type: the whole
        vocabulary, then (if the word is typed as it is spelled) the words starting with
        each proper prefix of it."""
        key = (token.word, token.surface)
        if key not in self._ranges:
            out = [(0, self.ids.numel())]
            if token.surface == token.word:
                out += [self.index.exact_range(token.word[:j]) for j in range(1, len(token.word))]
            self._ranges[key] = out
        return self._ranges[key]

    def typist(self, rows: torch.Tensor, tokens: list[Token], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For suggestable ``tokens`` and their rows (B, V): each token's rank at its start
        (B,), and how many of its characters are typed before it is among the k shown
        (B,), -1 if it never is."""
        pools = [self.ranges(tok) for tok in tokens]
        J = max(map(len, pools))
        bounds = torch.tensor([p + [(0, 0)] * (J - len(p)) for p in pools], dtype=torch.long)  # (B, J, 2)
        valid = torch.tensor([[j < len(p) for j in range(J)] for p in pools])  # (B, J)
        targets = torch.tensor([tok.id for tok in tokens])
        r = self.ranks(rows, targets, bounds[..., 0], bounds[..., 1])  # (B, J)
        shown = (r < k) & valid  # (B, J): shown before typing character j
        return r[:, 0], torch.where(shown.any(1), shown.int().argmax(1), -1)

    def ranks(self, rows: torch.Tensor, targets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """rows (B, V) log-probs, targets (B,), pools lo/hi (B, J) -> (B, J): how many
        words of each pool rank ahead of the target."""
        pt = rows.gather(1, targets[:, None])  # (B, 1)
        ahead = rows > pt  # (B, V), in id order: compared first, then only bytes are reordered
        ahead |= (rows == pt) & (self._arange[None, :] < targets[:, None])
        cs = ahead[:, self.ids].cumsum(1, dtype=torch.int32)  # (B, S): ahead among the first i + 1 words

        def among_first(n: torch.Tensor) -> torch.Tensor:  # (B, J): ahead among the first n words
            return torch.where(n > 0, cs.gather(1, (n - 1).clamp(min=0)), 0)
        return among_first(hi) - among_first(lo)


def autocomplete(rows: Iterable[torch.Tensor], text: TypedText, tokenizer: Tokenizer, *, k: int = 3,
                 progress: bool = False) -> dict:
    """Top-1/3/5 accuracy and keystroke savings (see the module docstring) from a
    model's next-word log-probability rows: (T, V) chunks whose row i is the
    distribution of ``text.stream[i]``, in stream order."""
    if not 1 <= k <= 1000:
        raise ConfigError(f"--k must be between 1 and 1000, got {k}")
    if not text.tokens:
        raise DataError("the text has no words to type")
    ranker = Ranker(tokenizer)
    hits = {n: 0 for n in ACCURACY_KS}
    keystrokes, accepted = text.line_breaks, 0
    start, offset, t = time.perf_counter(), 0, 0
    tokens = text.tokens
    with tqdm(total=text.stream.numel(), desc="autocomplete", unit="tok", disable=None if progress else True,
              leave=False) as bar:
        for chunk in rows:  # (T, V)
            end = offset + chunk.size(0)
            batch = []
            while t < len(tokens) and tokens[t].pos < end:
                tok = tokens[t]
                if ranker.suggestable(tok):
                    batch.append(tok)
                else:  # never shown: typed in full
                    keystrokes += len(tok.surface) + tok.space
                t += 1
            if batch:
                rows_b = chunk[torch.tensor([tok.pos - offset for tok in batch])].float()  # (B, V)
                start_rank, typed = ranker.typist(rows_b, batch, k)
                for n in ACCURACY_KS:
                    hits[n] += int((start_rank < n).sum())
                for tok, j in zip(batch, typed.tolist()):
                    keystrokes += j + 1 if j >= 0 else len(tok.surface) + tok.space
                accepted += int((typed >= 0).sum())
            offset = end
            bar.update(chunk.size(0))
    if offset != text.stream.numel():
        raise ValueError(f"the model gave {offset} rows for a stream of {text.stream.numel()} tokens")
    seconds = time.perf_counter() - start
    n = len(tokens)
    oov = sum(not ranker.suggestable(tok) for tok in tokens)
    return {**{f"top{m}": hits[m] / n for m in ACCURACY_KS},
            "keystroke_savings": 1.0 - keystrokes / text.chars, "k": k, "words": n, "oov": oov,
            "oov_rate": oov / n, "accepted": accepted, "keystrokes": keystrokes, "chars": text.chars,
            "line_breaks": text.line_breaks, "seconds": seconds, "words_per_s": n / max(seconds, 1e-9)}


@torch.inference_mode()
def lstm_rows(model: LSTMLM, stream: torch.Tensor, bos_id: int, window: int = 256) -> Iterator[torch.Tensor]:
    """Row i is the LSTM's log p(. | <eos>, stream[:i]): (T, V) float32 chunks, one lane
    carrying its state across windows, as ``lm.evaluate.evaluate`` at batch size 1."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.cat([stream.new_tensor([bos_id]), stream[:-1]]).to(device)  # inputs: the stream shifted by one
    hidden = None
    for i in range(0, x.numel(), window):
        features, hidden = model(x[None, i : i + window], hidden)  # (1, T, D)
        yield model.log_probs(features[0]).float().cpu()  # (T, V)


def score_file(path: str | Path, tokenizer: Tokenizer, rows: Callable[[torch.Tensor], Iterable[torch.Tensor]], *,
               k: int = 3, max_words: int | None = None, progress: bool = False) -> dict:
    """``autocomplete`` on a text file, for a model given as stream -> rows."""
    if tokenizer.subword:
        raise ConfigError(f"autocomplete needs a word-level model; this one uses {tokenizer.kind} subwords")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; give a UTF-8 text file") from None
    refuse_non_utf8(path, data, DataError)
    text = typed_text(data.removeprefix(UTF8_BOM).decode("utf-8", errors="replace"), tokenizer, max_words)
    if not text.tokens:
        raise DataError(f"{path} has no words to type")
    result = autocomplete(rows(text.stream), text, tokenizer, k=k, progress=progress)
    return result | {"file": str(path)}
