"""Outgoing HTTP against hostile servers: real raw-socket servers on loopback that trickle their
answer (one header line at a time, a body byte at a time, a redirect chain of slow hops), so a
photo fetch or a callback attempt must end by its one deadline; the embedded IPv4 addresses of
6to4, Teredo, NAT64 and the IPv4-mapped/compatible forms; control characters in URLs."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpcore
import httpx
import pytest

from service.errors import FetchRefused
from service.outbound.callbacks import CallbackTrust, deliver
from service.outbound.deadline import Deadline, DeadlineBackend, DeadlineStream
from service.outbound.fetch import allowed_address, check_url, embedded_ipv4, fetch_photo, request
from service.outbound.redact import public_text
from service.settings import Settings

# The deadline under test and the most a call may take: the margin is generous so a loaded
# machine cannot fail the test, while the servers below would hold an unbounded call >= 10 s.
DEADLINE = 1.0
AT_MOST = 4.0


class Peer:
    """The server's side of one connection, for a script: what the client sent first (a
    request's head, or a TLS ClientHello), and a way to answer slowly that ends when the client
    hangs up or the server stops."""

    def __init__(self, conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        self.conn = conn
        self.head = head
        self.stop = stop

    @property
    def path(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)  # raises OSError once the client has gone

    def pause(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise OSError("the server is stopping")


Script = Callable[[Peer], None]


def read_head(conn: socket.socket) -> bytes:
    """An HTTP request's head."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = conn.recv(65536)
        if not piece:
            raise OSError("the client hung up")
        head += piece
    return head


def read_client_hello(conn: socket.socket) -> bytes:
    """The first TLS record (the ClientHello: its server name is in clear)."""
    record = b""
    while len(record) < 5 or len(record) < 5 + int.from_bytes(record[3:5], "big"):
        piece = conn.recv(65536)
        if not piece:
            raise OSError("the client hung up")
        record += piece
    return record


@contextmanager
def raw_server(
    script: Script, first: Callable[[socket.socket], bytes] = read_head
) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that reads what a client sends ``first``, then runs ``script``
    on the connection; yields its port. Its threads end with the ``with`` block."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                script(Peer(conn, first(conn), stop))
            except OSError:  # the client gave up, as it should
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=handle, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(timeout=5)
        listener.close()
        for thread in threads:
            thread.join(timeout=5)


def trickled_headers(peer: Peer) -> None:
    """A status line, then one header line every 0.5 s for 12 s, then a small body: every read
    waits less than any per-read timeout, so only a deadline ends it."""
    peer.send(b"HTTP/1.1 200 OK\r\n")
    for n in range(24):
        peer.pause(0.5)
        peer.send(f"X-Slow-{n}: 1\r\n".encode())
    peer.send(b"Content-Length: 2\r\n\r\nok")


def trickled_body(peer: Peer) -> None:
    """Headers at once, then a body of 100 bytes, one every 0.5 s."""
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    for _ in range(100):
        peer.pause(0.5)
        peer.send(b"x")


def slow_redirects(peer: Peer) -> None:
    """/hop/N answers after 0.6 s with a redirect to /hop/N+1, /hop/3 with a 200: each hop is
    well within a 1 s timeout, the four together are not."""
    hop = int(peer.path.rsplit("/", 1)[1])
    peer.pause(0.6)
    if hop < 3:
        peer.send(f"HTTP/1.1 302 Found\r\nLocation: /hop/{hop + 1}\r\n".encode())
        peer.send(b"Content-Length: 0\r\n\r\n")
    else:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    """How long ``call`` took, and what it raised."""
    start = time.monotonic()
    try:
        call()
    except (FetchRefused, httpx.HTTPError) as e:
        return time.monotonic() - start, e
    return time.monotonic() - start, None


def fetch(url: str) -> bytes:
    return fetch_photo(
        url, ["127.0.0.1"], allow_loopback=True, timeout=DEADLINE, max_bytes=1_000_000
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", [trickled_headers, trickled_body], ids=["headers", "body"])
def test_a_trickling_server_cannot_hold_a_fetch_past_its_deadline(script: Script) -> None:
    with raw_server(script) as port:
        seconds, error = timed(lambda: fetch(f"http://127.0.0.1:{port}/photo.jpg"))
    assert seconds < AT_MOST, (seconds, error)
    assert isinstance(error, httpx.TimeoutException), error
    assert "deadline of 1 s" in str(error)


@pytest.mark.slow
def test_redirect_hops_share_one_deadline() -> None:
    with raw_server(slow_redirects) as port:
        url = f"http://127.0.0.1:{port}"
        assert fetch(f"{url}/hop/3") == b"ok"  # one hop alone is within the deadline
        seconds, error = timed(lambda: fetch(f"{url}/hop/0"))
    assert seconds < AT_MOST, (seconds, error)
    assert isinstance(error, httpx.TimeoutException), error


def test_each_redirect_hop_hangs_up_before_the_next_starts() -> None:
    """A redirect's connection (its body unread) is closed before the next hop connects, not
    held open until the whole fetch ends."""
    first_hop: list[str] = []
    heard = threading.Event()

    def redirect_then_watch(peer: Peer) -> None:
        if peer.path == "/first":
            peer.send(b"HTTP/1.1 302 Found\r\nLocation: /second\r\nContent-Length: 5\r\n\r\nhello")
            peer.conn.settimeout(3)
            try:
                first_hop.append("closed" if peer.conn.recv(1) == b"" else "sent more")
            except TimeoutError:
                first_hop.append("still open")
            heard.set()
        else:
            heard.wait(5)
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    with raw_server(redirect_then_watch) as port:
        got = fetch_photo(
            f"http://127.0.0.1:{port}/first",
            ["127.0.0.1"],
            allow_loopback=True,
            timeout=10,
            max_bytes=100,
        )
    assert got == b"ok" and first_hop == ["closed"]


@pytest.mark.slow
def test_a_trickled_tls_handshake_ends_by_the_deadline_and_names_the_host() -> None:
    """Over https to a name that resolves to loopback: the connection goes to the checked
    address with the name as SNI, and a server that answers the ClientHello a byte at a time
    is cut off at the deadline."""
    hellos: list[bytes] = []

    def trickled_server_hello(peer: Peer) -> None:
        hellos.append(peer.head)
        peer.send(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 kB is coming...
        for _ in range(100):
            peer.pause(0.5)
            peer.send(b"\x00")

    with raw_server(trickled_server_hello, first=read_client_hello) as port:
        start = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout, match="deadline of 1 s"):
            fetch_photo(
                f"https://localhost:{port}/p.jpg",
                ["localhost"],
                allow_loopback=True,
                timeout=DEADLINE,
                max_bytes=100,
            )
        seconds = time.monotonic() - start
    assert seconds < AT_MOST, seconds
    assert len(hellos) == 1 and b"localhost" in hellos[0]  # the SNI name


def test_a_tls_handshake_that_cannot_start_closes_its_socket() -> None:
    """The deadline passed between connecting and the TLS handshake: the error is httpcore's
    ConnectTimeout, and the socket is closed at once, not left to the garbage collector (once
    the handshake has started, Python's SSL socket closes itself on failure)."""
    ours, theirs = socket.socketpair()
    with theirs:
        stream = DeadlineStream(ours, Deadline(0))
        with pytest.raises(httpcore.ConnectTimeout, match="deadline"):
            stream.start_tls(ssl.create_default_context(), server_hostname="example.org")
        assert ours.fileno() == -1


@pytest.mark.parametrize(("asked", "deadline", "slept"), [(0.2, 5.0, 0.2), (30.0, 0.3, 0.3)])
def test_a_pause_between_attempts_waits_as_asked_but_never_past_the_deadline(
    asked: float, deadline: float, slept: float
) -> None:
    """httpcore pauses through its network backend between connection attempts: the pause is
    what it asks for, cut short where the deadline comes first."""
    backend = DeadlineBackend(Deadline(deadline))
    started = time.monotonic()
    backend.sleep(asked)
    assert slept - 0.05 <= time.monotonic() - started <= slept + 1.0


def test_a_post_within_the_deadline_gets_its_answer() -> None:
    def created(peer: Peer) -> None:
        peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")

    with raw_server(created) as port:
        answer = request(
            "POST",
            f"http://127.0.0.1:{port}/hook",
            ["127.0.0.1"],
            allow_loopback=True,
            timeout=DEADLINE,
            max_bytes=100,
            content=b"{}",
        )
    assert (answer.status, answer.body) == (201, b"done")


@pytest.mark.slow
def test_each_callback_attempt_ends_by_its_deadline() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        callback_attempts=2,
        callback_backoff_seconds=0.01,
        callback_timeout_seconds=DEADLINE,
        unsafe_allow_loopback_for_tests=True,
    )
    with raw_server(trickled_headers) as port:
        start = time.monotonic()
        trust = CallbackTrust("secret", ["127.0.0.1"])
        outcome = deliver(settings, trust, f"http://127.0.0.1:{port}/hook", {"job_id": 1}, "1")
        seconds = time.monotonic() - start
    assert seconds < 2 * AT_MOST, (seconds, outcome)
    assert outcome["delivered"] is False and len(outcome["attempts"]) == 2
    assert all("Timeout" in a["error"] for a in outcome["attempts"]), outcome


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1, even where loopback is allowed
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("2001:0:a00:1::5ff5:fffe", False),  # Teredo, server 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo, client 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 (well-known prefix) of 8.8.8.8
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1, even where loopback is allowed
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 prefix
        ("::ffff:8.8.8.8", True),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("::ffff:127.0.0.1", True),  # loopback itself, allowed here (tests only)
        ("::8.8.8.8", False),  # IPv4-compatible: deprecated, never routed
        ("::10.0.0.1", False),
        ("::1", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_embedded_ipv4_addresses_are_checked(address: str, allowed: bool) -> None:
    assert allowed_address(address, allow_loopback=True) is allowed
    if not allowed:
        assert allowed_address(address, allow_loopback=False) is False


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("2002:a00:1::1", ["10.0.0.1"]),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
        ("64:ff9b::a00:1", ["10.0.0.1"]),
        ("::10.0.0.1", ["10.0.0.1"]),
        ("::1:7f00:1", []),  # past the IPv4-compatible range (::/96)
        ("::1", []),
        ("::", []),
        ("2606:4700:4700::1111", []),
    ],
)
def test_the_ipv4_addresses_an_ipv6_address_leads_to(address: str, embedded: list[str]) -> None:
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert [str(ip) for ip in found] == embedded


@pytest.mark.parametrize(("scheme", "port"), [("http", 80), ("https", 443)])
def test_a_url_without_a_port_goes_to_its_schemes(scheme: str, port: int) -> None:
    target = check_url(f"{scheme}://127.0.0.1/p.jpg", ["127.0.0.1"], allow_loopback=True)
    assert (target.address, target.port) == ("127.0.0.1", port)


def test_a_6to4_url_of_a_private_address_is_refused() -> None:
    with pytest.raises(FetchRefused, match="non-public address"):
        check_url("http://[2002:a9fe:a9fe::1]/latest", ["2002:a9fe:a9fe::1"], allow_loopback=True)


@pytest.mark.parametrize("character", ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"])
def test_urls_with_control_characters_are_refused(character: str) -> None:
    url = f"http://127.0.0.1/a{character}b.jpg"
    with pytest.raises(FetchRefused, match="control character"):
        check_url(url, ["127.0.0.1"], allow_loopback=True)


def test_an_error_a_partner_reads_keeps_its_words_and_loses_tokens_and_server_paths() -> None:
    error = (
        "GET https://photos.example/a.jpg?X-Amz-Signature=abc gave 403 and "
        "http://h.example:8080/x#frag 404; kept in /srv/whaleid/batches/t/1.bin now"
    )
    assert public_text(error) == (
        "GET https://photos.example/a.jpg gave 403 and "
        "http://h.example:8080/x 404; kept in <server path> now"
    )
