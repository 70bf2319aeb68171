"""SentencePiece tokenizer wrapper: train, encode, decode, bytes round trip, special ids.

Word level (``kind="word"``) reproduces the standard benchmark streams exactly: split each
line on whitespace, one ``<eos>`` per line (blank lines too), and words outside the
training vocabulary map to ``<unk>``, one for one. SentencePiece builds and serializes the
vocabulary (its ``word`` model, identity normalization), but encoding goes through the
model's own piece table rather than ``SentencePieceProcessor.encode``: that encoder
merges a run of unknown words into a single ``<unk>``, which would change the token count
and so the perplexity. The table lookup is also about 4x faster than per-word calls.

Subword (``kind="unigram"`` or ``"bpe"``) gives an open vocabulary: SentencePiece pieces
with byte fallback, so no text is ever unknown; the corpus's own ``<unk>`` words still map
to ``<unk>`` one for one, and each line still ends in one ``<eos>``.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import re
import sys
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from lm.config import TokenizerConfig
from lm.errors import DataError, LMError
from lm.text import detokenize, pretokenize

UNK, EOS = "<unk>", "<eos>"
SUBWORD_KINDS = ("unigram", "bpe")
DEFAULT_SUBWORD_VOCAB = 8000  # pieces, when --vocab-size is 0 for a subword tokenizer
SUBWORD_SAMPLE = 2_000_000  # training lines SentencePiece samples (bounds its memory)
MAX_WORD_CHARS = 512  # SentencePiece's limit; longer words map to <unk>
# A "’" just typed after a letter, at the end of the text: an apostrophe being typed ("don’"
# before the "t"), even inside a "‘" quote, where pretokenize would read it as the closing mark.
_CURLY_APOSTROPHE_TYPED = re.compile(r"(?<=[^\W\d_])\u2019$")
_WS = "\u2581"  # SentencePiece's word-boundary marker, prefixed to every word piece


class Tokenizer:
    """Maps text to token ids and back. Everything it needs is in ``model_bytes`` and
    its text convention: ``tokenized`` text (the benchmark corpora) is used as it is,
    ``raw`` prose is split WikiText-style first (``lm.text.pretokenize``); ``lowercase``
    folds case everywhere. What a user types is always pretokenized, so "world," meets
    the vocabulary's "world" and ",", whichever convention the model was trained on."""

    def __init__(self, model_bytes: bytes, kind: str = "word", text: str = "tokenized", lowercase: bool = False):
        self.kind, self.text, self.lowercase = kind, text, lowercase
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.unk_id = self.sp.unk_id()
        self.eos_id = self.sp.eos_id()
        n = self.sp.get_piece_size()
        # Display form of each id: "▁the" -> "the"; specials keep their names.
        self.words: list[str] = [self._display(self.sp.id_to_piece(i)) for i in range(n)]
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.words)
                                           if i not in (self.unk_id, self.eos_id)}
        self.word_to_id[UNK] = self.unk_id  # the corpora's own <unk> is our <unk>

    def _display(self, piece: str) -> str:
        return piece[1:] if piece.startswith(_WS) and len(piece) > 1 else piece

    # -- training --------------------------------------------------------------------
    @classmethod
    def train(cls, lines: Iterable[str], cfg: TokenizerConfig | None = None) -> "Tokenizer":
        """Build the vocabulary from training lines only (frequency order, so that the
        adaptive softmax can cut it into clusters by id)."""
        cfg = cfg or TokenizerConfig()
        cfg.validate()
        prepare = _preparer(cfg.text, cfg.lowercase)
        if prepare:
            lines = map(prepare, lines)
        if cfg.kind in SUBWORD_KINDS:
            return cls._train_subword(lines, cfg)
        counts: collections.Counter[str] = collections.Counter()
        for line in lines:  # streamed: memory grows with the vocabulary, not the corpus
            counts.update(line.split())
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        if not counts:
            raise DataError("the training split has no words: nothing to build a vocabulary from")
        n_words = sum(1 for c in counts.values() if c >= cfg.min_count)
        if cfg.vocab_size:
            n_words = min(n_words, cfg.vocab_size - 2)
        use_all = n_words == len(counts)
        if n_words == 0:
            raise DataError(f"no training word occurs at least --min-count {cfg.min_count} times")
        # SentencePiece reads (word, count) pairs as TSV, so it never sees the corpus itself
        rows = (f"{w}\t{c}" for w, c in counts.items())
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=rows, input_format="tsv", model_writer=model, model_type="word",
                vocab_size=n_words + 2, use_all_vocab=use_all, hard_vocab_limit=False,
                normalization_rule_name="identity", remove_extra_whitespaces=True,
                character_coverage=1.0, max_sentencepiece_length=MAX_WORD_CHARS, max_sentence_length=1 << 30,
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, unk_piece=UNK, eos_piece=EOS,
                split_digits=False, num_threads=2, minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(f"SentencePiece could not build a vocabulary: {str(e).splitlines()[0]}") from None
        return cls(model.getvalue(), cfg.kind, cfg.text, cfg.lowercase)

    @classmethod
    def _train_subword(cls, lines: Iterable[str], cfg: TokenizerConfig) -> "Tokenizer":
        # The corpus's own <unk> words are not text to learn pieces from.
        kept = (" ".join(w for w in line.split() if w != UNK) for line in lines)
        kept = (line for line in kept if line)
        first = next(kept, None)
        if first is None:
            raise DataError("the training split has no words: nothing to build a vocabulary from")
        model, raised, asked = io.BytesIO(), [], cfg.vocab_size or DEFAULT_SUBWORD_VOCAB

        def sentences() -> Iterator[str]:  # SentencePiece turns an error here into its own
            try:
                yield from itertools.chain([first], kept)
            except LMError as e:  # e.g. --strict meeting invalid UTF-8
                raised.append(e)
                raise

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=model, model_type=cfg.kind,
                vocab_size=asked, hard_vocab_limit=False,
                byte_fallback=True, normalization_rule_name="identity", character_coverage=0.9995,
                input_sentence_size=SUBWORD_SAMPLE, shuffle_input_sentence=True, max_sentence_length=1 << 16,
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, unk_piece=UNK, eos_piece=EOS, unk_surface=UNK,
                num_threads=2, minloglevel=2,
            )
        except RuntimeError as e:
            if raised:
                raise raised[0] from None
            # Every character of the text's 99.95% coverage needs a piece of its own (the
            # rest go to byte pieces); SentencePiece names the total, which lm can act on.
            need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if need:
                raise DataError(f"{'--vocab-size' if cfg.vocab_size else 'the default --vocab-size'} {asked} "
                                f"is too small for this text: a {cfg.kind} vocabulary of it needs at least "
                                f"{need[1]} pieces (256 byte pieces, <unk>, <eos> and one per character "
                                f"but the rarest); pass --vocab-size {need[1]} or more") from None
            raise DataError(f"SentencePiece could not build a vocabulary: {str(e).splitlines()[0]}") from None
        tokenizer = cls(model.getvalue(), cfg.kind, cfg.text, cfg.lowercase)
        tokenizer.note_if_cut(cfg)
        return tokenizer

    def note_if_cut(self, cfg: TokenizerConfig) -> None:
        """One line on stderr when a subword vocabulary is smaller than the --vocab-size
        asked for: SentencePiece stops where the text offers no more pieces, and the
        user should not have to find that out from the model's size."""
        if self.subword and 0 < self.vocab_size < cfg.vocab_size:
            print(f"lm: this text supports only {self.vocab_size:,} {self.kind} pieces: the vocabulary "
                  f"has {self.vocab_size:,}, not the --vocab-size {cfg.vocab_size:,} asked for", file=sys.stderr)

    # -- encoding --------------------------------------------------------------------
    @property
    def subword(self) -> bool:
        return self.kind in SUBWORD_KINDS

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode_line(self, line: str) -> list[int]:
        """Ids of one line, without the trailing <eos>."""
        return next(self.encode_lines([line]))[:-1]

    def prepare(self, lines: Iterable[str]) -> Iterable[str]:
        """Corpus lines as this tokenizer reads them: split WikiText-style when the text is
        raw, case-folded with ``lowercase``; their whitespace-separated words are what a
        word-level model with the same convention scores."""
        prepare = _preparer(self.text, self.lowercase)
        return map(prepare, lines) if prepare else lines

    def encode_lines(self, lines: Iterable[str]) -> Iterator[list[int]]:
        """Ids of each line followed by <eos>: the standard stream, one list per line."""
        lines = self.prepare(lines)
        if self.subword:
            yield from self._encode_subword(lines)
            return
        get, unk, eos = self.word_to_id.get, self.unk_id, self.eos_id
        for line in lines:
            ids = [get(w, unk) for w in line.split()]
            ids.append(eos)
            yield ids

    def _encode_subword(self, lines: Iterable[str], batch: int = 4096) -> Iterator[list[int]]:
        """SentencePiece in batches (its encoder runs them on several threads); each line
        is cut at the corpus's literal <unk> words, which become the <unk> id."""
        it = iter(lines)
        while block := list(itertools.islice(it, batch)):
            parts = [line.split(UNK) for line in block]
            encoded = iter(self.sp.encode([" ".join(p.split()) for ps in parts for p in ps]))
            for ps in parts:
                ids: list[int] = []
                for j in range(len(ps)):
                    if j:
                        ids.append(self.unk_id)
                    ids.extend(next(encoded))
                ids.append(self.eos_id)
                yield ids

    def typed_words(self, text: str) -> list[str]:
        """What a user typed, split as the training text was: "Hello, world." ->
        ["Hello", ",", "world", "."]. A typographic apostrophe inside or at the end of a
        word (phones and macOS type "it’s") is read as the corpus's "'": "it 's", the
        form WikiText holds thousands of times, not "it ’ s" (``pretokenize``'s rule, as
        for training text; one that ends the text is always an apostrophe: "‘I don’")."""
        text = pretokenize(_CURLY_APOSTROPHE_TYPED.sub("'", text))
        return (text.lower() if self.lowercase else text).split()

    def encode_typed(self, text: str) -> list[int]:
        """Ids of typed text (pretokenized whatever the convention); a newline is <eos>."""
        lines = [" ".join(self.typed_words(line)) for line in text.split("\n")]
        if self.subword:
            ids = [i for line in self._encode_subword(lines) for i in line]
        else:
            get, unk = self.word_to_id.get, self.unk_id
            ids = [get(w, unk) if w != EOS else self.eos_id for w in f" {EOS} ".join(lines).split()] + [self.eos_id]
        return ids[:-1]

    def display(self, words: list[str]) -> str:
        """Tokens as natural text: "Hello , world ." -> "Hello, world."."""
        return detokenize(words)

    def render(self, ids: list[int]) -> str:
        """Ids as natural text, for people: words joined by the WikiText display rules,
        pieces by SentencePiece; <eos> is a newline."""
        if self.subword:
            return self.decode(ids)
        return detokenize([EOS if i == self.eos_id else self.words[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces; <eos> becomes a newline."""
        if self.subword:  # pieces per line, the corpus's <unk> words kept as words
            lines: list[list[list[int]]] = [[[]]]
            for i in ids:
                if i == self.eos_id:
                    lines.append([[]])
                elif i == self.unk_id:
                    lines[-1].append([])
                else:
                    lines[-1][-1].append(i)
            return "\n".join(f" {UNK} ".join(self.sp.decode(seg) for seg in segs).strip() for segs in lines)
        out: list[str] = []
        for i in ids:
            out.append("\n" if i == self.eos_id else self.words[i])
        return " ".join(out).replace(" \n ", "\n").replace(" \n", "\n").replace("\n ", "\n")

    # -- serialization ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model_bytes, "text": self.text, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        return cls(d["model"], d.get("kind", "word"), d.get("text", "tokenized"), d.get("lowercase", False))

    @property
    def fingerprint(self) -> str:
        """Changes whenever encoding could: the vocabulary, kind or text convention."""
        h = hashlib.sha256(self.model_bytes)
        h.update(f"|{self.kind}|{self.text}|{self.lowercase}".encode())
        return h.hexdigest()[:16]


def _preparer(text: str, lowercase: bool):
    """The per-line preparation a text convention needs, or None when lines are used as
    they are (the benchmark path stays a plain split)."""
    if text == "raw":  # split first, then fold: the split reads case ("quietly. In" ends a sentence)
        return (lambda line: pretokenize(line).lower()) if lowercase else pretokenize
    return str.lower if lowercase else None
