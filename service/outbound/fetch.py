"""Outgoing HTTP without SSRF: photo URLs of a batch job and job callbacks.

A URL is allowed only if it holds no control character, its host name is on an allowlist from
settings, its scheme is http or https, and every address the name resolves to is public (not
private, loopback, link-local, multicast, reserved or unspecified; an IPv6 address that leads to
an IPv4 one, by 6to4, Teredo or NAT64, is judged by that one too). The request then connects to
the address that was checked (the host name travels in the Host header and, over TLS, as the SNI
name the certificate is verified against), so a second DNS answer cannot swap in an internal
address. Redirects are not followed by httpx: each hop is checked the same way, at most
``MAX_REDIRECTS`` of them. One deadline bounds the whole request, every hop included
(``service.outbound.deadline``).

``unsafe_allow_loopback_for_tests`` admits 127.0.0.0/8 and ::1 (nothing else), for tests that
run a receiver on loopback; it is off by default and must stay off in a deployment.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from service.errors import FetchRefused
from service.outbound.deadline import Deadline, DeadlineTransport
from service.outbound.redact import without_query as shown
from service.text import control_character

MAX_REDIRECTS = 3
MAX_URL_LENGTH = 2000


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    address: str


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached. The
# local-use prefix 64:ff9b:1::/48 (RFC 8215) leads into a private network and is refused.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: 6to4's, Teredo's server and client, NAT64's,
    and the deprecated IPv4-compatible form's (``::a.b.c.d``; not ``::`` and ``::1``)."""
    found = [] if ip.sixtofour is None else [ip.sixtofour]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if int(ip) >> 32 == 0 and int(ip) > 1:
        found.append(ipaddress.IPv4Address(int(ip)))
    return found


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_loopback: bool) -> bool:
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def allowed_address(address: str, allow_loopback: bool) -> bool:
    """Whether a request may go to ``address``. An IPv4-mapped address is its IPv4 address. An
    IPv6 address that embeds IPv4 ones (6to4, Teredo, NAT64, IPv4-compatible) is refused unless
    each of them is public, loopback included (a tunnel or translator is no loopback); a NAT64
    address of a public one is allowed, whatever Python's tables say of the prefix."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _public(ip.ipv4_mapped, allow_loopback)
        if ip in NAT64_LOCAL:
            return False
        embedded = embedded_ipv4(ip)
        if not all(_public(v4, allow_loopback=False) for v4 in embedded):
            return False
        if ip in NAT64:
            return True
    return _public(ip, allow_loopback)


def url_problem(url: str) -> str | None:
    """Why ``url`` is refused before it is parsed (None if it is not): a control character
    could split a request line or a header, or forge a log line."""
    char = control_character(url)
    return None if char is None else f"the URL holds a control character ({char})"


def check_url(url: str, hosts: Sequence[str], *, allow_loopback: bool = False) -> Target:
    """Resolve and check ``url``; raise ``FetchRefused`` saying why it is not allowed."""
    if len(url) > MAX_URL_LENGTH:
        raise FetchRefused(f"the URL is over {MAX_URL_LENGTH} characters")
    problem = url_problem(url)
    if problem:
        raise FetchRefused(f"{shown(url)[:200]!r}: {problem}")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise FetchRefused(f"{shown(url)!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchRefused(f"{shown(url)!r}: only http and https URLs are fetched")
    if parts.username or parts.password:
        raise FetchRefused(f"{shown(url)!r}: URLs with credentials are refused")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host or host not in {h.lower().rstrip(".") for h in hosts}:
        raise FetchRefused(f"{shown(url)!r}: the host {host!r} is not on the allowlist in settings")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise FetchRefused(f"{shown(url)!r}: {host!r} does not resolve: {e}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not allowed_address(a, allow_loopback)]
    if refused or not addresses:
        raise FetchRefused(
            f"{shown(url)!r}: {host!r} resolves to a non-public address "
            f"({', '.join(refused)}); refused"
        )
    return Target(url, parts.scheme, host, port, addresses[0])


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def _pinned(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL naming the checked address, the Host header, and the TLS SNI name."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    netloc = f"{address}:{target.port}"
    path = parts.path or "/"
    pinned = f"{target.scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")
    default = 443 if target.scheme == "https" else 80
    host = target.host if target.port == default else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return pinned, {"Host": host}, extensions


def request(
    method: str,
    url: str,
    hosts: Sequence[str],
    *,
    allow_loopback: bool,
    timeout: float,
    max_bytes: int,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """One request under the rules above, its answer's body read up to ``max_bytes``. It ends
    within ``timeout`` seconds in all: connecting, sending, the headers and the body of every
    hop (``service.outbound.deadline``). Raises ``FetchRefused`` or ``httpx.HTTPError`` (a
    ``httpx.TimeoutException`` when the deadline passed)."""
    deadline = Deadline(timeout)
    with httpx.Client(
        transport=DeadlineTransport(deadline),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            # Name resolution is the resolver's to bound (resolv.conf); a hop that starts after
            # the deadline fails when it connects.
            target = check_url(url, hosts, allow_loopback=allow_loopback)
            pinned, host_header, extensions = _pinned(target)
            req = client.build_request(
                method,
                pinned,
                content=content,
                headers={**(headers or {}), **host_header},
                extensions=extensions,
            )
            response = client.send(req, stream=True)
            try:
                if response.is_redirect and method == "GET":
                    location = response.headers.get("location", "")
                    url = urljoin(url, location)
                    continue
                body = bytearray()
                for piece in response.iter_bytes():
                    body.extend(piece)
                    if len(body) > max_bytes:
                        raise FetchRefused(
                            f"{shown(target.url)!r}: the answer is over {max_bytes} bytes"
                        )
                return Answer(response.status_code, bytes(body))
            finally:
                response.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def fetch_photo(
    url: str, hosts: Sequence[str], *, allow_loopback: bool, timeout: float, max_bytes: int
) -> bytes:
    """GET a photo; raise ``FetchRefused`` unless the answer is a 200 within the limits."""
    response = request(
        "GET", url, hosts, allow_loopback=allow_loopback, timeout=timeout, max_bytes=max_bytes
    )
    if response.status != 200:
        raise FetchRefused(f"{shown(url)!r} answered {response.status}")
    return response.body
