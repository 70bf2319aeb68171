"""``lm serve``: the autocomplete engine as a small HTTP JSON API, for editors and web pages.

    lm serve checkpoints/wikitext-2/best.pt            # http://127.0.0.1:8080
    curl -s localhost:8080/complete -d '{"text": "The film was rel", "k": 3}'
    # {"kind": "complete", "prefix": "rel", "suggestions": [{"word": "released", "prob": 0.41}, ...]}

Every request is one JSON object in a POST body (``GET /health`` aside); every answer is
a JSON object. ``text`` is natural text as typed, up to the cursor.

==================  ==================================  ===========================================
endpoint            request fields (default)            answer
==================  ==================================  ===========================================
``GET /health``                                         ``{"status": "ok", "vocab": V, "memory": bool}``
``POST /complete``  ``text``, ``k`` (5)                 ``{"kind": "next" | "complete", "prefix": str,
                                                        "suggestions": [{"word": str, "prob": float}]}``
                                                        what a keyboard shows: completions of the word
                                                        being typed (text not ending in a space), else
                                                        the next words
``POST /next``      ``text``, ``k`` (5)                 ``{"suggestions": [...]}``: next words, every
                                                        word of the text taken as finished
``POST /phrases``   ``text``, ``k`` (3), ``words`` (3)  ``{"phrases": [{"text": str, "prob": float}]}``:
                                                        likely continuations of that many words
``POST /generate``  ``text`` (""), ``max_words`` (50),  ``{"text": str, "words": int}``: a sampled
                    ``temperature`` (1.0), ``top_k``    continuation (only the new text); the same
                    (0), ``top_p`` (1.0), ``seed`` (0)  seed gives the same text
==================  ==================================  ===========================================

Probabilities are the model's (with the session memory mixed in, see ``lm.predict``);
words come in natural text with the typed casing. Limits: a body of at most 256 KiB,
``text`` at most 20,000 characters, ``k`` 1-100, ``words`` 1-8, ``max_words`` 1-1000,
``temperature`` 0-100, ``top_k`` 0 or more, ``top_p`` 1e-6 to 1, ``seed``
0 to 2**63 - 1. Anything else, an unknown field, a wrong type (``true`` is not a number)
or malformed JSON is answered ``400`` with ``{"error": "what is wrong"}``; an unknown
path ``404`` (a query string is ignored), another method ``405`` with an ``Allow`` header
(``HEAD /health`` gets the headers of ``GET``, as health checkers expect; a method HTTP
does not define ``501``), a body too large ``413``, no Content-Length ``411`` (one that
is not digits, or two that differ, ``400``), a body shorter than its Content-Length
``400`` (``408`` when it stops arriving for 30 s). A client that goes away before its
answer (an editor cancelling a stale request) is no error: nothing is printed.

Concurrency: each request gets its own predictor (``Predictor.fork``: no model work,
no copy of the weights) over the shared model, which is only read. So requests never
see each other's text and run in parallel on the server's threads (torch releases the
interpreter lock inside its kernels), where one predictor behind a lock would serve one
request at a time and would have to re-sync its state to every client's text anyway.
The session memory of a request holds the words learned at start-up (``--learn``)
and its own text.

The server listens on the loopback interface unless ``--host`` says otherwise (a name, or
an IPv4 or IPv6 address: ``::1``); it has no authentication, so expose it only where
anyone who can reach it may use it.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lm.errors import LMError
from lm.predict import Predictor
from lm.sample import continue_text

MAX_BODY = 256 << 10  # bytes of a request body
DRAIN_MAX = 16 << 20  # a larger body up to this is read and dropped before the 413; beyond it, the connection just closes
MAX_TEXT = 20_000  # characters of ``text``
MAX_K = 100
MAX_PHRASE_WORDS = 8
MAX_GENERATE = 1000  # words per /generate
_INT, _FLOAT, _STR = "an integer", "a number", "a string"
# endpoint -> {field: (kind, default, lowest, highest)}; a default of None means required
FIELDS: dict[str, dict[str, tuple]] = {
    "/complete": {"text": (_STR, None, 0, MAX_TEXT), "k": (_INT, 5, 1, MAX_K)},
    "/next": {"text": (_STR, None, 0, MAX_TEXT), "k": (_INT, 5, 1, MAX_K)},
    "/phrases": {"text": (_STR, None, 0, MAX_TEXT), "k": (_INT, 3, 1, MAX_K),
                 "words": (_INT, 3, 1, MAX_PHRASE_WORDS)},
    "/generate": {"text": (_STR, "", 0, MAX_TEXT), "max_words": (_INT, 50, 1, MAX_GENERATE),
                  "temperature": (_FLOAT, 1.0, 0.0, 100.0), "top_k": (_INT, 0, 0, 1 << 31),
                  "top_p": (_FLOAT, 1.0, 1e-6, 1.0), "seed": (_INT, 0, 0, (1 << 63) - 1)},
}
METHODS = {"/health": ("GET", "HEAD"), **{path: ("POST",) for path in FIELDS}}  # path -> the methods it takes


class RequestError(Exception):
    """A request the client must fix: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str, allow: str | None = None):
        super().__init__(message)
        self.status = status
        self.allow = allow  # the Allow header of a 405


def validate(path: str, body: object) -> dict:
    """The request's fields, checked and with defaults filled in, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    spec = FIELDS[path]
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r} for {path}; "
                                                   f"expected {', '.join(spec)}")
    out = {}
    for name, (kind, default, lo, hi) in spec.items():
        if name not in body:
            if default is None:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{path} needs the field {name!r} ({kind})")
            out[name] = default
            continue
        v = body[name]
        ok = {_STR: isinstance(v, str),
              _INT: isinstance(v, int) and not isinstance(v, bool),
              _FLOAT: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}[kind]
        if not ok:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be {kind}, got {json.dumps(v)[:40]}")
        if kind == _STR and len(v) > hi:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} is {len(v):,} characters long; at most {hi:,}")
        if kind != _STR and not lo <= v <= hi:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be between {lo} and {hi}, got {v}")
        out[name] = v
    return out


def answer(proto: Predictor, path: str, req: dict) -> dict:
    """The JSON answer to a validated request, on a predictor of its own."""
    if path == "/generate":
        text = "".join(continue_text(proto.model, proto.tok, req["text"], req["max_words"],
                                     temperature=float(req["temperature"]), top_k=req["top_k"],
                                     top_p=float(req["top_p"]), seed=req["seed"]))
        return {"text": text, "words": req["max_words"]}
    pred = proto.fork()
    if path == "/next":
        pred.feed_words(pred.tok.typed_words(req["text"]))
        return {"suggestions": [{"word": c.text, "prob": c.prob} for c in pred.next_words(req["k"])]}
    pred.update(req["text"])
    if path == "/phrases":
        return {"phrases": [{"text": c.text, "prob": c.prob} for c in pred.phrases(req["k"], req["words"])]}
    s = pred.suggest(req["k"])
    return {"kind": s.kind, "prefix": s.prefix, "suggestions": s.to_json()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an editor sends a request per keystroke
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle held the body ~40 ms
    timeout = 30  # seconds a client may take to send its request
    server: "Server"

    def do_GET(self) -> None:
        """Every method comes here (http.server calls ``do_<METHOD>``), so that every answer,
        a refusal too, is JSON."""
        try:
            try:
                self._answer(self.path.partition("?")[0])  # health checkers and cache-busting clients add a query
            except RequestError as e:
                self._send(e.status, {"error": str(e)}, allow=e.allow)
            except LMError as e:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except (ConnectionError, TimeoutError):  # the client went away (an editor cancelling a stale
            # request) or stopped reading its answer: no one to answer
            self.close_connection = True
        except Exception as e:  # a bug: log one line, answer, keep serving
            print(f"lm serve: error: {self.path[:100]}: {type(e).__name__}: {e}", file=sys.stderr)
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may be gone too
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    # HTTP's other methods (RFC 9110, and PATCH) get 405 with Allow; one HTTP does not define
    # gets http.server's 501, in JSON (send_error below)
    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_GET

    def _answer(self, path: str) -> None:
        n = self._content_length()  # first: without it, where this request ends and the next begins is unknown
        methods = METHODS.get(path, ())
        if self.command in methods and path in FIELDS:
            req = validate(path, self._json_body(n))
            self._send(HTTPStatus.OK, answer(self.server.proto, path, req))
            return
        # a body sent where none is read is dropped, so that the next request starts after it;
        # one too large to read, or cut short, ends the connection
        if n and (n > MAX_BODY or len(self.rfile.read(n)) < n):
            self.close_connection = True
        if not methods:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {path[:100]}; there are GET /health, "
                                                     f"POST {', POST '.join(FIELDS)}")
        if self.command not in methods:
            takes = "POST with a JSON body" if path in FIELDS else " or ".join(methods)
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {takes}", allow=", ".join(methods))
        self._send(HTTPStatus.OK, {"status": "ok", "vocab": self.server.proto.tok.vocab_size,
                                   "memory": self.server.proto.memory is not None})

    def _content_length(self) -> int | None:
        """The body's length in bytes, None without a Content-Length header. Only digits count
        (``int`` would take "-1", "+15" and "1_5"), and repeated values must agree (RFC 9112,
        6.3); otherwise the end of the body is unknown: 400, and the connection closes."""
        values = [v.strip(" \t") for field in self.headers.get_all("Content-Length", ()) for v in field.split(",")]
        if not values:
            return None
        lengths = {v.lstrip("0") or "0" for v in values}
        if len(lengths) > 1 or not all(v.isascii() and v.isdigit() for v in values):
            self.close_connection = True
            got = ", ".join(values)
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {got[:40]!r}: send the body's length "
                                                       f"in bytes (digits only), once")
        n = lengths.pop()
        if len(n) > 18:  # past any body (and int() refuses more than 4,300 digits)
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body's length has {len(n):,} digits; "
                                                                    f"at most {MAX_BODY:,} bytes")
        return int(n)

    def _json_body(self, n: int | None) -> object:
        if n is None:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length header")
        if n > MAX_BODY:
            self.close_connection = True
            self._drain(n)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {n:,} bytes; at most {MAX_BODY:,}")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout} s; send "
                                                           f"the {n:,} bytes its Content-Length announces") from None
        if len(raw) < n:  # the client stopped sending (half-closed): the body is cut, not complete
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(raw):,} of the {n:,} bytes "
                                                       f"its Content-Length announced")
        try:
            return json.loads(raw.decode("utf-8-sig"))  # -sig: a leading byte-order mark is dropped (RFC 8259 allows)
        except UnicodeDecodeError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8") from None
        except RecursionError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body's JSON is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {e.msg} at "
                                                       f"line {e.lineno} column {e.colno}") from None
        except ValueError:  # json's int() refuses a number of more digits than this limit
            raise RequestError(HTTPStatus.BAD_REQUEST, f"a number in the body has more than "
                                                       f"{sys.get_int_max_str_digits():,} digits") from None

    def _drain(self, n: int) -> None:
        """Read and drop a refused body of up to DRAIN_MAX bytes, waiting at most a second
        for each piece: a client still sending when the connection closes gets a broken
        pipe instead of the 413. A client that announced a body and sends none is not
        waited for."""
        left = n if n <= DRAIN_MAX else 0
        self.connection.settimeout(1.0)
        try:
            while left > 0 and (chunk := self.rfile.read1(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:  # timed out or reset: answer anyway
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, a line too long, a
        method HTTP does not define) in JSON like every other answer; the connection closes."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not a version read from the request (it was refused before
            self.request_version = "HTTP/1.0"  # it was read, as 505 is), and HTTP/0.9 would drop the status line
        status = HTTPStatus(code)
        self._send(status, {"error": message or status.phrase})

    def _send(self, status: HTTPStatus, obj: dict, allow: str | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers GET would get, without the body
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        pass  # one line per keystroke would drown the terminal; errors are printed above


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open keep-alive connections

    def __init__(self, proto: Predictor, host: str = "127.0.0.1", port: int = 8080):
        self.proto = proto
        if host.startswith("[") and host.endswith("]"):  # [::1], as written in a URL
            host = host[1:-1]
        try:
            found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise LMError(f"cannot listen on {host}: {e.strerror}; --host takes an address or a name of "
                          f"this machine") from None
        # IPv4 where the name has it (so "localhost" stays 127.0.0.1, as before), else IPv6 ("::1")
        family, _, _, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
        self.address_family = family  # read by TCPServer.__init__ to make the socket
        try:
            super().__init__(address, Handler)
        except OSError as e:
            advice = {errno.EADDRINUSE: "choose another --port (0: any free one)",
                      errno.EACCES: "a port below 1024 needs administrator rights; choose another --port"}
            raise LMError(f"cannot listen on {_netloc(address[0], port)}: {e.strerror or e}; "
                          f"{advice.get(e.errno, 'check --host: it must be an address of this machine')}") from None

    def handle_error(self, request, client_address) -> None:
        """An exception that escaped a handler (socketserver prints its traceback): a client
        gone away while its request was read is nothing to report; anything else is one line."""
        e = sys.exception()
        if not isinstance(e, (ConnectionError, TimeoutError)):
            print(f"lm serve: error: {type(e).__name__}: {e}", file=sys.stderr)

    @property
    def url(self) -> str:
        return f"http://{_netloc(*self.server_address[:2])}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets, as in a URL


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(proto: Predictor, host: str = "127.0.0.1", port: int = 8080, log=print) -> int:
    """Serve until Ctrl-C or SIGTERM (what ``kill``, systemd and ``docker stop`` send):
    either closes the socket, lets the requests in flight finish, and returns 0."""
    server = Server(proto, host, port)
    if not ipaddress.ip_address(server.server_address[0]).is_loopback:
        log(f"warning: listening on {server.server_address[0]}, not only this machine; the API has no "
            f"authentication")
    main = threading.current_thread() is threading.main_thread()  # only there can signals be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:  # from here on: a service manager may stop the server as soon as it says it serves
        log(f"serving {server.url} (GET /health, POST {', '.join(FIELDS)}); Ctrl-C to stop")
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def requests_per_second(proto: Predictor, text: str, requests: int = 400, clients: int = 4) -> dict:
    """Throughput of ``POST /complete`` on loopback: ``clients`` threads, each on one
    keep-alive connection, send the prefixes of ``text`` as a typist would. Client and
    server share this process (and its interpreter lock), so this is a floor."""
    server = Server(proto, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prefixes = [text[:i] for i in range(1, min(len(text), MAX_TEXT) + 1)] or [""]
    per_client = max(1, requests // clients)
    failures = []

    def client(c: int) -> None:
        conn = HTTPConnection(*server.server_address[:2], timeout=60)
        for i in range(per_client):
            body = json.dumps({"text": prefixes[(c * per_client + i) % len(prefixes)], "k": 5})
            conn.request("POST", "/complete", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures.append(resp.status)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    server.shutdown()
    server.server_close()
    n = per_client * clients
    return {"requests": n, "clients": clients, "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 1), "failures": len(failures)}
