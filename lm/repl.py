"""The interactive autocomplete loop.

Each line you enter continues the text so far; after it you see the most likely next
words, or, when the line ends inside a word, the most likely completions of that word
(which then joins the text as typed). Lines starting with ':' are commands. When
standard input is not a terminal, each input line gives exactly one output line, so
the REPL can be scripted.
"""
from __future__ import annotations

import sys
from typing import TextIO

from lm.predict import Predictor, Suggestions

HELP = (":k N  show N suggestions | :reset  forget the text so far | :context  show it | "
        ":help  this help | :quit  leave (also Ctrl-D / Ctrl-C)")
MAX_K = 100


def format_suggestions(s: Suggestions) -> str:
    if not s.items:
        return f"no known word starts with {s.prefix!r}" if s.kind == "complete" else "no suggestions"
    body = "  ".join(f"{w} {p:.1%}" for w, p in s.items)
    return f"{s.prefix}… {body}" if s.kind == "complete" else f"next: {body}"


class Repl:
    def __init__(self, predictor: Predictor, k: int = 5):
        self.pred = predictor
        self.k = k
        self.pending = ""  # a partial word from the last line, joined to the text as typed
        self.words: list[str] = []

    def handle(self, line: str) -> tuple[str, bool]:
        """One input line -> (one output line, keep going)."""
        stripped = line.strip()
        if stripped.startswith(":"):
            return self._command(stripped)
        if self.pending:  # the last line ended inside a word: that word is done now
            self.pred.feed_words([self.pending])
            self.words.append(self.pending)
            self.pending = ""
        words, partial = self.pred.split_partial(line)
        self.pred.feed_words(words)
        self.words.extend(words)
        self.pending = partial
        return format_suggestions(self.pred.suggest(partial, self.k)), True

    def _command(self, cmd: str) -> tuple[str, bool]:
        name, _, arg = cmd[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("q", "quit", "exit"):
            return "bye", False
        if name in ("h", "help", "?"):
            return HELP, True
        if name == "reset":
            self.pred.reset()
            self.words, self.pending = [], ""
            return "context cleared", True
        if name == "context":
            text = self.pred.tok.display(self.words + ([self.pending] if self.pending else []))
            return f"context: {text[-200:] or '(empty)'}", True
        if name == "k":
            if not arg.isdigit() or not 1 <= int(arg) <= MAX_K:
                return f"usage: :k N with N from 1 to {MAX_K} (now {self.k})", True
            self.k = int(arg)
            return f"k = {self.k}", True
        return f"unknown command :{name} (type :help)", True


def run(predictor: Predictor, k: int = 5, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    repl = Repl(predictor, k)
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"lm autocomplete: type text and press Enter. {HELP}", file=stdout)
        print(format_suggestions(predictor.suggest("", k)), file=stdout)
    try:
        while True:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                line = line[:-1] if line.endswith("\n") else line
            out, more = repl.handle(line)
            print(out, file=stdout, flush=True)
            if not more:
                break
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print(file=stdout)
    return 0
