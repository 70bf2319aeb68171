"""lm serve: answers, 4xx with a message for every bad request, concurrent clients."""
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
from http.client import HTTPConnection

import pytest

from lm import checkpoint
from lm.cache import NeuralCache
from lm.errors import LMError
from lm.predict import Predictor
from lm.serve import MAX_BODY, MAX_TEXT, Handler, Server, requests_per_second, serve

from conftest import REPO


@pytest.fixture(scope="module")
def proto(tiny_run):
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    pred = Predictor(model, tok, memory=NeuralCache(50, 0.5, 0.2, 16))
    pred.learn("the old man spoke with my friend .")
    return pred


@pytest.fixture(scope="module")
def server(proto):
    srv = Server(proto, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, method, path, body=None, headers=None):
    conn = HTTPConnection(*server.server_address[:2], timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, headers or {})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), resp.getheader("Content-Type")
    conn.close()
    return out


def test_answers(server, proto):
    status, health, ctype = call(server, "GET", "/health")
    assert status == 200 and health == {"status": "ok", "vocab": proto.tok.vocab_size, "memory": True}
    assert ctype.startswith("application/json")
    status, r, _ = call(server, "POST", "/complete", {"text": "the cat sat on the m", "k": 3})
    assert status == 200 and r["kind"] == "complete" and r["prefix"] == "m"
    assert {s["word"] for s in r["suggestions"]} == {"mat", "man", "my"}
    local = proto.fork()  # the oracle: the same predictor, used directly
    local.update("the cat sat on the m")
    assert r["suggestions"] == local.suggest(3).to_json()
    status, r, _ = call(server, "POST", "/next", {"text": "the cat sat on the"})
    assert status == 200 and len(r["suggestions"]) == 5
    assert r["suggestions"][0]["word"] in {"mat", "house", "river", "city", "presentation"}  # after "on the"
    status, r, _ = call(server, "POST", "/phrases", {"text": "the dog ", "k": 2, "words": 3})
    assert status == 200 and len(r["phrases"]) == 2 and all(len(p["text"].split()) == 3 for p in r["phrases"])
    gen = {"text": "the bird", "max_words": 12, "seed": 7, "temperature": 0.8, "top_p": 0.9}
    a, b = call(server, "POST", "/generate", gen)[1], call(server, "POST", "/generate", gen)[1]
    assert a == b and a["words"] == 12 and a["text"].strip()
    assert call(server, "POST", "/generate", {**gen, "seed": 8})[1] != a


@pytest.mark.parametrize("path, body, status, message", [
    ("/complete", b"{not json", 400, "not valid JSON"),
    ("/complete", b"\xff\xfe", 400, "not UTF-8"),
    ("/complete", [1, 2], 400, "JSON object"),
    ("/complete", {}, 400, "needs the field 'text'"),
    ("/complete", {"text": "a", "kk": 3}, 400, "unknown field 'kk'"),
    ("/complete", {"text": 5}, 400, "text must be a string"),
    ("/complete", {"text": "a", "k": "5"}, 400, "k must be an integer"),
    ("/complete", {"text": "a", "k": True}, 400, "k must be an integer"),
    ("/complete", {"text": "a", "k": 2.5}, 400, "k must be an integer"),
    ("/complete", {"text": "a", "k": 0}, 400, "k must be between 1 and 100"),
    ("/next", {"text": "a", "k": 101}, 400, "k must be between"),
    ("/next", {"text": "a" * (MAX_TEXT + 1)}, 400, "at most 20,000"),
    ("/phrases", {"text": "a", "words": 9}, 400, "words must be between 1 and 8"),
    ("/generate", {"top_p": 0}, 400, "top_p must be between 1e-06 and 1.0, got 0"),
    ("/generate", {"temperature": -1}, 400, "temperature must be between"),
    ("/generate", b'{"temperature": NaN}', 400, "temperature must be a number"),
    ("/generate", {"max_words": 10**6}, 400, "max_words must be between"),
    ("/generate", {"seed": -1}, 400, "seed must be between"),
    ("/complete", b"[" * 50_000, 400, "nested too deeply"),
    ("/complete", b'{"text": "a", "k": 1' + b"0" * 5000 + b"}", 400, "more than 4,300 digits"),  # was a 500
    ("/nope", {"text": "a"}, 404, "no endpoint /nope"),
    ("/health", {}, 405, "takes GET"),
])
def test_bad_requests_get_4xx_and_a_message(server, path, body, status, message):
    got, r, _ = call(server, "POST", path, body)
    assert got == status and message in r["error"]


def test_a_byte_order_mark_before_the_json_is_dropped(server):
    """Windows editors and some clients put one before UTF-8 text."""
    body = {"text": "the cat sat on the m", "k": 3}
    status, r, _ = call(server, "POST", "/complete", b"\xef\xbb\xbf" + json.dumps(body).encode())
    assert status == 200 and r == call(server, "POST", "/complete", body)[1]


def test_wrong_method_missing_length_and_oversized_body(server):
    status, r, _ = call(server, "GET", "/complete")
    assert status == 405 and "POST" in r["error"]
    with socket.create_connection(server.server_address[:2], timeout=30) as s:  # no Content-Length
        s.sendall(b"POST /complete HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length" in reply
    conn = HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/complete")
    conn.putheader("Content-Length", str(MAX_BODY + 1))  # announced, never sent: not read
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "at most" in json.loads(resp.read())["error"]
    conn.close()
    with socket.create_connection(server.server_address[:2], timeout=30) as s:  # a digit, not an ASCII one
        s.sendall(b"GET /complete HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n")
        reply = s.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 400") and "Content-Length" in reply  # the body's end comes first
    assert call(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("path, lengths", [
    ("/complete", ["-1"]),  # was 413 "the body is -1 bytes"
    ("/complete", ["+13"]),  # these two were read as 13 by int()
    ("/complete", ["1_3"]),
    ("/complete", ["13", "3"]),  # the first one was used
    ("/nope", ["-1"]),  # whatever the path: where the request ends is unknown
])
def test_a_malformed_or_conflicting_content_length_gets_400(server, path, lengths):
    headers = "".join(f"Content-Length: {v}\r\n" for v in lengths)
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + b'{"text": "a"}')
        head, _, body = s.makefile("rb").read().decode().partition("\r\n\r\n")  # to the end: it closes
    assert head.startswith("HTTP/1.1 400") and "Connection: close" in head
    assert "bad Content-Length" in json.loads(body)["error"]


def test_repeated_content_lengths_that_agree_are_one(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as s:  # RFC 9112, 6.3
        s.sendall(b'POST /complete HTTP/1.1\r\nHost: x\r\nContent-Length: 13, 13\r\n\r\n{"text": "a"}')
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_query_string_is_ignored(server):
    """Health checkers and cache-busting clients add one: the endpoint is the path before it."""
    assert call(server, "GET", "/health?probe=1")[:2] == call(server, "GET", "/health")[:2]
    body = {"text": "the cat sat on the m", "k": 3}
    status, r, _ = call(server, "POST", "/complete?t=123", body)
    assert status == 200 and r == call(server, "POST", "/complete", body)[1]
    status, r, _ = call(server, "POST", "/nope?x=1", body)
    assert status == 404 and "no endpoint /nope;" in r["error"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405_in_json_with_allow(server, method):
    conn = HTTPConnection(*server.server_address[:2], timeout=30)
    for path, allow in [("/complete", "POST"), ("/health", "GET, HEAD")]:
        conn.request(method, path, b'{"text": "a"}')  # with a body, which must not be read as the next request
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == allow
        assert resp.getheader("Content-Type").startswith("application/json")
        assert f"{path} takes" in json.loads(resp.read())["error"]
    conn.request(method, "/nope")
    resp = conn.getresponse()
    assert resp.status == 404 and "no endpoint /nope" in json.loads(resp.read())["error"]
    conn.request("GET", "/health")  # the same keep-alive connection still serves
    assert conn.getresponse().status == 200
    conn.close()


def test_head_health_gets_the_headers_of_get(server):
    conn = HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", "/health")
    got = conn.getresponse()
    body = got.read()
    conn.request("HEAD", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    assert resp.getheader("Content-Length") == str(len(body))
    assert resp.getheader("Content-Type") == got.getheader("Content-Type")
    conn.request("HEAD", "/complete")
    resp = conn.getresponse()
    assert resp.status == 405 and resp.getheader("Allow") == "POST" and resp.read() == b""
    conn.request("GET", "/health")  # no stray body bytes ahead of this answer
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == body
    conn.close()


def test_http_servers_own_refusals_are_json(server):
    for request, status in [(b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n", 501),  # a method HTTP does not define
                            (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 505),
                            (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414)]:
        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            s.sendall(request)
            head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status) and b"application/json" in head, head
        assert json.loads(body)["error"]


@pytest.fixture
def watched_server(proto):
    """A server that says when it is done with each connection: a test then knows that
    whatever it would print about a client gone away has been printed."""
    srv = Server(proto, "127.0.0.1", 0)
    srv.finished = queue.Queue()
    close = srv.shutdown_request

    def shutdown_request(request):
        close(request)
        srv.finished.put(request)

    srv.shutdown_request = shutdown_request
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def raw_request(path: str, body: bytes, length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + body


GENERATE = json.dumps({"text": "the cat", "max_words": 200}).encode()


@pytest.mark.parametrize("data, reset", [
    (raw_request("/generate", GENERATE), False),  # closed before its answer: the answer meets a broken pipe
    (raw_request("/generate", GENERATE), True),  # reset, perhaps before the server has read the request
    (raw_request("/complete", b'{"text": "a"}', length=40), False),  # closed in the middle of its body
])
def test_a_client_gone_away_is_not_reported(watched_server, capfd, data, reset):
    """An editor cancels a stale keystroke's request by closing the connection: ordinary
    traffic, which must not print a traceback (or anything) on the server's terminal."""
    s = socket.create_connection(watched_server.server_address[:2], timeout=30)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(data)
    s.close()
    watched_server.finished.get(timeout=60)
    assert capfd.readouterr().err == ""
    assert call(watched_server, "GET", "/health")[0] == 200


def test_a_body_shorter_than_its_content_length_is_refused(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(raw_request("/complete", b'{"text": "a"}', length=40))
        s.shutdown(socket.SHUT_WR)  # sends no more, still reads
        reply = s.makefile("rb").read().decode()  # to the end: the server closes after its answer
    assert reply.startswith("HTTP/1.1 400") and "ended after 13 of the 40 bytes" in reply


def test_a_body_that_stops_arriving_gets_408(server, monkeypatch, capfd):
    monkeypatch.setattr(Handler, "timeout", 0.5)  # seconds; read when a connection starts
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(raw_request("/complete", b'{"text"', length=40))
        reply = s.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply
    assert capfd.readouterr().err == ""


@pytest.fixture(scope="module")
def int8_server(tiny_run):
    from lm.quantize import quantize

    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    srv = Server(Predictor(quantize(model), tok, memory=NeuralCache(50, 0.5, 0.2, 16)), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("which", ["server", "int8_server"])  # the CLI serves int8 weights by default
def test_concurrent_clients_get_the_answers_of_sequential_ones(which, request):
    server = request.getfixturevalue(which)
    texts = ["the cat sat on the m", "a bird ", "my friend looked at", "the president ran to the ci",
             "the old man ", "the dog walked past a t", "", "the house"]
    expected = {t: call(server, "POST", "/complete", {"text": t, "k": 4})[1] for t in texts}
    errors = []

    def client(i):
        conn = HTTPConnection(*server.server_address[:2], timeout=60)  # keep-alive: several requests
        for j in range(6):
            t = texts[(i + j) % len(texts)]
            conn.request("POST", "/complete", json.dumps({"text": t, "k": 4}))
            resp = conn.getresponse()
            got = json.loads(resp.read())
            if resp.status != 200 or got != expected[t]:
                errors.append((t, resp.status, got))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert call(server, "GET", "/health")[0] == 200


def test_requests_per_second(proto):
    r = requests_per_second(proto, "the cat sat on the mat .", requests=40, clients=2)
    assert r["requests"] == 40 and r["failures"] == 0 and r["requests_per_s"] > 0


def test_listen_errors_name_the_flag_to_change(proto, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LMError, match=rf"127\.0\.0\.1:{port}: .*; choose another --port"):
            Server(proto, "127.0.0.1", port)
    with pytest.raises(LMError, match=r"192\.0\.2\.1:0: .*; check --host") as e:  # TEST-NET-1: on no machine
        Server(proto, "192.0.2.1", 0)
    assert "--port" not in str(e.value)

    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)  # no resolver is asked
    with pytest.raises(LMError, match="nosuch.invalid: Name or service not known; --host takes") as e:
        Server(proto, "nosuch.invalid", 0)
    assert "--port" not in str(e.value)


def has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


@needs_ipv6
def test_an_ipv6_host_is_served(proto):
    for host in ["::1", "[::1]"]:  # as an address, and as written in a URL
        srv = Server(proto, host, 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            port = srv.server_address[1]
            assert srv.url == f"http://[::1]:{port}"
            assert call(srv, "GET", "/health")[0] == 200
        finally:
            srv.shutdown()
            srv.server_close()


@needs_ipv6
def test_lm_serve_on_ipv6_loopback_says_where_and_gives_no_warning(tiny_run):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "lm", "serve", str(tiny_run), "--host", "[::1]", "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # a warning about an exposed host would come first
        assert first.startswith("serving http://[::1]:"), first + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped"


def test_a_sigterm_right_after_the_serving_line_stops_cleanly(proto):
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("serving"):  # what a service manager waits for
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before log returns

    assert serve(proto, "127.0.0.1", 0, log=log) == 0  # pytest runs tests in the main thread, where signals go
    assert lines[-1] == "stopped"


def test_sigterm_stops_the_server_cleanly(tiny_run):
    """kill, systemd and docker stop send SIGTERM: the server says so and exits 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "lm", "serve", str(tiny_run), "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving http://127.0.0.1:"), first + proc.stderr.read()
        host, port = first.split()[1].removeprefix("http://").split(":")
        conn = HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped" and "Traceback" not in err

