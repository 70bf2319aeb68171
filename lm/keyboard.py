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
the keyboard shows k suggestions, chosen by the rules of ``lm.predict.WordIndex`` that
``lm complete``, the REPL and ``lm serve`` show (its functions, applied to batches of
rows):

* at the token's start, the k most likely next words, the words shown alike merged into
  one suggestion with the sum of their probabilities ("," for "," and "@,@"), which
  stands for the likelier of them there (``standing_for``);
* after j typed characters, the k most likely words completing them, matched and shown
  by the typed casing, spellings shown alike merged ("th" offers "the" for the, The and
  THE; "Th" offers "The" for the and The; "McD" only the words starting so), as the
  docstring of ``lm.predict`` says;
* never ``<unk>`` or ``<eos>``, nor a clitic that cannot follow the token before it on
  its line (``clitic_fits``: no "'ve" after "don", no "'Brien" after "dogs"); the first
  token of a line has no word before it, so every clitic may start it.

Equal probabilities go to the lower id (the more frequent word); a word of probability
0 is never shown. The typist accepts a suggestion as soon as accepting it types the
intended token as the text has it: the suggestion reads as the token's surface and, at
the token's start, stands for the token itself. So "the" is accepted from the merged
"the" after "th", but "," standing for a likelier "@,@" is not accepted for "," (it
would join as in "3,000"), nor "iphone" for "iPhone"; the typist types on. Accepting
is one keystroke, which types the rest of the token and the space after it if the text
has one there (before a token that sticks to it, such as ",", the keyboard drops its
automatic space, as phone keyboards do). A token never accepted is typed in full, then
its space. Every line break costs one keystroke (Enter), after an accepted token too; a
blank line is one Enter. Out-of-vocabulary tokens, the corpus's own ``<unk>``
placeholders included, can never be shown: they are typed in full at their surface
length. A token whose surface differs from its vocabulary entry (``@-@`` typed as "-")
is offered only at its start.

**The metrics.**

* top-k accuracy, k = 1, 3, 5: the share of tokens (words and punctuation; line breaks
  excluded; out-of-vocabulary tokens included, as misses) that the typist would accept
  from the k suggestions at their start: next-word recall as Gboard reports it.
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


NEVER = 1 << 30  # the rank of a token the keyboard does not show (or not as it is)


class Ranker:
    """Ranks of intended tokens among the suggestions the keyboard shows, over one
    vocabulary, by ``WordIndex``'s rules.

    A pool of suggestions is the next words (the whole vocabulary, words shown alike
    merged) or the words matching a typed prefix (``WordIndex.pool``: a contiguous run
    [lo, hi) of ``WordIndex.order(mode)``, spellings shown alike merged). A token's rank
    in a pool is the number of suggestions there ranked ahead of it: groups of words,
    each counted at its representative, whose merged probability is higher, or equal
    with a lower id. Over a run it is read off a cumulative sum over the sorted order:

        sorted:  car  card  care  cat  the  then     (target "card", typed "car")
        ahead:    1     0     1    0    1     0      p > p(card), or equal with a lower id
        cumsum:   1     1     2    2    3     3
        pool "car" = words [0, 3): rank = cumsum[2] - 0 = 2 ("car" and "care" ahead)
    """

    def __init__(self, tokenizer: Tokenizer):
        self.index = WordIndex(tokenizer)  # the same rules, word order and prefix ranges as suggestions
        self._arange = torch.arange(tokenizer.vocab_size)
        self._pools: dict[tuple[str, str], list[tuple[str, int, int]]] = {}

    def suggestable(self, token: Token) -> bool:
        return bool(self.index.suggestable[token.id])

    def pools(self, token: Token) -> list[tuple[str, int, int]]:
        """The suggestions before each character the typist may type, as (mode, lo, hi):
        the next words ("next"), then, if the token is typed as it is spelled, the words
        matching each proper prefix of it. A prefix whose suggestion would show the token
        otherwise (typed "i", "iPhone" shows as "iphone" when that is a word too) gets
        an empty pool: the typist does not accept it there."""
        key = (token.word, token.surface)
        if key not in self._pools:
            out = [("next", 0, 0)]
            if token.surface == token.word:
                for j in range(1, len(token.word)):
                    prefix = token.word[:j]
                    mode, lo, hi = self.index.pool(prefix)
                    if self.index.shown(token.word, mode, prefix) != token.word:
                        lo = hi = 0
                    out.append((mode, lo, hi))
            self._pools[key] = out
        return self._pools[key]

    def typist(self, rows: torch.Tensor, tokens: list[Token], after: list[str | None],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For suggestable ``tokens``, their rows (B, V) of log-probabilities and the
        word before each (None at a line start): each token's rank at its start (B,),
        and how many of its characters are typed before the typist accepts it (B,), -1
        if never."""
        ranks = self.ranks(rows, tokens, after)
        shown = ranks < k  # (B, J): shown before typing character j
        return ranks[:, 0], torch.where(shown.any(1), shown.int().argmax(1), -1)

    def ranks(self, rows: torch.Tensor, tokens: list[Token], after: list[str | None]) -> torch.Tensor:
        """(B, J): each token's rank in each of its ``pools``, ``NEVER`` where the
        keyboard does not offer it as it is (and past its last pool)."""
        index = self.index
        probs = index.visible(rows, after)  # (B, V)
        targets = torch.tensor([tok.id for tok in tokens])
        pools = [self.pools(tok) for tok in tokens]
        ranks = torch.full((len(tokens), max(map(len, pools))), NEVER, dtype=torch.long)
        groups = index.groups["next"][targets]
        ranks[:, 0] = self._ahead(index.merged(probs, "next"), self._arange, groups, groups).sum(1, dtype=torch.int32)
        stands = index.standing_for(probs, groups.unsqueeze(1))[:, 0]
        ranks[stands != targets, 0] = NEVER  # shown, but it would join as another token does
        for mode in sorted({m for p in pools for m, lo, hi in p[1:] if hi > lo}):
            self._complete(ranks, probs, targets, pools, mode)
        ranks[probs.gather(1, targets.unsqueeze(1))[:, 0] == 0] = NEVER  # a clitic that cannot follow
        return ranks

    def _complete(self, ranks: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor,
                  pools: list[list[tuple[str, int, int]]], mode: str) -> None:
        """Fill in the ranks in the pools of case ``mode``. A token's prefixes nest, so
        its pools in a mode lie in one window of ``order(mode)``: the rows' windows,
        padded to the longest (at most the words of one first letter), are
        all that is merged and counted."""
        index = self.index
        where = [(b, j, lo, hi) for b, p in enumerate(pools) for j, (m, lo, hi) in enumerate(p)
                 if j and m == mode and hi > lo]
        span: dict[int, tuple[int, int]] = {}  # row -> its window [lo, hi)
        for b, _, lo, hi in where:
            a, e = span.get(b, (lo, hi))
            span[b] = (min(a, lo), max(e, hi))
        rows = torch.tensor(list(span))
        start = torch.tensor([a for a, _ in span.values()])
        size = torch.tensor([e - a for a, e in span.values()])
        order, cols = index.order(mode), torch.arange(int(size.max()))
        ids = order[(start.unsqueeze(1) + cols).clamp(max=order.numel() - 1)]  # (R, L)
        inside = cols < size.unsqueeze(1)  # (R, L): the padding neither adds nor counts
        window = probs.take(rows.unsqueeze(1) * probs.size(1) + ids)  # probs[rows, ids]
        merged = index.merged(window * inside, mode, ids)
        group = targets[rows] if mode == "exact" else index.groups[mode][targets[rows]]
        at = (ids == group.unsqueeze(1)).int().argmax(1)  # where the target's group is in the window
        cs = self._ahead(merged, ids, group, at).cumsum(1, dtype=torch.int32)  # (R, L): ahead among the first i + 1
        row_of = {b: r for r, b in enumerate(span)}
        r, b, j, lo, hi = (torch.tensor(c) for c in zip(*[(row_of[b], b, j, lo, hi) for b, j, lo, hi in where]))
        lo, hi = lo - start[r], hi - start[r]  # within the window
        ranks[b, j] = (cs[r, hi - 1] - torch.where(lo > 0, cs[r, (lo - 1).clamp(min=0)], 0)).long()

    @staticmethod
    def _ahead(merged: torch.Tensor, ids: torch.Tensor, group: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Merged probabilities (B, L) of the words ``ids`` ((B, L) or (L,)), the targets'
        groups (B,) and their columns (B,) -> (B, L): the suggestions ranked ahead of the
        target's (more likely, or as likely with a lower id)."""
        pt = merged.gather(1, at.unsqueeze(1))  # (B, 1)
        return torch.where(ids < group.unsqueeze(1), merged >= pt, merged > pt)


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
            batch, after = [], []
            while t < len(tokens) and tokens[t].pos < end:
                tok = tokens[t]
                if ranker.suggestable(tok):
                    batch.append(tok)
                    before = tokens[t - 1] if t else None  # on the same line: the position before
                    after.append(before.word if before is not None and before.pos == tok.pos - 1 else None)
                else:  # never shown: typed in full
                    keystrokes += len(tok.surface) + tok.space
                t += 1
            if batch:
                rows_b = chunk[torch.tensor([tok.pos - offset for tok in batch])].float()  # (B, V)
                start_rank, typed = ranker.typist(rows_b, batch, after, k)
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
