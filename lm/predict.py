"""The autocomplete engine: a stateful predictor over typed natural text.

What a phone keyboard needs, and how this module gives it:

* Instant keystrokes. The predictor holds the LSTM state after the words typed so far.
  A keystroke inside a word costs no model work: the next-word distribution of the
  current position is kept and filtered by the typed prefix. A finished word costs one
  model step (the LSTM, then the head over the vocabulary).
* Edits. ``update(text)`` takes the whole live text after every keystroke and re-syncs
  through the common prefix of words: only the words after it are fed. LSTM states are
  kept per position (every position of the last ``TAIL``, every ``STRIDE``-th before),
  and the distributions of the last few positions too, so a backspace over a space
  costs nothing and an edit far back replays fewer than ``STRIDE`` words.
* Natural text in and out: text is split as the training text was
  (``Tokenizer.typed_words``: "Hello, wor" -> ["Hello", ","] + partial "wor") and
  suggestions are shown through the display rules ("@-@" shows as "-").
* Session learning: an optional ``NeuralCache`` (Grave et al. 2017) remembers the last
  layer's features at each position of the text and the word that followed, and mixes
  a copy distribution into every prediction, so a name typed once is offered again.
  ``learn(text)`` primes it with the user's own writing. Its weight grows with what
  it holds, lambda * M / (M + RAMP) for M remembered words: a handful of words is a poor
  sample (unramped, "The president of the United " offered "United" at 11.5%, copied
  from four words back), and on the first 300 words of 20 WikiText-2 validation
  articles, each from an empty memory, RAMP 50 gave the best top-1 accuracy and
  keystroke savings (k = 3: 24.6% and 52.4%; unramped 24.5% and 52.4%; no memory
  23.7% and 50.7%; RAMP 200: 24.4% and 52.3%). The memory always holds
  exactly the learned pairs followed by the pairs of the current text: an edit that
  removes words removes their pairs, and ``reset()`` (a new text) moves the old text's
  pairs to the learned ones, since the user did type them.

Positions, for the text "The film was"::

    fed:        <eos>  The   film  was
    position p:   0     1     2     3     (p = number of words before it)
    feature f_p predicts the word at p: f_0 (the output after <eos>) predicts "The",
    f_3 predicts what follows "was"; the state kept for p is the LSTM state after the
    words before p. The memory holds the pairs (f_p, word p) for p < 3.

Two rules say where a text ends inside a word. The keyboard rule (``update``): the text
does not end in whitespace and its last character is a letter, digit, mark or
apostrophe ("the" is still being typed: it may become "there"). The one-shot rule of
``lm complete`` and the piped REPL (``complete_known=True``), where no keystroke
follows: such a last word is nevertheless finished when it is a vocabulary word and
the longer words it begins are at most ``ODDS`` times as likely there as the word
itself, each counted in the spellings its casing matches (see the table below). "the
president of the" asks for the next word (p(the) is far above p(their) + p(there) +
...), "the pre" and "The film was re" for completions (every single letter, "pre" and
"re" are WikiText-2 words, but "president", "previous", "released" ... are far more
likely). It costs one more distribution, the one before the last word (the one
completions use). On the first 20,000 tokens of WikiText-2 validation, taking each
prefix of each word that is itself a vocabulary word (40,063, of them 14,458 whole
words), ODDS 2 read 4.5% of the whole words as unfinished ("a" most often, where "an",
"also", "and" ... were likelier) and 5.2% of the shorter prefixes as finished ("the" of
"their"); ODDS 1: 7.0% and 3.5%; ODDS 5: 2.4% and 8.4%. Reading every vocabulary word
as finished, as before, got all 25,605 shorter prefixes wrong.

Completions follow the typed casing, as a phone keyboard does:

==========================  ===================  ==================================
typed prefix                matches              shown as
==========================  ===================  ==================================
lower case ("pres")         any casing           the lower-case word when the
                                                 vocabulary has one ("president"),
                                                 else its own casing ("Presley")
capitalised ("Pres")        any casing           first letter capitalised
                                                 ("President", "Press")
all capitals ("PRES")       any casing           all capitals ("PRESIDENT")
mixed ("McD", "iPh")        exactly as typed     as in the vocabulary ("McDonald")
==========================  ===================  ==================================

Spellings shown the same way are one suggestion whose probability is the sum of theirs:
typed "Pres", "President" gets p(President) + p(president). Accepting it types the
word as shown. A clitic is offered only after a word it can follow in English
spelling (``clitic_fits``): after "I don'", "'t" and "'s", never "'ve" ("don've"); the
tail of a name WikiText splits at its apostrophe ("O 'Brien") only after a capitalised
word or a single letter: "O'" offers "'Brien", "I don'" and "the dogs'" do not. A
lower-case model (``--lowercase``) reads typed text folded, but the casing still comes
from what was typed: "Pres" offers "President", "PRES" "PRESIDENT", and a mixed prefix
keeps its letters ("McD" offers "McDonald" for "mcdonald").
``<unk>``, ``<eos>`` and words on the block list (any casing; as in the vocabulary or
as shown: "-" blocks "@-@") are never suggested.
"""
from __future__ import annotations

import bisect
import copy
import math
import os
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lm.cache import NeuralCache
from lm.errors import UTF8_BOM, LMError, open_input, refuse_non_utf8
from lm.model import LSTMLM, Hidden
from lm.text import pretokenize
from lm.tokenizer import Tokenizer

TAIL = 64  # positions behind the end whose LSTM state is kept (backspace, edits)
STRIDE = 64  # further back, one state every STRIDE positions: an edit there replays < STRIDE words
MEMO = 4  # recent positions whose distribution is kept: backspacing over a space is free
WARMUP = 1000  # words of a learned text read before the part the memory keeps
RAMP = 50  # the memory holding M words gets the weight lambda * M / (M + RAMP)
ODDS = 2.0  # one-shot rule: a last word is unfinished when longer words are > ODDS times as likely
MAX_TEXT_BYTES = 4 << 20  # of a file read as a prompt or to learn from: its last 4 MiB
_LAST = "\U0010ffff"  # sorts after every character: [key, key + _LAST) is the prefix range
_CASE_MODES = ("lower", "capital", "upper")
# The words an English clitic may follow (WikiText splits "I'm" as "I 'm", "don't" as
# "don 't"): "'t" follows a word ending in n (don't, isn't, can't, won't), "'s" any word
# (the dog's, it's), the others the words below (pronouns, wh-words, there, here, and
# the modals before "'ve"). Past tenses such as "pass'd", rare in WikiText, are left out.
_WH = "who what where when why how there here"
_WILL = frozenset(f"i you he she it we they that this {_WH}".split())  # 'll, 'd (will, would, had)
_CLITIC_HOSTS = {
    "'m": frozenset(["i"]),
    "'re": frozenset(f"you we they {_WH}".split()),
    "'ve": frozenset(f"i you we they {_WH} could would should might must".split()),
    "'ll": _WILL,
    "'d": _WILL,
}
# WikiText also splits a name at its apostrophe: "O 'Brien", "d 'Andrade", "K 'inich".
# Such a tail ("'Brien": an apostrophe, a letter, not an English clitic) continues the
# short first part of a name, not an English word: of its 598 occurrences in WikiText-2
# (train, valid and test), 94% follow a capitalised word or a single letter (O 76 times
# before 'Brien, K, T, Kir, d, L ...), the rest "nor" ('easter), "rock" ('n'roll) and
# <unk>; none a lower-case word such as "don" or "dogs", after which the keyboard offered
# "I don'Brien" and "the dogs'Brien".
_NAME_TAIL = "'Name"  # the kind (``clitic_kind``) of such tails


@dataclass(frozen=True)
class Choice:
    """One suggestion: ``text`` as shown and typed, its probability, and the tokens it
    stands for (they decide how it joins the text: "@-@" shows as "-" and glues)."""

    text: str
    prob: float
    tokens: tuple[str, ...]


@dataclass
class Suggestions:
    kind: str  # "next" (at a word boundary) or "complete" (inside a word)
    prefix: str  # the partial word being completed ("" for next)
    items: list[Choice]  # most likely first

    def to_json(self) -> list[dict]:
        return [{"word": c.text, "prob": c.prob} for c in self.items]


# Terminal escape sequences (an arrow key where no line editor reads them) and other
# control characters in typed text: not text, so they read as spaces.
CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1bO[@-~]|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def read_user_text(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A user's UTF-8 text file (a prompt, text to learn from). A larger file is read
    from its last ``max_bytes``, from the first line break on: what follows a long text
    depends on its end, and the memory keeps only its last words. Bad bytes become
    U+FFFD; a missing or binary file is an LMError."""
    path = Path(path).expanduser()
    with open_input(path) as f:
        try:
            if f.seekable():
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - max_bytes))
                data = f.read()
            else:  # a pipe (--learn <(cmd), @/dev/stdin): read it through, keep the end
                data = b""
                while chunk := f.read(1 << 20):
                    data = (data + chunk)[-max_bytes - 1:]
                size = len(data)
                data = data[-max_bytes:]
        except OSError as e:
            raise LMError(f"cannot read {path}: {e.strerror or e}") from None
    refuse_non_utf8(path, data)
    if size > max_bytes:
        data = data[data.find(b"\n") + 1:]
    return data.removeprefix(UTF8_BOM).decode("utf-8", "replace")


def case_mode(prefix: str) -> str:
    """How a typed prefix's casing is matched and shown (see the module docstring)."""
    upper = sum(c.isupper() for c in prefix)
    if upper == 0:
        return "lower"
    if upper >= 2 and not any(c.islower() for c in prefix):
        return "upper"
    if prefix[0].isupper() and upper == 1:
        return "capital"
    return "exact"


def clitic_kind(token: str) -> str | None:
    """Which rule decides the words ``token`` may follow: an English clitic's own
    ("'t", "'ve" ...; "'s" follows any word), ``_NAME_TAIL`` for the rest of a name
    split at its apostrophe ("'Brien"), None for every other token."""
    low = token.lower()
    if low == "'t" or low in _CLITIC_HOSTS:
        return low
    if low != "'s" and low[:1] == "'" and low[1:2].isalpha():
        return _NAME_TAIL
    return None


def host_fits(word: str, kind: str | None) -> bool:
    """Whether a token of ``kind`` (``clitic_kind``) may follow ``word``."""
    if kind is None:
        return True
    if kind == _NAME_TAIL:  # a lower-case model reads every word folded: single letters only
        return word[:1].isupper() or (len(word) == 1 and word.isalpha())
    word = word.lower()
    if kind == "'t":
        return word.endswith("n")
    return word in _CLITIC_HOSTS[kind]


def clitic_fits(word: str, token: str) -> bool:
    """Whether ``token`` may follow ``word``: false for a clitic ("'t", "'ve" ...) that
    English does not spell after it ("don've", "dog're"), and for the tail of a name
    split at its apostrophe after a lower-case word of two or more letters ("don'Brien")."""
    return host_fits(word, clitic_kind(token))


def _prefix_range(keys: list[str], prefix: str) -> tuple[int, int]:
    lo = bisect.bisect_left(keys, prefix)
    return lo, bisect.bisect_left(keys, prefix + _LAST, lo)


class WordIndex:
    """The vocabulary arranged for suggestions. Built once per model (about 0.2 s for
    33k words) and shared by every predictor over it: the server makes one predictor
    per request.

    Prefix ranges come from bisecting sorted word lists (one exact, one lower-cased).
    For each case mode, ``groups[mode][i]`` is the id of the most frequent word shown
    the same way as word i (ids are in frequency order), so merging spellings is one
    ``index_add``; ``groups["next"]`` merges the next words that display alike ("@,@"
    and "," both show as ",").

    The rules work on (B, V) batches of rows too (``visible``, ``merged``,
    ``standing_for``, ``pool``, ``order``): ``lm.keyboard``'s simulated typist ranks
    what these rules show, a row per token of a text, with the same functions."""

    def __init__(self, tokenizer: Tokenizer, block: Iterable[str] = ()):
        self.tok = tokenizer
        self.folded = tokenizer.lowercase  # a lower-case vocabulary: every prefix matches folded
        words = tokenizer.words
        blocked = {w.strip().lower() for w in block if w.strip()}
        special = {tokenizer.unk_id, tokenizer.eos_id}
        displayed = [tokenizer.display([w]) for w in words]  # "@-@" -> "-"
        ok = [i not in special and not {words[i].lower(), displayed[i].lower()} & blocked for i in range(len(words))]
        self.suggestable = torch.tensor(ok)  # (V,)
        ids = [i for i in range(len(words)) if ok[i]]
        self.suggestable_ids = torch.tensor(ids, dtype=torch.long)
        self._known = {words[i] for i in ids}
        exact = sorted(ids, key=lambda i: words[i])
        self._exact = ([words[i] for i in exact], torch.tensor(exact, dtype=torch.long))
        folded = sorted(ids, key=lambda i: words[i].lower())
        self._folded = ([words[i].lower() for i in folded], torch.tensor(folded, dtype=torch.long))
        self.groups: dict[str, Tensor] = {}
        for mode in _CASE_MODES:
            rep: dict[tuple[str, str], int] = {}
            group = list(range(len(words)))
            for i in ids:  # frequency order: the first spelling met represents the group
                group[i] = rep.setdefault((words[i].lower(), self.shown(words[i], mode)), i)
            self.groups[mode] = torch.tensor(group, dtype=torch.long)
        shown_as: dict[str, int] = {}
        group = list(range(len(words)))
        for i in ids:
            group[i] = shown_as.setdefault(displayed[i], i)
        self.groups["next"] = torch.tensor(group, dtype=torch.long)
        self._others = {}  # mode -> (the words that are not their group's representative, its representative)
        for mode, group in self.groups.items():
            others = (group != torch.arange(len(words))).nonzero()[:, 0]
            self._others[mode] = (others, group[others])
        self._hidden = (~self.suggestable).nonzero()[:, 0]
        alike: dict[int, list[int]] = {}  # a group of several words shown alike -> its words
        for i in ids:
            if group[i] != i:
                alike.setdefault(group[i], [group[i]]).append(i)
        # row g: the words of next-word group g, ascending, padded with g (its lowest id)
        self._members = torch.arange(len(words)).unsqueeze(1).repeat(1, max(map(len, alike.values()), default=1))
        for g, members in alike.items():
            self._members[g, : len(members)] = torch.tensor(members)
        self._n_shown = len(shown_as)
        kinds: dict[str, list[int]] = {}
        for i in ids:
            if (kind := clitic_kind(words[i])) is not None:
                kinds.setdefault(kind, []).append(i)
        self._clitic_kinds = {kind: torch.tensor(group) for kind, group in kinds.items()}
        self._none = torch.zeros(0, dtype=torch.long)
        self._misfit_ids: dict[tuple[bool, ...], Tensor] = {}  # which kinds fit -> the ids that do not

    def shown(self, word: str, mode: str, prefix: str = "") -> str:
        """A vocabulary word as offered for ``prefix`` typed in ``mode``."""
        if mode == "upper":
            return word.upper()
        if mode == "capital":
            return word[:1].upper() + word[1:]
        if mode == "lower":
            low = word.lower()
            return low if low in self._known else word
        if self.folded:  # "McD" + "onald": the typed letters keep their casing
            return prefix + word[len(prefix.lower()):]
        return word

    def _sorted(self, mode: str) -> tuple[list[str], Tensor]:
        """The sorted words a prefix typed in ``mode`` is looked up in, and their ids."""
        return self._exact if mode == "exact" and not self.folded else self._folded

    def _keys(self, prefix: str) -> tuple[list[str], Tensor, str, str]:
        """The sorted words ``prefix`` is looked up in, their ids, the key and the case mode."""
        mode = case_mode(prefix)
        key = prefix if mode == "exact" and not self.folded else prefix.lower()
        return *self._sorted(mode), key, mode

    def pool(self, prefix: str) -> tuple[str, int, int]:
        """The case mode of ``prefix`` and [lo, hi): where the words it matches (every
        spelling the mode matches) lie in ``order(mode)``."""
        keys, _, key, mode = self._keys(prefix)
        return (mode, *_prefix_range(keys, key))

    def order(self, mode: str) -> Tensor:
        """(S,) the suggestable ids in the string order prefixes typed in ``mode`` are
        matched in: the words of a ``pool`` are a contiguous run of it."""
        return self._sorted(mode)[1]

    def prefix_ids(self, prefix: str, after: str | None = None) -> tuple[Tensor, str]:
        """Ids of the suggestable words matching ``prefix`` (every spelling), but no
        clitic that cannot follow the word ``after``, and the case mode."""
        mode, lo, hi = self.pool(prefix)
        ids = self.order(mode)[lo:hi]
        misfits = self.misfits(after) if prefix[:1] in ("", "'") else self._none
        if misfits.numel():
            ids = ids[~torch.isin(ids, misfits)]
        return ids, mode

    def misfits(self, after: str | None) -> Tensor:
        """Ids of the clitics that cannot follow the word ``after`` (None: no word before),
        ascending. One ``host_fits`` call per kind of clitic, the ids cached per answer."""
        if after is None or not self._clitic_kinds:
            return self._none
        fits = tuple(host_fits(after, kind) for kind in self._clitic_kinds)
        ids = self._misfit_ids.get(fits)
        if ids is None:
            parts = [group for group, ok in zip(self._clitic_kinds.values(), fits) if not ok]
            ids = self._misfit_ids[fits] = torch.cat(parts).sort().values if parts else self._none
        return ids

    def whole_and_longer(self, log_probs: Tensor, prefix: str) -> tuple[float, float]:
        """From (V,) log-probabilities: the probability of ``prefix`` as a whole word and
        that of the longer words it begins, in the spellings its case mode matches."""
        keys, ids, key, _ = self._keys(prefix)
        lo, hi = _prefix_range(keys, key)
        same = bisect.bisect_right(keys, key, lo, hi)  # the word itself sorts first in its range
        probs = log_probs[ids[lo:hi]].exp()  # (R,)
        return float(probs[: same - lo].sum()), float(probs[same - lo:].sum())

    def visible(self, log_probs: Tensor, after: Sequence[str | None]) -> Tensor:
        """(B, V) log-probabilities, row b after the word ``after[b]`` -> (B, V)
        probabilities of the words that may be shown there: 0 for words never suggested
        and for clitics that cannot follow the row's word (``misfits``)."""
        probs = log_probs.exp()
        probs[:, self._hidden] = 0.0
        misfits = [self.misfits(a) for a in after]
        counts = torch.tensor([m.numel() for m in misfits])
        if counts.any():
            probs[torch.arange(len(misfits)).repeat_interleave(counts), torch.cat(misfits)] = 0.0
        return probs

    def merged(self, probs: Tensor, mode: str, ids: Tensor | None = None) -> Tensor:
        """(B, V) probabilities, or (B, R) those of the words ``ids`` ((R,) or (B, R)),
        -> the same shape: at the representative of each group of words shown alike
        (``groups[mode]``, mode "next" or a case mode) the sum of its words'
        probabilities, 0 at its other words. With ``ids``, a group counts the words of
        it among them (a prefix's words hold whole groups: a group shares its lower-case
        form). Mode "exact" merges nothing."""
        if mode == "exact":
            return probs
        if ids is None:  # most words are a group of their own: move the others' mass only
            others, reps = self._others[mode]
            total = probs.clone().index_add_(1, reps, probs[:, others])
            total[:, others] = 0.0
            return total
        ids = ids.expand_as(probs)
        total = probs.new_zeros(probs.size(0), self.suggestable.numel())
        return total.scatter_add_(1, self.groups[mode][ids], probs).gather(1, ids)

    def standing_for(self, probs: Tensor, groups: Tensor) -> Tensor:
        """(B, V) probabilities and (B, K) next-word groups -> (B, K): the word each
        group's suggestion stands for, the likeliest of its words in the row (equal:
        the lower id). It decides how the choice joins the text: after "It is 3", ","
        stands for "@,@" ("3,000")."""
        members = self._members[groups]  # (B, K, M)
        p = probs.gather(1, members.flatten(1)).view(members.shape)
        return members.gather(2, p.argmax(2, keepdim=True)).squeeze(2)  # argmax: the first of equals

    def next_words(self, log_probs: Tensor, k: int, after: str | None = None) -> list[Choice]:
        """The k most likely next words from (V,) log-probabilities after the word
        ``after``, words shown alike merged (``standing_for`` says which one a choice is)."""
        probs = self.visible(log_probs.unsqueeze(0), [after])  # (1, V)
        merged = self.merged(probs, "next")[0]
        top = torch.topk(merged, min(k, self._n_shown - self.misfits(after).numel()))  # a clitic is a group of its own
        words = self.tok.words
        stands = self.standing_for(probs, top.indices.unsqueeze(0))[0]
        return [Choice(self.tok.display([words[i]]), p, (words[i],))
                for p, i in zip(top.values.tolist(), stands.tolist())]

    def completions(self, log_probs: Tensor, prefix: str, k: int, after: str | None = None) -> list[Choice]:
        """The k most likely words completing ``prefix`` after the word ``after``,
        spellings shown alike merged."""
        ids, mode = self.prefix_ids(prefix, after)
        if ids.numel() == 0:
            return []
        probs = self.merged(log_probs[ids].exp().unsqueeze(0), mode, ids)[0]  # (R,)
        if mode != "exact":  # one row per group: its representative
            keep = self.groups[mode][ids] == ids
            ids, probs = ids[keep], probs[keep]
        top = torch.topk(probs, min(k, ids.numel()))
        out = []
        for p, j in zip(top.values.tolist(), top.indices.tolist()):
            word = self.shown(self.tok.words[int(ids[j])], mode, prefix)
            out.append(Choice(word, p, (word,)))
        return out


class Predictor:
    """Next words, completions and phrases for a text typed keystroke by keystroke.

    The text has a committed part (fixed context: ``feed_words``, ``commit``) and a live
    part that ``update`` re-syncs after each keystroke. ``model_calls`` counts the model
    calls made over the text (benchmarks and tests read it). ``block`` lists words never
    to suggest; a shared ``index`` (which holds its own block list) replaces it. Not
    thread-safe: use one predictor per thread (``fork``, ``snapshot``)."""

    def __init__(self, model: LSTMLM, tokenizer: Tokenizer, *, index: WordIndex | None = None,
                 memory: NeuralCache | None = None, block: Iterable[str] = ()):
        if tokenizer.subword:
            raise LMError(f"autocomplete needs a word-level model, and this one uses {tokenizer.kind} "
                          "subwords: train one with --kind word")
        self.model = model.eval()
        self.tok = tokenizer
        self.index = index or WordIndex(tokenizer, block)
        self.memory = memory
        self.device = next(model.parameters()).device
        self.model_calls = 0
        dim = model.layers[-1].hidden_size
        self._learned = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))  # (M, D), (M,)
        features, state = self._run([tokenizer.eos_id], None)
        self._start = (features[0], state)
        self._new_text()

    def fork(self) -> "Predictor":
        """A predictor over the same model, index and learned memory with an empty text
        of its own; costs no model work."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        m = self.memory
        other.memory = None if m is None else NeuralCache(m.window, m.theta, m.lam, m.dim)
        other._new_text()
        return other

    def snapshot(self) -> "Predictor":
        """A frozen copy of the current position for another thread (the REPL searches
        phrases in the background while typing goes on): its suggestions and phrases
        are this position's. It shares tensors with this predictor; those it reads are
        never changed in place, here or in ``NeuralCache``."""
        n = len(self._ids)
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other.memory = copy.copy(self.memory)
        other._words, other._ids = list(self._words), list(self._ids)
        other._states = {n: self._state(n)}
        other._memo = OrderedDict({n: self.log_probs()})
        return other

    # -- the text ------------------------------------------------------------------------
    def _new_text(self) -> None:
        f0, s0 = self._start
        self._words: list[str] = []  # fed words: committed, then the live text's finished ones
        self._ids: list[int] = []
        self._committed = 0  # how many of them are committed
        self._partial = ""  # the live text's unfinished last word
        self._features = f0.new_empty(64, f0.numel())  # row p: f_p, for p = 0 .. len(ids); grows
        self._features[0] = f0
        self._states: dict[int, Hidden] = {0: s0}  # sparse: see TAIL and STRIDE
        self._memo: OrderedDict[int, Tensor] = OrderedDict()  # position -> (V,) log-probs
        if self.memory is not None:
            self._rebuild_memory(0)

    def reset(self) -> None:
        """Start a new, empty text. The session memory keeps what was typed."""
        if self.memory is not None and self._ids:
            self._add_learned(self._features[: len(self._ids)], torch.tensor(self._ids))
        self._new_text()

    @property
    def words(self) -> list[str]:
        """The finished words of the text (as split for the model)."""
        return list(self._words)

    @property
    def partial(self) -> str:
        """The unfinished word at the end of the live text ("" at a word boundary), as
        typed (a lower-case model reads it folded)."""
        return self._partial

    def text(self) -> str:
        """The text as natural text (display rules), unfinished word included."""
        return self.tok.display(self._words + ([self._partial] if self._partial else []))

    def split_partial(self, text: str) -> tuple[list[str], str]:
        """(finished words, unfinished word) of typed natural text by the keyboard rule
        (see the module docstring): "Hello, wor" -> (["Hello", ","], "wor"). The
        finished words are as the model reads them, the unfinished one as typed: a
        lower-case model gets ["the"] and "Pres" from "The Pres"."""
        text = CONTROL.sub(" ", text)
        words = self.tok.typed_words(text)
        if not words or text[-1].isspace():
            return words, ""
        inside = text[-1] in "'\u2019" or unicodedata.category(text[-1])[0] in "LNM"
        if not inside:
            return words, ""
        return words[:-1], self._as_typed(text, words[-1]) if self.tok.lowercase else words[-1]

    @staticmethod
    def _as_typed(text: str, word: str) -> str:
        """The last word of ``text``, which a lower-case tokenizer read as ``word``, in
        its typed casing. The end of the text is enough: the split of a word depends on
        at most a few characters before it."""
        for tail in (text[-2 * len(word) - 8:], text):
            typed = pretokenize(tail).split()
            if typed and typed[-1].lower() == word:
                return typed[-1]
        return word

    def _read(self, word: str) -> str:
        """A word as the model reads it."""
        return word.lower() if self.tok.lowercase else word

    def update(self, text: str, *, complete_known: bool = False) -> None:
        """Re-sync to the live ``text`` (everything after the committed part) after a
        keystroke, an edit or a paste: only words after the common prefix are fed.
        ``complete_known`` picks the one-shot rule."""
        words, self._partial = self.split_partial(text)
        if complete_known and self._read(self._partial) in self.tok.word_to_id:
            self._sync(words)
            if self._stands_alone(self._partial):
                words, self._partial = words + [self._read(self._partial)], ""
        self._sync(words)

    def _stands_alone(self, word: str) -> bool:
        """The one-shot rule for a vocabulary word ending the text: the longer words it
        begins are at most ODDS times as likely here as the word itself."""
        lp = self.log_probs()
        whole, longer = self.index.whole_and_longer(lp, word)
        whole = max(whole, lp[self.tok.word_to_id[self._read(word)]].exp().item())  # a blocked word is still a word
        return longer <= ODDS * whole

    def commit(self) -> None:
        """The live text becomes fixed context; an unfinished word joins it as typed."""
        if self._partial:
            self._sync(self._words[self._committed:] + [self._read(self._partial)])
            self._partial = ""
        self._committed = len(self._ids)

    def feed_words(self, words: list[str]) -> None:
        """Commit the live text, then append already split ``words`` to it."""
        self.commit()
        self._sync(list(words))
        self._committed = len(self._ids)

    def complete_text(self, text: str, k: int) -> Suggestions:
        """Suggestions after ``text`` from a fresh context, by the one-shot rule."""
        self.reset()
        self.update(text, complete_known=True)
        return self.suggest(k)

    def _sync(self, live: list[str]) -> None:
        """Make the fed words the committed ones followed by ``live``."""
        c = self._committed
        get, unk = self.tok.word_to_id.get, self.tok.unk_id
        ids = [get(w, unk) for w in live]
        n = c
        while n < len(self._ids) and n - c < len(ids) and self._ids[n] == ids[n - c]:
            n += 1
        if n < len(self._ids):
            self._rewind(n)
        if n - c < len(ids):
            self._feed(ids[n - c:])
        del self._words[c:]
        self._words.extend(live)

    def _rewind(self, n: int) -> None:
        """Forget positions after n: their words, features, states and memory pairs."""
        forgets = len(self._ids) > n  # the memory holds a pair for every fed position
        del self._ids[n:]  # feature rows after n are now free to overwrite
        for p in [p for p in self._states if p > n]:
            del self._states[p]
        for p in [p for p in self._memo if p > n]:
            del self._memo[p]
        if forgets and self.memory is not None:
            self._rebuild_memory(n)

    def _feed(self, ids: list[int]) -> None:
        """Append ``ids`` with one model call, starting from the nearest kept state."""
        n = len(self._ids)
        base = max(p for p in self._states if p <= n)
        features, state = self._run(self._ids[base:n] + ids, self._states[base])  # (n - base + T, D)
        self._ids.extend(ids)
        m = len(self._ids)
        if m + 1 > self._features.size(0):  # double: appending stays amortised O(1)
            grown = self._features.new_empty(max(m + 1, 2 * self._features.size(0)), self._features.size(1))
            grown[: n + 1] = self._features[: n + 1]
            self._features = grown
        self._features[n + 1 : m + 1] = features[n - base:]
        self._states[m] = state
        for p in [p for p in self._states if p % STRIDE and p < m - TAIL]:
            del self._states[p]
        if self.memory is not None:
            self.memory.add(self._features[n:m], torch.tensor(ids))

    def _state(self, n: int) -> Hidden:
        """The LSTM state after the first n fed words, replayed from the nearest kept one."""
        if n not in self._states:
            base = max(p for p in self._states if p <= n)
            _, self._states[n] = self._run(self._ids[base:n], self._states[base])
        return self._states[n]

    @torch.inference_mode()
    def _run(self, ids: list[int], state: Hidden | None) -> tuple[Tensor, Hidden]:
        """Features (T, D) of the model over ``ids`` from ``state``, and the state after."""
        self.model_calls += 1
        features = []
        for f, state in self.model.read(ids, state):
            features.append(f.float().cpu())
        return torch.cat(features), state

    # -- session memory ------------------------------------------------------------------
    @torch.inference_mode()
    def learn(self, text: str) -> int:
        """Prime the memory with the user's own ``text``; returns the number of pairs
        kept (its last ``window`` words, read with ``WARMUP`` words of context first)."""
        if self.memory is None:
            raise LMError("session learning is off (--cache-lambda 0): nothing to learn into")
        words = self.tok.encode_typed(text)
        if not any(i != self.tok.eos_id for i in words):
            raise LMError("the text has no words to learn from")
        ids = [self.tok.eos_id] + words + [self.tok.eos_id]
        ids = ids[-(self.memory.window + WARMUP + 1):]
        features, _ = self._run(ids[:-1], None)  # (T, D): features[i] predicts ids[i + 1]
        keep = min(self.memory.window, len(ids) - 1)
        self._add_learned(features[-keep:], torch.tensor(ids[-keep:]))
        self._memo.clear()
        self._rebuild_memory(len(self._ids))
        return keep

    def _add_learned(self, keys: Tensor, ids: Tensor) -> None:
        window = self.memory.window
        self._learned = (torch.cat([self._learned[0], keys])[-window:], torch.cat([self._learned[1], ids])[-window:])

    def _rebuild_memory(self, n: int) -> None:
        """The memory as it is after position n: the learned pairs, then the text's."""
        self.memory.reset()
        self.memory.add(*self._learned)
        lo = max(0, n - self.memory.window)
        if n > lo:
            self.memory.add(self._features[lo:n], torch.tensor(self._ids[lo:n]))

    # -- predictions ---------------------------------------------------------------------
    def log_probs(self) -> Tensor:
        """(V,) log-probabilities of the next word at the current position (memory mixed
        in). Computed once per position; the last ``MEMO`` positions are kept."""
        n = len(self._ids)
        lp = self._memo.get(n)
        if lp is None:
            lp = self._distribution(self._features[n].unsqueeze(0))[0]
            self._memo[n] = lp
            while len(self._memo) > MEMO:
                self._memo.popitem(last=False)
        return lp

    @torch.inference_mode()
    def _distribution(self, features: Tensor) -> Tensor:
        """(N, D) features -> (N, V) log-probabilities, the memory mixed in."""
        features = features.to(self.device)
        lp = self.model.log_probs(features).float()
        if self.memory is not None and len(self.memory):
            # weight r on the cache's mixture, 1 - r on the model alone: the memory's
            # weight is lambda * r (see RAMP); r = 0 leaves the model's distribution
            r = len(self.memory) / (len(self.memory) + RAMP)
            lp = torch.logaddexp(self.memory.mix(lp, features.float()) + math.log(r), lp + math.log1p(-r))
        return lp.cpu()

    @property
    def _last(self) -> str | None:
        """The word before the current position, which decides the clitics offered."""
        return self._words[-1] if self._words else None

    def next_words(self, k: int) -> list[Choice]:
        return self.index.next_words(self.log_probs(), k, self._last)

    def completions(self, prefix: str, k: int) -> list[Choice]:
        """The k most likely words starting with ``prefix`` at the current position."""
        return self.index.completions(self.log_probs(), prefix, k, self._last)

    def suggest(self, k: int) -> Suggestions:
        """What a keyboard shows now: completions inside a word, else next words."""
        if self._partial:
            return Suggestions("complete", self._partial, self.completions(self._partial, k))
        return Suggestions("next", "", self.next_words(k))

    @torch.inference_mode()
    def phrases(self, k: int = 3, n_words: int = 3) -> list[Choice]:
        """Up to k likely continuations of ``n_words`` words (inside a word, the first
        completes it), by a beam search of width k over the joint probability; phrases
        shown alike are merged. Costs n_words - 1 model steps of batch k."""
        first, mode = self.index.prefix_ids(self._partial, self._last)
        mode = mode if self._partial else ""
        if first.numel() == 0:
            return []
        scores = self.log_probs()[first]  # (R,)
        top = torch.topk(scores, min(k, first.numel()))
        beams, scores = first[top.indices].unsqueeze(1), top.values  # (W, 1), (W,)
        state = self._state(len(self._ids))
        W = beams.size(0)
        hidden = [(h.expand(-1, W, -1).contiguous(), c.expand(-1, W, -1).contiguous()) for h, c in state]
        for _ in range(n_words - 1):
            features, hidden = self.model(beams[:, -1:].to(self.device), hidden)  # (W, 1, D)
            lp = self._distribution(features[:, 0]).masked_fill(~self.index.suggestable, float("-inf"))  # (W, V)
            top = torch.topk((scores.unsqueeze(1) + lp).flatten(), W)
            src, word = top.indices // lp.size(1), top.indices % lp.size(1)
            beams, scores = torch.cat([beams[src], word.unsqueeze(1)], dim=1), top.values
            hidden = [(h[:, src.to(self.device)], c[:, src.to(self.device)]) for h, c in hidden]
        merged: dict[tuple[str, ...], float] = {}
        for row, score in zip(beams.tolist(), scores.exp().tolist()):
            tokens = [self.tok.words[i] for i in row]
            if mode:
                tokens[0] = self.index.shown(tokens[0], mode, self._partial)
            merged[tuple(tokens)] = merged.get(tuple(tokens), 0.0) + score
        ranked = sorted(merged.items(), key=lambda kv: -kv[1])
        return [Choice(self.tok.display(list(t)), p, t) for t, p in ranked]

    # -- accepting a suggestion ----------------------------------------------------------
    def accept(self, text: str, choice: Choice) -> str:
        """``text`` after accepting ``choice``: an unfinished word at the end is replaced,
        the choice is joined by the display rules ("Hello" + "," -> "Hello,"), though
        a space the user typed stays unless the choice glues to the word before it,
        and a space follows unless the choice glues to what comes next ("(", "-")."""
        words, partial = self.split_partial(text)
        after = " " if self.tok.display([choice.tokens[-1], "x"]).endswith(" x") else ""
        start = _start_of(text, partial) if partial else None
        if start is not None:
            return text[:start] + choice.text + after
        prev = words[-8:]
        left, both = self.tok.display(prev), self.tok.display(prev + list(choice.tokens))
        if prev and both.startswith(left):
            glues = not self.tok.display(["x", choice.tokens[0]]).startswith("x ")  # ",", "'s"
            if text[-1].isspace() and not glues:  # the space typed after "(" stays: "( a"
                return text + both[len(left):].lstrip() + after
            return text.rstrip() + both[len(left):] + after
        sep = "" if not text or text[-1].isspace() else " "
        return text + sep + choice.text + after


def _start_of(text: str, partial: str) -> int | None:
    """Where the unfinished word ``partial`` starts at the end of ``text``, which may
    hold characters the split drops: "the pre\u00ads" (a soft hyphen) ends in "pres"."""
    n, key = len(partial), partial.lower()
    text = text.replace("\u2019", "'")  # a typed "it’" reads as "it'" (Tokenizer.typed_words); same length
    if text[-n:].lower() == key:
        return len(text) - n
    for i in range(len(text) - n - 1, max(-1, len(text) - 4 * n - 16), -1):  # the shortest end that reads so
        if pretokenize(text[i:]).lower() == key:
            return i
    return None


def keystroke_latency(predictor: Predictor, text: str, max_chars: int = 20_000, k: int = 5,
                      clock=time.perf_counter) -> dict:
    """Per-keystroke latency of typing ``text`` (natural text) character by character
    through ``update`` and ``suggest``, as the live REPL does; a newline commits the line.
    A keystroke is at a word boundary when the model read words (a space or punctuation
    after a word, or the letter that turns "3." into "3.5"), else inside a word. Times
    are in milliseconds on one thread (``clock=time.thread_time`` counts this thread's
    CPU time only: a figure for a machine busy with other work); the caller's thread
    setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    predictor.reset()
    times: dict[str, list[float]] = {"inside_word": [], "boundary": []}
    line = ""
    try:
        for ch in text[:max_chars]:
            calls = predictor.model_calls
            start = clock()
            if ch == "\n":
                predictor.update(line)
                predictor.commit()
                line = ""
            else:
                line += ch
                predictor.update(line)
            predictor.suggest(k)
            ms = (clock() - start) * 1e3
            times["boundary" if predictor.model_calls != calls else "inside_word"].append(ms)
    finally:
        torch.set_num_threads(threads)
    out: dict = {"chars": min(len(text), max_chars), "vocab": predictor.tok.vocab_size, "k": k}
    for kind, ts in times.items():
        ts.sort()
        pick = (lambda q: round(ts[min(len(ts) - 1, int(q * len(ts)))], 3)) if ts else (lambda q: None)
        out[kind] = {"keystrokes": len(ts), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0)}
    return out
