"""The interactive autocomplete loop.

On a terminal it is live (prompt_toolkit): the bottom toolbar shows the suggestions for
the text before the cursor after every keystroke, completions of the word being typed
or, at a word boundary, the next words, and a likely phrase appears in grey after the
cursor. Keys:

    Tab            accept the first suggestion
    Alt-1 .. Alt-9 accept suggestion n (or Esc, then n)
    Right, Ctrl-F  at the end of the line: accept the grey phrase
    Enter          the line joins the text (or runs a :command)
    Up, Down       history; Ctrl-D or Ctrl-C leave

Digits stay ordinary keys, so numbers can be typed. Suggestions adapt to what was
typed in the session (see ``lm.predict``); ``:learn FILE`` or ``--learn FILE`` primes
that memory with your own writing.

With standard input not a terminal (or ``--plain``) it reads lines: each line continues
the text so far (as if separated by a space), and every input line gives exactly one
output line, the suggestions after it, so the REPL can be scripted. There a line
ending in a likely whole vocabulary word asks for the next word (the one-shot rule of
``lm complete``, in ``lm.predict``).
"""
from __future__ import annotations

import io
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from lm.config import SampleConfig
from lm.errors import LMError
from lm.predict import CONTROL, Predictor, Suggestions, read_user_text
from lm.sample import continue_text

HELP = (":k N  show N suggestions | :temp T  temperature of :gen | :gen [N]  sample N words after the text | "
        ":learn FILE  adapt to your own text | :reset  start a new text (the session memory stays) | :context  show it | "
        ":help | :quit (also Ctrl-D)")
KEYS = "Tab or Alt-1..9: accept · Right: accept the grey phrase · Enter: next line · :help"
MAX_K = 100  # suggestions per line (the toolbar numbers the first 9)
MAX_GEN = 500  # words per :gen
MAX_LINE = 100_000  # characters per input line; a longer one is refused, never read whole
PHRASE_WORDS = 3  # length of the grey phrase
PHRASE_BEAM = 2  # its beam width: a keystroke budget, not a search for the best phrase


def _no_suggestions(s: Suggestions) -> str:
    """What to show when nothing fits; a long prefix is cut, so the line stays a line."""
    if s.kind != "complete":
        return "no suggestions"
    prefix = s.prefix if len(s.prefix) <= 40 else s.prefix[:40] + "…"
    return f"no known word starts with {prefix!r}"


def percent(p: float) -> str:
    """A probability as shown: "20.6%", and "<0.1%" for what would round to 0.0%."""
    return f"{p:.1%}" if p >= 0.0005 else "<0.1%"


def format_suggestions(s: Suggestions) -> str:
    """One line: "next: the 20.6%  a 2.3%" or "Uni… United 0.1%  Union <0.1%"."""
    if not s.items:
        return _no_suggestions(s)
    body = "  ".join(f"{c.text} {percent(c.prob)}" for c in s.items)
    return f"{s.prefix}… {body}" if s.kind == "complete" else f"next: {body}"


def format_toolbar(s: Suggestions) -> str:
    """The live toolbar: the suggestions numbered for Alt-n, then the keys."""
    if not s.items:
        head = _no_suggestions(s)
    else:
        head = ("next  " if s.kind == "next" else f"{s.prefix}…  ") + "   ".join(
            f"{n} {c.text} {percent(c.prob)}" for n, c in enumerate(s.items[:9], 1))
    return f"{head}\n{KEYS}"


class Repl:
    """The state both modes share: the predictor, the settings, the commands."""

    def __init__(self, predictor: Predictor, k: int = 5, sample: SampleConfig | None = None):
        self.pred = predictor
        self.k = k
        self.sample = sample or SampleConfig()
        self._shown: tuple[str, int, Suggestions] | None = None  # (live text, k, suggestions)

    # -- line mode -------------------------------------------------------------------
    def handle(self, line: str) -> tuple[str, bool]:
        """One input line -> (one output line, keep going)."""
        line = CONTROL.sub(" ", line)
        if line.strip().startswith(":"):
            return self.command(line.strip())
        self.pred.commit()  # the previous line, a word left unfinished included, is done
        self.pred.update(line, complete_known=True)
        return format_suggestions(self.pred.suggest(self.k)), True

    # -- live mode -------------------------------------------------------------------
    def suggestions(self, text: str) -> Suggestions:
        """Suggestions for the live ``text`` (the line before the cursor), kept until it changes."""
        if self._shown is None or self._shown[:2] != (text, self.k):
            self.pred.update(text)
            self._shown = (text, self.k, self.pred.suggest(self.k))
        return self._shown[2]

    def ghost(self, text: str) -> Callable[[], str]:
        """The grey text after the cursor, as a job another thread may run: the rest of
        the first completion inside a word, of the most likely phrase at a boundary.
        The phrase search (model steps) runs on a snapshot, so typing never waits for it."""
        s = self.suggestions(text)
        if s.kind == "complete":
            return lambda: _extension(self.pred, text, s.items[:1])
        snap = self.pred.snapshot()
        return lambda: _extension(snap, text, snap.phrases(PHRASE_BEAM, PHRASE_WORDS))

    def enter(self, line: str) -> tuple[str, bool]:
        """A line entered in live mode -> (output, keep going): commands answer, text
        joins the context silently."""
        self._shown = None
        if line.strip().startswith(":"):
            return self.command(line.strip())
        self.pred.update(line)
        self.pred.commit()
        return "", True

    # -- commands --------------------------------------------------------------------
    def command(self, cmd: str) -> tuple[str, bool]:
        name, _, arg = cmd[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("q", "quit", "exit"):
            return "bye", False
        if name in ("h", "help", "?"):
            return HELP, True
        if name == "reset":
            self.pred.reset()
            self._shown = None
            return "context cleared", True
        if name == "context":
            return f"context: {self.pred.text()[-200:] or '(empty)'}", True
        if name == "k":
            if not arg.isdecimal() or not 1 <= int(arg) <= MAX_K:
                return f"usage: :k N with N from 1 to {MAX_K} (now {self.k})", True
            self.k = int(arg)
            return f"k = {self.k}", True
        if name == "temp":
            return self._temperature(arg), True
        if name == "gen":
            return self._generate(arg), True
        if name == "learn":
            return self._learn(arg), True
        return f"unknown command :{name} (type :help)", True

    def _temperature(self, arg: str) -> str:
        try:
            t = float(arg) + 0.0  # -0 is 0
            SampleConfig(temperature=t).validate()
        except (ValueError, LMError):
            return f"usage: :temp T with T from 0 (greedy) to 100 (now {self.sample.temperature:g})"
        self.sample.temperature = t
        return f"temperature = {t:g} (for :gen)"

    def _generate(self, arg: str) -> str:
        if arg and not (arg.isdecimal() and 1 <= int(arg) <= MAX_GEN):
            return f"usage: :gen [N] with N from 1 to {MAX_GEN} words (default 20)"
        sc = self.sample
        pieces = continue_text(self.pred.model, self.pred.tok, self.pred.text(), int(arg or 20),
                               temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p, seed=sc.seed,
                               newlines=False)
        sc.seed += 1  # the next :gen draws another continuation
        return "…" + "".join(pieces)

    def _learn(self, arg: str) -> str:
        if not arg:
            return "usage: :learn FILE (a text file of your own writing)"
        path = _path_arg(arg)
        try:
            text = read_user_text(path)  # its errors name the file
            n = self.pred.learn(text)
        except LMError as e:
            return f"error: {e}" if self.pred.memory is None or path in str(e) else f"error: {path}: {e}"
        self._shown = None
        return f"learned the last {n:,} words of {path}"


def _path_arg(arg: str) -> str:
    """A file name as a user types or drags it into a terminal: as given if such a file
    exists, else read as a shell word ("/my notes.txt", /my\\ notes.txt)."""
    if os.path.exists(os.path.expanduser(arg)):
        return arg
    try:
        words = shlex.split(arg)
    except ValueError:  # an unmatched quote
        return arg
    return words[0] if len(words) == 1 else arg


def _extension(pred: Predictor, text: str, choices: list) -> str:
    """What the first choice that only extends ``text`` adds to it: grey text cannot
    rewrite the line, so "the dog " + "." (which would give "the dog.") is skipped."""
    for choice in choices:
        after = pred.accept(text, choice)
        if after.startswith(text):
            return after[len(text):]
    return ""


def run(predictor: Predictor, k: int = 5, stdin: TextIO | None = None, stdout: TextIO | None = None,
        plain: bool = False, sample: SampleConfig | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if isinstance(stdin, io.TextIOWrapper):  # bytes that are not UTF-8 become U+FFFD, not a crash
        stdin.reconfigure(errors="replace")
    repl = Repl(predictor, k, sample)
    if not plain and stdin.isatty() and stdout.isatty():
        return _live(repl, stdout)
    for line in _lines(stdin):
        out, more = repl.handle(line) if line is not None else (
            f"line too long: at most {MAX_LINE:,} characters (ignored)", True)
        print(out, file=stdout, flush=True)
        if not more:
            break
    return 0


def _lines(stdin: TextIO) -> Iterator[str | None]:
    """Input lines without their line ending; None for a line over MAX_LINE, which is
    skipped without ever being held whole."""
    while line := stdin.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while line and not line.endswith("\n"):
                line = stdin.readline(MAX_LINE + 1)
            yield None
        else:
            yield line.removesuffix("\n").removesuffix("\r")


def _live(repl: Repl, stdout: TextIO) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.auto_suggest import AutoSuggest, Suggestion
    from prompt_toolkit.eventloop import run_in_executor_with_context
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.keys import Keys

    def before_cursor() -> str | None:
        text = get_app().current_buffer.document.text_before_cursor
        return None if text.lstrip().startswith(":") or len(text) > MAX_LINE else text

    def toolbar() -> str:
        text = before_cursor()
        return HELP if text is None else format_toolbar(repl.suggestions(text))

    class Ghost(AutoSuggest):
        def get_suggestion(self, buffer, document):
            return None  # only the asynchronous path below is used

        async def get_suggestion_async(self, buffer, document):
            text = before_cursor()
            if text is None or not document.is_cursor_at_the_end:
                return None
            rest = await run_in_executor_with_context(repl.ghost(text))  # prompt_toolkit drops it if stale
            return Suggestion(rest) if rest else None

    keys = KeyBindings()

    def accepting(i: int):
        def handler(event) -> None:
            buffer = event.current_buffer
            text = before_cursor()
            if text is None:
                return
            s = repl.suggestions(text)
            if i < len(s.items):
                new = repl.pred.accept(text, s.items[i])
                buffer.text = new + buffer.document.text_after_cursor
                buffer.cursor_position = len(new)
        return handler

    keys.add("tab")(accepting(0))
    for n in range(1, 10):
        keys.add("escape", str(n))(accepting(n - 1))
    # Mouse support is off, yet typed or pasted text such as "\x1b[31m" parses as a mouse
    # report, and prompt_toolkit's own handler fails on it: such keys are ignored.
    keys.add(Keys.Vt100MouseEvent)(lambda event: None)

    session = PromptSession(history=InMemoryHistory(), auto_suggest=Ghost(), bottom_toolbar=toolbar,
                            key_bindings=keys)
    print(f"lm autocomplete: type, and suggestions follow. {KEYS}", file=stdout, flush=True)
    while True:
        try:
            line = session.prompt("> ")
        except (EOFError, KeyboardInterrupt):
            return 0
        out, more = repl.enter(line)
        if out:
            print(out, file=stdout, flush=True)
        if not more:
            return 0
