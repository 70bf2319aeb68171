"""The REPL: line mode (one output line per input line, whatever the input) and the live
mode driven through a real pseudo-terminal."""
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from lm import checkpoint
from lm.predict import Predictor
from lm.repl import MAX_LINE, run

from conftest import REPO


@pytest.fixture(scope="module")
def pred(tiny_run):
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    return Predictor(model, tok)


def lines_out(pred, script: str) -> list[str]:
    pred.reset()
    out = io.StringIO()
    assert run(pred, stdin=io.StringIO(script), stdout=out) == 0
    return out.getvalue().splitlines()


def test_odd_input_never_breaks_the_one_line_rule(pred, tmp_path):
    odd = ["", "   ", "\x00\x01\x1b[31m\x7f", "the\tcat\x0bsat", "😀 ünïcödé ?!", "x" * (MAX_LINE + 5),
           "the cat\r", ":", ": k", ":k 0", ":temp hot", ":temp -0", ":gen 3", ":gen 9999",
           f":learn {tmp_path / 'missing.txt'}", ":learn", ":context", "a " * 5000, ":k \u00b2", ":gen \u00b2"]
    out = lines_out(pred, "\n".join(odd) + "\n")
    assert len(out) == len(odd)
    assert out[5] == f"line too long: at most {MAX_LINE:,} characters (ignored)"
    assert out[11] == "temperature = 0 (for :gen)"
    assert out[12].startswith("…") and len(out[12]) > 3
    assert out[14].startswith("error:") and "not found" in out[14]
    assert out[16].startswith("context: ")
    assert out[18].startswith("usage: :k") and out[19].startswith("usage: :gen")


def test_escape_sequences_and_control_characters_are_not_text(pred):
    """An arrow key where no line editor reads it (ESC [ A, ESC O A) and other control
    characters answer as the same line without them would."""
    odd = ["the\x1b[A cat", "the\x1bOA cat\x07", "\x1b[1;5Cthe cat\x00", "the\x7f cat"]
    assert lines_out(pred, "\n".join(odd) + "\n") == lines_out(pred, "the cat\n" * len(odd))


def test_a_long_unknown_prefix_is_cut_in_the_no_suggestions_line(pred):
    from lm.predict import Suggestions
    from lm.repl import format_suggestions, format_toolbar

    out = lines_out(pred, "q" * 5000 + "\n")
    assert out == [f"no known word starts with {'q' * 40 + '…'!r}"]
    short = Suggestions(kind="complete", prefix="qqz", items=[])
    assert format_suggestions(short) == "no known word starts with 'qqz'"
    assert format_toolbar(short).splitlines()[0] == "no known word starts with 'qqz'"


def test_probabilities_too_small_to_show_read_as_below_a_tenth_of_a_percent():
    from lm.predict import Choice, Suggestions
    from lm.repl import format_suggestions, format_toolbar

    s = Suggestions(kind="complete", prefix="Uni",
                    items=[Choice("United", 0.1234, ("United",)), Choice("Union", 0.0005, ("Union",)),
                           Choice("Unicorn", 0.00049, ("Unicorn",))])
    assert format_suggestions(s) == "Uni… United 12.3%  Union 0.1%  Unicorn <0.1%"
    assert format_toolbar(s).splitlines()[0] == "Uni…  1 United 12.3%   2 Union 0.1%   3 Unicorn <0.1%"


def test_bytes_that_are_not_utf8_on_stdin_do_not_crash(pred):
    stdin = io.TextIOWrapper(io.BytesIO(b"the \xff\xfe cat\n:quit\n"), encoding="utf-8")  # strict, as in a UTF-8 locale
    out = io.StringIO()
    assert run(pred, stdin=stdin, stdout=out) == 0
    assert out.getvalue().startswith("next:")


def test_gen_is_greedy_at_temperature_zero_and_learn_reads_a_file(pred, tmp_path):
    (tmp_path / "mine.txt").write_text("the old man walked past the presentation .\n" * 3)
    out = lines_out(pred, f"the dog\n:temp 0\n:gen 6\n:gen 6\n:learn {tmp_path / 'mine.txt'}\n")
    assert out[2] == out[3]  # greedy: the seed does not matter
    assert out[4].startswith("error: session learning is off")  # this predictor has no memory


def test_a_line_ending_in_a_word_that_longer_words_outweigh_gets_completions(pred):
    out = lines_out(pred, "the cat looked a\n:reset\nthe cat sat on a\n")  # "at" is far likelier after "looked"
    assert out[0].startswith("a… at ") and out[2].startswith("next: ")


def test_no_final_newline_and_a_partial_word_joins_the_text(pred):
    out = lines_out(pred, "the cat sat on the m\nat\n:context")
    assert out[0].startswith("m… ") and out[2] == "context: the cat sat on the m at"


# -- the live REPL in a pseudo-terminal ----------------------------------------------------

_ESCAPE = re.compile(r"\x1b\[([0-9;?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b.")


def screen(raw: str, rows: int, cols: int) -> tuple[str, tuple[int, int]]:
    """What a terminal shows after ``raw``, and where its cursor is (row, column from 1).
    prompt_toolkit redraws only the cells that change, so the text on screen is not a
    substring of the output stream. Handles what it emits: printable text, CR, LF,
    backspace, cursor moves and erasures; colours and modes are ignored."""
    grid = [[" "] * cols for _ in range(rows)]
    r = c = 0

    def newline():
        nonlocal r
        r += 1
        if r == rows:
            grid.pop(0)
            grid.append([" "] * cols)
            r = rows - 1

    pos = 0
    while pos < len(raw):
        m = _ESCAPE.match(raw, pos)
        if m:
            pos = m.end()
            if m.group(2) is None:
                continue
            args = [int(a) if a.isdigit() else 0 for a in m.group(1).lstrip("?").split(";")]
            n, op = max(1, args[0]), m.group(2)
            if op in "Hf":
                r, c = min(rows, max(1, args[0])) - 1, min(cols, max(1, args[1] if len(args) > 1 else 1)) - 1
            elif op in "ABCDG":
                r = max(0, r - n) if op == "A" else min(rows - 1, r + n) if op == "B" else r
                c = min(cols - 1, c + n) if op == "C" else max(0, c - n) if op == "D" else n - 1 if op == "G" else c
            elif op == "K":
                lo, hi = {0: (c, cols), 1: (0, c + 1), 2: (0, cols)}.get(args[0], (c, cols))
                grid[r][lo:hi] = [" "] * (hi - lo)
            elif op == "J":
                grid[r][c:] = [" "] * (cols - c)
                for row in (range(r + 1, rows) if args[0] == 0 else range(rows)):
                    grid[row] = [" "] * cols
            continue
        ch = raw[pos]
        pos += 1
        if ch == "\r":
            c = 0
        elif ch == "\n":
            newline()
        elif ch == "\b":
            c = max(0, c - 1)
        elif ch >= " ":
            if c >= cols:
                c = 0
                newline()
            grid[r][c] = ch
            c += 1
    return "\n".join("".join(row).rstrip() for row in grid), (r + 1, c + 1)


class Terminal:
    """A process on a real pseudo-terminal: type into it, watch its screen."""

    def __init__(self, args, rows=30, cols=120):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.raw, self.size = master, "", (rows, cols)

    def type(self, keys: str, pause: float = 0.0) -> None:
        for key in keys if pause else [keys]:
            os.write(self.fd, key.encode())
            time.sleep(pause)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait until the screen shows ``pattern``."""
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, screen(self.raw, *self.size)[0])
            if m:
                return m
            if time.monotonic() > end or not self._read(0.2) and self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} on the screen:\n{screen(self.raw, *self.size)[0]}")

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return self.proc.poll() is None
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the process is gone
            return False
        text = data.decode("utf-8", "replace")
        for _ in range(text.count("\x1b[6n")):  # a cursor position request: the toolbar needs the answer
            self.raw += text[: text.index("\x1b[6n")]
            text = text[text.index("\x1b[6n") + 4:]
            os.write(self.fd, "\x1b[{};{}R".format(*screen(self.raw, *self.size)[1]).encode())
        self.raw += text
        return bool(data)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


@pytest.fixture
def terminal(tiny_run):
    t = Terminal([sys.executable, "-m", "lm", "repl", str(tiny_run / "best.pt")])
    yield t
    t.close()


def test_live_suggestions_follow_typing_and_keys_accept_them(terminal):
    t = terminal
    t.expect("lm autocomplete")
    t.expect(r"next\s+1 \S+")  # the toolbar, before anything is typed
    t.type("the cat sat on the m", pause=0.01)
    t.expect(r"m…\s+1 \w+ [\d.]+%.*2 \w+")  # completions of "m", numbered
    t.type("\t")  # Tab: the first suggestion
    t.expect(r"next\s+1 ")  # it was inserted with its space: next words now
    t.type("\r:context\r")
    m = t.expect(r"context: the cat sat on the (\w+)\n")
    assert m.group(1) in {"mat", "man", "my"}
    t.type("a bird looked at the ")
    t.expect(r"next\s+1 \S+ [\d.]+%\s+2 (\S+) ")
    t.type("\x1b2")  # Alt-2: the second suggestion
    t.type("\r:context\r")
    t.expect(r"context: .*a bird looked at the \w+\n")
    t.type(":reset\r")
    t.expect("context cleared")
    t.type("the dog ")  # a subject: a verb phrase follows
    t.expect(r"next\s+1 ")
    time.sleep(0.5)
    t.type("\x1b[C")  # Right arrow: the grey phrase after the cursor (three words)
    t.type("\r:context\r")
    m = t.expect(r"context: the dog (\S.*)\n")
    assert len(m.group(1).split()) == 3
    t.type(":quit\r")
    t.expect("bye")
    assert t.close() == 0


def test_live_leaves_cleanly_on_ctrl_d(terminal):
    terminal.expect(r"next\s+1 ")
    # pasted text with control characters and escape sequences, then control keys
    terminal.type("\x1b[200~the \x00\x01\x07\x1b[31m\x7f\u200b ca\x1b[201~")
    terminal.type("\x01\x0b\x02\x06\x1bb cat")
    terminal.expect(r"next\s+1 |…")
    assert "Exception" not in screen(terminal.raw, *terminal.size)[0]
    terminal.type("\x05\x15")  # Ctrl-E, Ctrl-U: an empty line
    terminal.expect(r"next\s+1 ")
    terminal.type("\x04")  # Ctrl-D
    assert terminal.close() == 0


def test_learn_takes_a_path_as_typed_or_dragged_into_a_terminal_and_names_the_file(tiny_run, tmp_path):
    from lm.cache import NeuralCache

    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    memo = Predictor(model, tok, memory=NeuralCache(100, 0.3, 0.1, model.layers[-1].hidden_size))
    spaced = tmp_path / "my notes.txt"
    spaced.write_text("the cat sat on the mat .\n")
    (tmp_path / "empty.txt").write_text("\n")
    out = lines_out(memo, f':learn "{spaced}"\n:learn {str(spaced).replace(" ", chr(92) + " ")}\n'
                          f":learn {spaced}\n:learn {tmp_path / 'empty.txt'}\n")
    assert out[0].startswith("learned the last ") and out[0].endswith(f" words of {spaced}")
    assert out[1] == out[2] == out[0]  # quoted, escaped, as is
    assert out[3] == f"error: {tmp_path / 'empty.txt'}: the text has no words to learn from"


def test_learn_flag_names_the_file_that_has_no_words(tiny_run, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    r = subprocess.run([sys.executable, "-m", "lm", "repl", str(tiny_run / "best.pt"), "--plain",
                        "--learn", str(tmp_path / "empty.txt")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"--learn {tmp_path / 'empty.txt'}: the text has no words to learn from")
