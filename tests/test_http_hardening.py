"""The HTTP layer bounds request headers, refuses in JSON, and answers HTTP/1.0 as such.

Every test speaks raw HTTP over a socket, since the wire is the point, to the test
server on asyncio's loop and to ``chatstream serve`` in its own process (uvloop).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import orjson
import pytest

from chatstream.config import Settings
from chatstream.events import FrameDecoder
from tests.support.process import server_process
from tests.support.server import live_server
from tests.support.sse import stream

BOUND = 64 * 1024
HOST = b"Host: 127.0.0.1\r\n"


@dataclass(frozen=True)
class Target:
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """The test server (asyncio's loop), or ``chatstream serve`` (uvloop); 20 ms a token."""
    store = f"sqlite:///{tmp_path_factory.mktemp('http') / 'chat.db'}"
    if request.param == "asyncio":
        with live_server(Settings(model="scripted:20", store=store)) as live:
            yield Target(live.url)
    else:
        with server_process("--model", "scripted:20", "--store", store) as process:
            yield Target(process.url)


@dataclass
class Reply:
    """What a raw exchange got back: the bytes, and whether the server closed."""

    raw: bytes
    closed: bool

    @property
    def head(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[0]

    @property
    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = (line.partition(":") for line in lines)
        return [(name.strip().lower(), value.strip()) for name, _, value in pairs]

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]


def exchange(port: int, request: bytes, *, timeout: float = 5.0) -> Reply:
    """Send ``request`` (from a thread, so a server that stops reading cannot block us)
    and read until the server closes or ``timeout`` passes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)

    def send() -> None:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server stopped reading and closed: what some tests expect

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    closed = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received.extend(chunk)
    finally:
        sock.close()
        sender.join(timeout)
    return Reply(bytes(received), closed)


def assert_refused(reply: Reply, status: int, code: str) -> None:
    """A refusal: the status, a JSON error body of its stated length, one ``Connection: close``."""
    assert reply.raw, "no response at all"
    assert reply.status == status, reply.raw[:300]
    assert reply.header("content-type") == ["application/json"]
    assert reply.header("connection") == ["close"]
    assert reply.header("transfer-encoding") == []
    assert reply.header("content-length") == [str(len(reply.body))]
    error = orjson.loads(reply.body)["error"]
    assert error["code"] == code
    assert error["message"]
    assert reply.closed


def get(path: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + path + b" " + version + b"\r\n" + HOST + b"".join(headers) + b"\r\n"


# Request line and headers: 64 KiB in all, 100 headers.


def test_headers_up_to_the_bound_are_served_and_past_it_get_431(target: Target) -> None:
    big = b"X-Big: " + b"a" * (BOUND - 200) + b"\r\n"
    assert exchange(target.port, get(b"/api/health", big)).status == 200
    over = exchange(target.port, get(b"/api/health", b"X-Big: " + b"a" * 2_000_000 + b"\r\n"))
    assert_refused(over, 431, "HEADERS_TOO_LARGE")
    # A body sent with the headers, in the same write, does not count against them:
    # this one is refused for the message's length (a turn's limit), not for the head.
    body = b'{"message": "' + b"x" * 200_000 + b'"}'
    post = (
        b"POST /api/chat HTTP/1.1\r\n" + HOST + big + b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reply = exchange(target.port, post)
    assert 400 <= reply.status < 500
    assert reply.status != 431


def test_too_many_headers_get_431(target: Target) -> None:
    fine = exchange(target.port, get(b"/api/health", *(b"X-%d: y\r\n" % i for i in range(90))))
    assert fine.status == 200
    many = exchange(target.port, get(b"/api/health", *(b"X-%d: y\r\n" % i for i in range(101))))
    assert_refused(many, 431, "HEADERS_TOO_LARGE")


def test_a_request_line_over_the_bound_gets_431(target: Target) -> None:
    reply = exchange(target.port, get(b"/api/health?q=" + b"a" * (BOUND + 1000)))
    assert_refused(reply, 431, "HEADERS_TOO_LARGE")


FLOODERS = 16
FLOOD_CAP = 64 * 1024 * 1024


def _flood(port: int) -> tuple[int, float, bytes]:
    """One endless header line, sent until the server cuts us off (or FLOOD_CAP)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.settimeout(15)
    started = time.monotonic()
    sent = 0
    chunk = b"a" * 16384
    try:
        sock.sendall(b"GET /api/health HTTP/1.1\r\n" + HOST + b"X-Endless: ")
        while sent < FLOOD_CAP:
            sent += sock.send(chunk)
    except OSError:
        pass  # cut off
    took = time.monotonic() - started
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except OSError:
        pass
    sock.close()
    return sent, took, reply


async def test_a_flood_of_endless_headers_is_cut_off_at_the_bound_while_streams_keep_pace(
    target: Target,
) -> None:
    async with httpx.AsyncClient(base_url=target.url, timeout=30) as http:
        gaps: list[float] = []
        last = time.monotonic()

        def tick() -> None:
            nonlocal last
            now = time.monotonic()
            gaps.append(now - last)
            last = now

        pool = ThreadPoolExecutor(FLOODERS)
        try:
            story = {"message": "count to 60"}
            async with http.stream("GET", "/api/chat/stream", params=story) as r:
                assert r.status_code == 200
                floods = None
                async for _ in r.aiter_raw():
                    tick()
                    if floods is None and len(gaps) > 3:
                        floods = [pool.submit(_flood, target.port) for _ in range(FLOODERS)]
                        last = time.monotonic()
            assert floods is not None
            results = [f.result(30) for f in floods]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        # Each flooder was cut off soon, having got in little past the bound (the rest sat
        # in the kernel's socket buffers), and was told why.
        for sent, took, reply in results:
            assert sent < 8 * 1024 * 1024, f"the server read on: {sent} bytes"
            assert took < 5
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
        # The stream kept its pace meanwhile (20 ms a token), and the server answers.
        assert max(gaps[4:]) < 1.0, f"the stream stalled for {max(gaps[4:]):.2f} s"
        assert (await http.get("/api/health")).status_code == 200


# Whatever the parser refuses gets a JSON body too.

REFUSED = {
    "negative content-length": (
        b"POST /api/chat HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n"
    ),
    "content-length and transfer-encoding": (
        b"POST /api/chat HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "garbage request line": b"GARBAGE\r\n\r\n",
    "space in the header name": get(b"/api/health", b"Bad Name: x\r\n"),
    "bad chunk size": (
        b"POST /api/chat HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", REFUSED.values(), ids=REFUSED.keys())
def test_what_the_parser_refuses_gets_a_json_400(target: Target, request_bytes: bytes) -> None:
    assert_refused(exchange(target.port, request_bytes), 400, "INVALID_REQUEST")


def test_a_bad_request_in_a_pipeline_is_refused_after_the_good_ones_are_answered(
    target: Target,
) -> None:
    # Sent in one write: the parser refuses the third while the stream still runs.
    garbage = b"GARBAGE NONSENSE\r\n\r\n"
    pipeline = get(b"/api/health") + get(b"/api/chat/stream?message=hi") + garbage
    reply = exchange(target.port, pipeline)
    responses = [b"HTTP/1.1 " + r for r in reply.raw.split(b"HTTP/1.1 ")[1:]]
    assert [Reply(r, False).status for r in responses] == [200, 200, 400]
    # The whole stream, to its last chunk, came before the refusal.
    assert b"event: done" in responses[1]
    assert responses[1].endswith(b"0\r\n\r\n")
    assert_refused(Reply(responses[2], reply.closed), 400, "INVALID_REQUEST")


# HTTP/1.0: no chunked encoding, one Connection header, a stream ended by the close.


def test_http10_gets_no_chunks_one_connection_header_and_a_stream_ended_by_the_close(
    target: Target,
) -> None:
    health = exchange(target.port, get(b"/api/health", version=b"HTTP/1.0"))
    assert health.status == 200
    assert health.header("connection") == ["close"]
    assert health.header("transfer-encoding") == []
    assert health.header("content-length") == [str(len(health.body))]
    assert orjson.loads(health.body)["status"] == "ok"
    assert health.closed

    reply = exchange(target.port, get(b"/api/chat/stream?message=hi", version=b"HTTP/1.0"))
    assert reply.status == 200
    assert reply.header("content-type") == ["text/event-stream; charset=utf-8"]
    assert reply.header("connection") == ["close"]
    assert reply.header("transfer-encoding") == []
    assert reply.header("content-length") == []
    assert reply.closed
    frames = FrameDecoder().feed(reply.body)  # readable as it is: no chunk sizes in it
    assert [f.event for f in frames][-1] == "done"
    assert "".join(orjson.loads(f.data)["content"] for f in frames if f.event == "token")


async def test_keep_alive_is_kept_as_asked_with_one_connection_header(target: Target) -> None:
    keep = b"Connection: keep-alive\r\n"
    health = get(b"/api/health", keep, version=b"HTTP/1.0")
    with socket.create_connection(("127.0.0.1", target.port)) as sock:
        sock.settimeout(5)
        for _ in range(2):  # the same connection answers twice
            sock.sendall(health)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            reply = Reply(head, closed=False)
            assert reply.status == 200
            assert reply.header("connection") == ["keep-alive"]
            length = int(reply.header("content-length")[0])
            body = b""
            while len(body) < length:
                body += sock.recv(length - len(body))
    # A stream has no length, so it closes even when asked to keep alive.
    streamed = exchange(target.port, get(b"/api/chat/stream?message=hi", keep, version=b"HTTP/1.0"))
    assert streamed.header("connection") == ["close"]
    assert streamed.header("transfer-encoding") == []
    assert streamed.closed
    # HTTP/1.1 streams as before, and a stream asked to close says close, once.
    async with httpx.AsyncClient(base_url=target.url, timeout=30) as http:
        streamed = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
        assert streamed.types[-1] == "done"
        # HTTP/1.1 keeps the connection by default: no Connection header is needed.
        assert streamed.response.headers.get_list("connection") == []
        assert streamed.response.headers["transfer-encoding"] == "chunked"
        again = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
        assert again.types[-1] == "done"
    closing = exchange(target.port, get(b"/api/chat/stream?message=hi", b"Connection: close\r\n"))
    assert closing.header("connection") == ["close"]
    assert closing.header("transfer-encoding") == ["chunked"]
    assert closing.raw.endswith(b"0\r\n\r\n")
    assert closing.closed


def _trickle(port: int, head: bytes, *, chunk: bytes, for_s: float) -> tuple[bytes, float | None]:
    """Send ``head``, then ``chunk`` every 0.2 s; what came back, and when the server
    closed (seconds after the first response bytes), or None if it never did."""
    received = bytearray()
    answered: float | None = None
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        sock.sendall(head)
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            try:
                sock.sendall(chunk)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                return bytes(received), time.monotonic() - (answered or time.monotonic())
            answered = answered or time.monotonic()
            received.extend(data)
    return bytes(received), None


@pytest.mark.parametrize(
    ("head", "chunk"),
    [
        (get(b"/api/health", b"Content-Length: 100000\r\n"), b"x"),
        (get(b"/api/health", b"Transfer-Encoding: chunked\r\n"), b"1\r\nx\r\n"),
        (
            b"DELETE /api/chat/sessions/nobody HTTP/1.1\r\n"
            + HOST
            + b"Content-Length: 9999\r\n\r\n",
            b"x",
        ),
    ],
    ids=["get-with-length", "get-chunked", "delete-with-length"],
)
def test_a_body_trickled_after_its_answer_does_not_hold_the_connection(
    target: Target, head: bytes, chunk: bytes
) -> None:
    # The answer comes at once (nothing reads these bodies); the connection then closes
    # within the linger time instead of taking the trickle for as long as it lasts.
    received, closed_after = _trickle(target.port, head, chunk=chunk, for_s=12)
    assert received.startswith(b"HTTP/1.1 "), received[:100]
    assert closed_after is not None, "the connection stayed open"
    assert closed_after < 6


def test_a_body_sent_on_after_a_413_is_cut_off(target: Target) -> None:
    # A client that goes on sending after its 413 is read for at most a little more.
    head = (
        b"POST /api/chat HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Content-Length: 100000000000\r\n\r\n"
    )
    sent = 0
    reply = b""
    with socket.create_connection(("127.0.0.1", target.port)) as sock:
        sock.settimeout(10)
        sock.sendall(head)
        block = b"x" * 65536
        try:
            while sent < 1 << 30:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass  # the server closed
        with contextlib.suppress(OSError):
            reply = sock.recv(65536)
    assert sent < 64 << 20, f"the server took {sent >> 20} MB after refusing the request"
    assert not reply or reply.startswith(b"HTTP/1.1 413"), reply[:100]


def test_a_body_that_ends_after_its_answer_keeps_the_connection(target: Target) -> None:
    # A body that arrives whole soon after the answer leaves the connection in use.
    with socket.create_connection(("127.0.0.1", target.port)) as sock:
        sock.settimeout(5)
        sock.sendall(get(b"/api/health", b"Content-Length: 5\r\n"))
        first = b""
        while b'"accepting"' not in first:
            first += sock.recv(65536)
        time.sleep(0.3)
        sock.sendall(b"hello" + get(b"/api/health"))
        second = b""
        while b'"accepting"' not in second:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            second += chunk
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
