"""Outgoing HTTP under one deadline: connecting, the TLS handshake, writing the request, every
header line and every body byte, of every redirect hop, share one budget of seconds.

httpx's timeouts bound each socket operation, so a server that sends one byte just inside the
read timeout holds a request as long as it likes. Here each operation on the socket waits at
most what is left of the deadline (or its own httpx timeout, when shorter), and an operation that
starts after the deadline fails at once; so a request ends within its deadline plus one socket
call's slack, whatever the server does. No thread is started: the waits are the socket's own
timeouts (for TLS, Python's SSL calls count their timeout over the whole call, handshake
included).

The transport is httpcore's connection pool with ``DeadlineBackend`` as its network backend,
wrapped as an httpx transport. What it does not bound is DNS: it is meant for URLs whose host is
an address (``service.outbound.fetch`` resolves and checks the name first, then connects to the
address).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx


class Deadline:
    """A moment ``seconds`` from now; ``left`` says how long an operation may still wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, timeout: float | None, error: type[Exception]) -> float:
        """The wait an operation gets: what is left, or ``timeout`` if shorter. Raises ``error``
        when nothing is left."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise error(self.passed())
        return remaining if timeout is None else min(timeout, remaining)

    def passed(self) -> str:
        return f"timed out: the deadline of {self.seconds:g} s for the whole request passed"


@contextmanager
def _socket_errors(
    deadline: Deadline, timeout: type[Exception], error: type[Exception]
) -> Iterator[None]:
    """Socket errors as httpcore's, as its own backend raises them."""
    try:
        yield
    except TimeoutError as e:  # socket.timeout, and ssl's timeouts
        raise timeout(deadline.passed() if deadline.at <= time.monotonic() else str(e)) from e
    except OSError as e:  # ssl.SSLError included: a failed handshake is a connect error
        raise error(str(e) or type(e).__name__) from e


class DeadlineStream(httpcore.NetworkStream):
    """A TCP (or TLS) socket whose every read and write waits at most until the deadline."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _socket_errors(self._deadline, httpcore.ReadTimeout, httpcore.ReadError):
            self._sock.settimeout(self._deadline.left(timeout, httpcore.ReadTimeout))
            return self._sock.recv(max_bytes)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # One send at a time, each with what is left: a peer that takes a byte at a time cannot
        # stretch the write (sendall's timeout is per call, and SSLSocket.sendall's per send).
        view = memoryview(buffer)
        with _socket_errors(self._deadline, httpcore.WriteTimeout, httpcore.WriteError):
            while view:
                self._sock.settimeout(self._deadline.left(timeout, httpcore.WriteTimeout))
                view = view[self._sock.send(view) :]

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        with _socket_errors(self._deadline, httpcore.ConnectTimeout, httpcore.ConnectError):
            try:
                self._sock.settimeout(self._deadline.left(timeout, httpcore.ConnectTimeout))
                tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
            except BaseException:
                self.close()
                raise
        return DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        """What httpcore asks of a stream (the TLS socket stands for its SSL object: httpcore
        only asks it for the ALPN protocol)."""
        if info == "ssl_object":
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _readable(self._sock)
        return None


def _readable(sock: socket.socket) -> bool:
    """Whether the socket has something to read (or is closed): a kept-alive connection that is
    readable while idle was closed by the server, and is not reused."""
    fd = sock.fileno()
    if fd == -1:
        return True
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, each connection under ``deadline``."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        source = None if local_address is None else (local_address, 0)
        with _socket_errors(self.deadline, httpcore.ConnectTimeout, httpcore.ConnectError):
            wait = self.deadline.left(timeout, httpcore.ConnectTimeout)
            sock = socket.create_connection((host, port), wait, source_address=source)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return DeadlineStream(sock, self.deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("outgoing requests go over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.deadline.at - time.monotonic())))


# httpcore's errors as httpx's of the same names, the most specific first (as httpx's own
# transport maps them).
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = tuple(
    (getattr(httpcore, name), getattr(httpx, name))
    for name in (
        "ConnectTimeout",
        "ReadTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "TimeoutException",
        "ConnectError",
        "ReadError",
        "WriteError",
        "NetworkError",
        "UnsupportedProtocol",
        "LocalProtocolError",
        "RemoteProtocolError",
        "ProtocolError",
    )
)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        for theirs, ours in _HTTPX_ERRORS:
            if isinstance(e, theirs):
                raise ours(str(e)) from e
        raise


class _Body(httpx.SyncByteStream):
    """A response body from httpcore, its errors as httpx's."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class DeadlineTransport(httpx.BaseTransport):
    """An httpx transport whose every request (and every hop, when one client sends several)
    ends by ``deadline``. TLS is verified as httpx verifies it (certifi's roots)."""

    def __init__(self, deadline: Deadline) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=DeadlineBackend(deadline),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            answer = self._pool.handle_request(core)
        assert isinstance(answer.stream, Iterable)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_Body(answer.stream),
            extensions=answer.extensions,
        )

    def close(self) -> None:
        self._pool.close()
