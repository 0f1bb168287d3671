"""Outgoing HTTP without SSRF: photo URLs of a batch job and job callbacks.

A URL is allowed only if its host name is on an allowlist from settings, its scheme is http or
https, and every address the name resolves to is public (not private, loopback, link-local,
multicast, reserved or unspecified). The request then connects to the address that was checked
(the host name travels in the Host header and, over TLS, as the SNI name the certificate is
verified against), so a second DNS answer cannot swap in an internal address. Redirects are not
followed by httpx: each hop is checked the same way, at most ``MAX_REDIRECTS`` of them.

``unsafe_allow_loopback_for_tests`` admits 127.0.0.0/8 and ::1 (nothing else), for tests that
run a receiver on loopback; it is off by default and must stay off in a deployment.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 3
MAX_URL_LENGTH = 2000


class FetchRefused(ValueError):
    """The URL is not allowed (host, scheme or address), or the answer broke a limit."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    address: str


def allowed_address(address: str, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, hosts: Sequence[str], *, allow_loopback: bool = False) -> Target:
    """Resolve and check ``url``; raise ``FetchRefused`` saying why it is not allowed."""
    if len(url) > MAX_URL_LENGTH or "\x00" in url:
        raise FetchRefused(f"the URL is over {MAX_URL_LENGTH} characters or holds a NUL")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise FetchRefused(f"{url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchRefused(f"{url!r}: only http and https URLs are fetched")
    if parts.username or parts.password:
        raise FetchRefused(f"{url!r}: URLs with credentials are refused")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host or host not in {h.lower().rstrip(".") for h in hosts}:
        raise FetchRefused(f"{url!r}: the host {host!r} is not on the allowlist in settings")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise FetchRefused(f"{url!r}: {host!r} does not resolve: {e}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not allowed_address(a, allow_loopback)]
    if refused or not addresses:
        raise FetchRefused(
            f"{url!r}: {host!r} resolves to a non-public address ({', '.join(refused)}); refused"
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
    """One request under the rules above; the answer's body is read up to ``max_bytes`` within
    ``timeout`` seconds in all. Raises ``FetchRefused`` or ``httpx.HTTPError``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
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
                        raise FetchRefused(f"{target.url!r}: the answer is over {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise FetchRefused(f"{target.url!r}: took longer than {timeout:g} s")
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
        raise FetchRefused(f"{url!r} answered {response.status}")
    return response.body
