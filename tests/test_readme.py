"""The README is the user's manual: every `lm` command it shows must be one the CLI
accepts, so a renamed or removed flag fails here instead of in a user's shell."""
import re
import shlex

import pytest

from lm.cli import build_parser

from conftest import REPO

PLACEHOLDERS = {"N": "5"}  # written as a placeholder in prose, e.g. "--max-words N"


def readme_commands() -> list[tuple[int, str]]:
    """(line, command) for every `lm ...` line of the README's code blocks (a trailing
    backslash joins the next line) and every inline `lm ...` with arguments."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines, found, inside, i = text.splitlines(), [], False, 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            inside = not inside
        elif inside:
            start = i
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            if re.match(r"(\.venv/bin/)?lm ", line) and not line.startswith("lm COMMAND"):
                found.append((start + 1, re.sub(r"\s#.*$", "", line).strip()))  # without its comment
        i += 1
    for m in re.finditer(r"`((?:\.venv/bin/)?lm [^`]+)`", text):
        words = m.group(1).split()
        if len(words) >= 3 and not words[1].startswith("COMMAND"):  # a command, not just a subcommand's name
            found.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


def test_the_readme_shows_commands_of_every_kind():
    subcommands = {shlex.split(c)[1] for _, c in readme_commands()}
    assert {"train", "eval", "generate", "complete", "repl", "serve", "corpus", "ngram", "bench", "recipes",
            "plot"} <= subcommands


@pytest.mark.parametrize("line,command", readme_commands())
def test_every_command_in_the_readme_parses(line, command):
    command = command.replace("[", "").replace("]", "")  # [optional] parts
    argv = [PLACEHOLDERS.get(w, w) for w in shlex.split(command)[1:]]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README.md:{line}: `{command}` is not accepted by the CLI (exit {e.code})")


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"`make ([a-z][\w-]*)", readme)) | set(re.findall(r"^make ([a-z][\w-]*)", readme, re.M))
    assert {"train", "test", "bench"} <= shown
    assert shown <= targets, f"the README names make targets the Makefile lacks: {sorted(shown - targets)}"


def test_every_flag_and_argument_has_help_text():
    """`lm X --help` is the manual at hand: no option may appear there unexplained."""
    import argparse

    def unexplained(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from unexplained(p, f"{name} {sub}")
            elif not action.help:
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"

    assert list(unexplained(build_parser(), "lm")) == []
