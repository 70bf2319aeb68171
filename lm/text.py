"""Natural text <-> WikiText-style tokens.

WikiText was tokenized with the Moses tokenizer (English rules, aggressive hyphen
splitting), then number separators were marked. ``pretokenize`` reproduces that so
natural input matches a WikiText vocabulary; ``detokenize`` undoes it for display::

    "Hello, well-known world. It's 3.5 km (1,000 m) away!"
    "Hello , well @-@ known world . It 's 3 @.@ 5 km ( 1 @,@ 000 m ) away !"

The rules, in the order they run:

* Invisible characters go: control characters, the soft hyphen, direction marks and
  word joiners (``inter\u00adnational`` is one word). A zero-width space separates
  words; the zero-width (non-)joiner belongs to its word, as in Persian ``می‌خواهم``.
  U+FEFF stays: WikiText keeps it as a token of its own.
* Text is put in Unicode's composed form (NFC), as corpora are: a letter typed as a
  base letter plus a combining accent is the corpus's accented letter.
* E-mail addresses and URLs (``bob@example.com``, ``https://example.com/a?b=1``,
  ``www.example.com``) are one token each; a period or bracket after one is not its own.
* A typographic apostrophe is the corpus's ``'``: ``ʼ`` (U+02BC) everywhere, ``’`` (U+2019)
  inside a word, at its start (``’tis``, ``’90s``) or at its end (``Girls’``), and ``‘``
  (U+2018) between two letters (``don‘t``), so ``It’s`` splits as ``It 's``, as ``It's`` does.
  A word-final ``’`` that closes a ``‘`` opened earlier on the line is a quotation mark
  and stays one (``‘quoted’``), unless a later ``’`` after punctuation closes it instead
  (``‘The Girls’ team won,’``).
* Every symbol that is not a letter, digit, space, ``. ' ` , -`` is its own token:
  ``( ) " ; : ! ? % $ & / – —`` and so on; an emoji is one token with all it is made of
  (``👍🏽``, ``👨‍👩‍👧``, ``🇬🇧``, ``#️⃣``). ``<unk>`` stays one token.
* A hyphen between two letters or digits becomes ``@-@``; other hyphens stay put.
* A run of two or more dots (``...``) is its own token.
* A comma or period between digits becomes ``@,@`` / ``@.@``; other commas split off.
* ``X'Y`` splits before the apostrophe when ``'Y`` is a clitic (``it 's``, ``don 't``
  -- WikiText splits before the apostrophe, not before ``n``). Other apostrophes
  split off on both sides (``Girls '``, ``' quoted '``).
* A word-final period splits off, except after an abbreviation with an inner period
  (``U.S.``, ``e.g.``), a Moses non-breaking prefix (``Dr.``, ``St.``, ``A.``; ``No.``
  only before a number), or a common abbreviation before a word in lower case (``Jr. and``,
  ``etc. and``, ``et al. found``). Moses keeps the period before any lower-case word;
  in WikiText that is nearly always such an abbreviation (Wikipedia's sentences start with
  a capital), but in chat and notes it is a sentence end (``ok. see you``), so we keep it
  only after known ones.

One deliberate difference: WikiText also splits ``O'Brien`` as ``O 'Brien``. We keep
such words whole. Split, ``O 'Brien`` looks just like a quote opened after a word
(``said 'Hello``), which the quote rule splits again (``said ' Hello``), so
pretokenizing twice would not give the same result as pretokenizing once.
"""
from __future__ import annotations

import itertools
import re
import unicodedata

_PH = "\uFDD0"  # a Unicode noncharacter standing in for <unk> while regexes run
_LINK_PH = "\uFDD1"  # another, for each e-mail address or URL (put back at the end)
_WORD_PH = _PH + _LINK_PH  # both are read as letters


def _chars(category_prefix: str) -> str:
    # The Basic Multilingual Plane only: a class wholly inside it compiles to a bitmap,
    # about ten times faster than one with astral characters.
    chars = (chr(c) for c in range(0x10000))
    return "".join(c for c in chars if unicodedata.category(c).startswith(category_prefix))


# Python's \w misses combining marks (Moses counts them as letters) and includes
# numeric symbols such as "²" and "½" (Moses splits those off).
# The zero-width non-joiner and joiner shape the letters around them: marks too. The
# variation selectors and the keycap mark belong to the emoji before them (_EMOJI), not
# to a word, so an apostrophe after "❤️" is read as after "❤", on every pass.
_EMOJI_MARKS = "".join(map(chr, range(0xFE00, 0xFE10))) + "\u20e3"
_MARKS = re.escape("".join(c for c in _chars("M") if c not in _EMOJI_MARKS) + "\u200c\u200d")
_NUM_SYMBOLS = re.escape(_chars("No"))
_LETTER = rf"(?:(?![{_NUM_SYMBOLS}])[^\W\d_]|[{_MARKS}{_WORD_PH}])"
_ALNUM = rf"(?:(?![{_NUM_SYMBOLS}])[^\W_]|[{_MARKS}{_WORD_PH}])"
_CLITIC = rf"(?i:s|t|re|ve|ll|m|d)(?!{_LETTER})"

# Bump RULES whenever pretokenize's output could change: token caches are keyed by it.
RULES = 8
# Controls (C0 and C1, but not the whitespace among them), the soft hyphen, direction
# marks and embeddings, the word joiner and invisible operators: deleted.
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufdd1]")
_ZWSP = "\u200b"
# A symbol keeps what makes one emoji of it (a grapheme cluster): a variation selector, a
# keycap, a skin tone, tag characters (subdivision flags), a second regional indicator (a
# flag), and further symbols joined by a zero-width joiner (👨‍👩‍👧).
_SYMBOL = rf"[^\w\s.'`,\-{_MARKS}{_WORD_PH}]"
_RI = "\U0001F1E6-\U0001F1FF"
_EMOJI = rf"{_SYMBOL}(?:(?<=[{_RI}])[{_RI}])?(?:[\uFE0E\uFE0F\u20E3\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F]|\u200D(?![\x00-\x7f]){_SYMBOL})*"
_SPECIAL = re.compile(rf"(?<!\S)(@[-,.]@)(?!\S)|([0-9#*]\uFE0F?\u20E3|{_EMOJI}|[_{_NUM_SYMBOLS}])")  # keycaps too
_EMAIL_AT = re.compile(r"@(?<=\w@)(?=\w)")
# E-mail addresses and URLs stay whole (a trailing period, or a bracket they do not open,
# is not theirs).
_LINK = re.compile(r"(?<![\w+-])\w[\w.+-]*@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w@-])"
                   r"|(?<![\w@])(?:(?i:https?|ftp)://|www\.)(?:[^\s<>\"“”‘’()]|\([^\s<>\"“”‘’()]*\))+(?<![.,;:!?'’\]}])")
_HYPHEN = re.compile(rf"-(?<={_ALNUM}-)(?={_ALNUM})")
_MULTIDOT = re.compile(r"\.{2,}")
# <unk> counts as a digit next to a digit: WikiText replaced rare numbers ("1 @,@ <unk>").
_NUMBER_SEP = re.compile(rf"([.,])(?:(?<=\d[.,])(?=[\d{_PH}])|(?<={_PH}[.,])(?=\d))")
_COMMA = re.compile(r",(?:(?<!@,)|(?!@))")  # every comma but the one inside "@,@"
# Typographic apostrophes (see the module docstring); what is left of "’" and "‘" after
# these are quotation marks, split off as symbols.
_CURLY_INNER = re.compile(rf"[\u2019\u2018](?<={_ALNUM}.)(?={_LETTER})")
_CURLY_INITIAL = re.compile(rf"\u2019(?<!{_ALNUM}.)(?={_ALNUM})")
_CURLY_FINAL = re.compile(rf"\u2019(?<={_ALNUM}.)")  # (the inner ones are gone by then)
_SINGLE_QUOTES = re.compile("[\u2018\u2019]")
_AFTER_ALNUM = re.compile(rf"(?<={_ALNUM})")
_APOS_ALONE = re.compile(rf"'(?!{_LETTER})")
_APOS_CLITIC = re.compile(rf"'(?:(?<={_LETTER}')(?={_CLITIC})|(?<=\d')(?=(?i:s)(?!{_LETTER})))")
# An apostrophe before a letter splits off unless it follows a word, or is an
# already split clitic ("it 's"), so that pretokenize is idempotent.
_APOS_OPEN = re.compile(rf"'(?<!{_ALNUM}')(?={_LETTER})(?!(?<={_ALNUM} '){_CLITIC})")
# Regexes that start with a literal run far faster: the engine skips ahead to it.
_FINAL_PERIOD = re.compile(r"\.(?<=[^ .]\.)(?=$| (\S))")
_HAS_LETTER = re.compile(_LETTER)

# Moses' English non-breaking prefixes; _NUMERIC_ONLY ones only before a number.
_NONBREAKING = frozenset(
    [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + """Adj Adm Adv Asst Bart Bldg Brig Bros Capt Cmdr Col Comdr Con Corp Cpl DR Dr Drs
    Ens Gen Gov Hon Hr Hosp Insp Lt MM MR MRS MS Maj Messrs Mlle Mme Mr Mrs Ms Msgr Op
    Ord Pfc Ph Prof Pvt Rep Reps Res Rev Rt Sen Sens Sfc Sgt Sr St Supt Surg v vs i.e
    rev e.g Nos Nr Jan Feb Mar Apr Jun Jul Aug Sep Oct Nov Dec""".split()
)
_NUMERIC_ONLY = frozenset(["No", "Art", "pp"])
# Abbreviations that WikiText keeps whole before a lower-case word (Moses' rule: "Jr. and",
# "Inc. and", "c. the", "var. alba", "et al. found", "7th Ave. and", "p. xxii"), and common
# ones like them; words that also end sentences ("lit", "fig", "min", "mm") are not among them.
_BEFORE_LOWER = frozenset("""Jr Inc Ltd Co Corp Bros Ave etc al c ca cf approx var ssp subsp sp spp viz esp
    incl vol vols p lbs""".split())


def _final_period(m: re.Match[str]) -> str:
    line, end = m.string, m.start()
    pre, following = line[line.rfind(" ", 0, end) + 1 : end], m.group(1) or ""
    keep = (
        ("." in pre and _HAS_LETTER.search(pre) is not None)
        or pre in _NONBREAKING
        or (following.islower() and pre in _BEFORE_LOWER)
        or (pre in _NUMERIC_ONLY and (following.isdigit() or following == _PH))
    )
    return "." if keep else " ."


def _curly_apostrophes(text: str) -> str:
    text = _CURLY_INITIAL.sub("'", _CURLY_INNER.sub("'", text.replace("\u02bc", "'")))
    if "\u2018" not in text:
        return _CURLY_FINAL.sub("'", text)
    # A "‘" is open: a word-final "’" may close it. Walk the quotation marks (not the
    # characters) in order: a "’" right after punctuation closes the quote; a word-final
    # one closes it only when no such "’" follows before the next "‘". (One after a space
    # stands alone: neither.)
    marks = [(m.start(), m[0] == "\u2018", _AFTER_ALNUM.match(text, m.start()) is not None,
              m.start() > 0 and not text[m.start() - 1].isspace()) for m in _SINGLE_QUOTES.finditer(text)]
    closing = set()
    open_quote = False
    for k, (at, opens, word_final, attached) in enumerate(marks):
        if opens:
            open_quote = True
        elif not word_final:
            open_quote = open_quote and not attached
        elif open_quote:
            if next((o for _, o, w, a in marks[k + 1 :] if o or (a and not w)), True):
                closing.add(at)  # the next "‘" (or the end) comes first: this "’" closes
                open_quote = False
    return _CURLY_FINAL.sub(lambda m: m[0] if m.start() in closing else "'", text)


def pretokenize(text: str) -> str:
    """One line of natural text as WikiText-convention tokens joined by single spaces."""
    text = _INVISIBLE.sub("", text).replace(_ZWSP, " ")
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)  # "e" + U+0301 (macOS, copied text) is the corpus's "é"
    text = " ".join(text.split()).replace("<unk>", _PH)
    links: list[str] = []
    if "://" in text or "www." in text or _EMAIL_AT.search(text):  # (not "@-@": a fast test first)
        text = _LINK.sub(lambda m: links.append(m[0]) or _LINK_PH, text)
    if "\u2019" in text or "\u02bc" in text or "\u2018" in text:
        text = _curly_apostrophes(text)
    text = _SPECIAL.sub(r" \1\2 ", text)
    text = _HYPHEN.sub(" @-@ ", text)
    text = _MULTIDOT.sub(r" \g<0> ", text)
    text = _NUMBER_SEP.sub(r" @\1@ ", text)
    text = _COMMA.sub(" , ", text)
    if "'" in text:
        text = _APOS_ALONE.sub(" ' ", text)
        text = _APOS_CLITIC.sub(" '", text)
        text = _APOS_OPEN.sub(" ' ", text)
    # The period rule looks at the next word, so it runs once every other split is done.
    text = _FINAL_PERIOD.sub(_final_period, " ".join(text.split()))
    if links:
        text = "".join(itertools.chain.from_iterable(zip(text.split(_LINK_PH), [*links, ""])))
    return text.replace(_PH, "<unk>")


_GLUE = {"@-@": "-", "@,@": ",", "@.@": "."}
# Typographic quotation marks say which way they face: “ and ‘ open, ” closes (German „
# and ‚ open the quotes that “ and ‘ close there). ’ closes a quote only where one is open
# or after a sentence's punctuation: the benchmark corpora split it as an apostrophe
# ("Children ’ s", as Moses did), and raw text reads those as "'" (see _line).
_NO_SPACE_BEFORE = frozenset(", . ; : ! ? ) ] } % ... … n't ”".split())
_CLOSES_AFTER = frozenset(", . ! ? ... …".split())
_NO_SPACE_AFTER = frozenset("( [ { $ £ € ¥ ₹ # “ ‘ „ ‚".split())
_LOW_OPENERS = {"„": "“", "‚": "‘"}  # German: „quoted“, ‚quoted‘
_CLITIC_TOKEN = re.compile(r"'[^\W\d_]")


def _ends_word(token: str) -> bool:
    return token == "<unk>" or token[-1].isalnum()


def _starts_word(token: str | None) -> bool:
    return bool(token) and (token == "<unk>" or token[0].isalnum())


def _line(tokens: list[str]) -> str:
    """Join one line's tokens; each token decides whether it sticks to either neighbour."""
    out: list[str] = []
    stick_next = True  # nothing goes before the first token
    double_open = single_open = False
    low_open: list[str] = []  # the closing marks that German quotes opened on this line wait for
    curly_open = False  # a ‘ is open
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        text, left, right = _GLUE.get(tok, tok), tok in _NO_SPACE_BEFORE, tok in _NO_SPACE_AFTER
        if tok in _GLUE or tok == "/":
            left = right = True
        elif tok == ":" and prev and nxt and prev[-1].isdigit() and nxt[0].isdigit():
            left = right = True  # a time such as 2:30
        elif tok == '"':
            double_open = not double_open
            left, right = not double_open, double_open
        elif tok in _LOW_OPENERS:
            low_open.append(_LOW_OPENERS[tok])
        elif low_open and tok == low_open[-1]:
            low_open.pop()
            left, right = True, False  # the “ of „…“ closes
        elif tok == "‘":
            curly_open = True
        elif tok == "’" and (curly_open or prev in _CLOSES_AFTER):
            curly_open, left = False, True
        elif tok == "'":
            # A lone apostrophe closes a quote or marks a plural possessive ("Girls'");
            # it opens a quote only where neither reading fits.
            opens = not single_open and _starts_word(nxt) and not (prev and prev[-1] in "sSzZ")
            single_open = opens
            left, right = not opens, opens
        elif prev and _CLITIC_TOKEN.match(tok) and _ends_word(prev):
            left = True
        elif tok in (".", "...") and prev and prev[-1] == ".":
            left = False  # ". . ." glued would read back as one "..." token
        if out and not (stick_next or left):
            out.append(" ")
        out.append(text)
        stick_next = right
    return "".join(out)


def detokenize(tokens: list[str]) -> str:
    """Tokens as natural text; each ``<eos>`` becomes a newline."""
    lines: list[list[str]] = [[]]
    for tok in tokens:
        if tok == "<eos>":
            lines.append([])
        else:
            lines[-1].append(tok)
    return "\n".join(_line(line) for line in lines)


def detokenize_text(text: str) -> str:
    """``detokenize`` for a whitespace-separated token string."""
    return detokenize(text.split())
