"""Property tests: whatever people type, the REPL, ``lm complete``'s predictor and
``lm serve`` answer without crashing (random Unicode, control characters, lone
surrogates, empty input, and 1 MB inputs)."""
from __future__ import annotations

import json
import threading
from http.client import HTTPConnection

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm import checkpoint
from lm.predict import Predictor
from lm.repl import Repl
from lm.serve import Server, answer, validate

# every code point class, control characters and surrogates included, plus the
# tokenizer's own markers and the REPL's command prefix, which random text rarely hits
TEXT = st.text(st.characters(codec=None, categories=None), max_size=200) | st.sampled_from(
    ["", " ", "\n", "\t\t", ":", ":k", ":k -1", ":k 99999999999999999999", ":temp nan", ":learn /nonexistent",
     ":gen 0", "<unk>", "<eos>", "@-@", " @,@ ", "\x00", "\x1b[2J", "\ud800", "\u202e", "a" * 5000])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def predictor(tiny_run) -> Predictor:
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    return Predictor(model, tok)


@FUZZ
@given(lines=st.lists(TEXT, max_size=6))
def test_repl_lines_never_crash(predictor, lines):
    repl = Repl(predictor.fork(), k=3)
    for line in lines:
        out, _ = repl.handle(line)
        assert isinstance(out, str) and "\n" not in out.strip("\n")


@FUZZ
@given(text=TEXT, k=st.integers(1, 100))
def test_complete_never_crashes(predictor, text, k):
    s = predictor.fork().complete_text(text, k)
    assert len(s.items) <= k
    assert all(0.0 <= c.prob <= 1.0 + 1e-6 for c in s.items)


@FUZZ
@given(body=st.one_of(st.dictionaries(st.sampled_from(["text", "k", "words", "max_words", "seed", "x"]),
                                      st.one_of(TEXT, st.integers(), st.floats(), st.booleans(), st.none()),
                                      max_size=4),
                      st.lists(st.integers(), max_size=3), TEXT, st.none()))
def test_server_requests_are_answered_or_refused_cleanly(predictor, body):
    from lm.serve import RequestError

    for path in ("/complete", "/next", "/phrases"):
        try:
            req = validate(path, body)
        except RequestError as e:
            assert 400 <= e.status < 500 and str(e)
            continue
        json.dumps(answer(predictor, path, req))  # an answer, and serialisable


def test_one_megabyte_inputs(predictor):
    big = ("the cat sat on the mat . " * 42_000)[:1_000_000]
    assert predictor.fork().complete_text(big, 5).items  # the library takes it whole
    out, more = Repl(predictor.fork(), k=3).handle(big + "\x00\x07")
    assert more and out
    server = Server(predictor, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        conn.request("POST", "/complete", body=json.dumps({"text": big}).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and "error" in json.loads(resp.read())
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
