"""Signed job callbacks.

When a batch job with a ``callback_url`` ends, its result is POSTed there as JSON with

    X-Whaleid-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    X-Whaleid-Delivery: <job id>.<attempt>

Each integration key has its own callback secret (shown once when an admin creates or rotates
it) and its own callback hosts, so one partner can neither send callbacks to another's receiver
nor forge them. The receiver recomputes the HMAC over the raw body with its key's secret,
compares in constant time, refuses a timestamp older than its tolerance (5 minutes by default)
and refuses a signature it has already accepted (a replay within the tolerance). ``verify`` below
(also ``service.client.verify_callback``) is the sample verifier. Delivery is retried with
exponential backoff; every attempt, and a delivery that failed for good, stays on the job
(``result.callback``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from service.errors import FetchRefused
from service.outbound.fetch import request
from service.outbound.redact import public_text
from service.settings import Settings

if TYPE_CHECKING:
    from service.db.tables import ApiKey

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Whaleid-Signature"
DELIVERY_HEADER = "X-Whaleid-Delivery"
DEFAULT_TOLERANCE = 300.0
_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class CallbackTrust:
    """What one key's callbacks are signed with and where they may go."""

    secret: str
    hosts: list[str]


def trust_of(key: ApiKey | None) -> CallbackTrust | None:
    """The key's callback trust; None when it is revoked or lacks a secret or hosts."""
    if key is None or key.revoked_at is not None:
        return None
    if not key.callback_secret or not key.callback_hosts:
        return None
    return CallbackTrust(key.callback_secret, list(key.callback_hosts))


class BadSignature(ValueError):
    """The callback is not from whaleid, was altered, or is too old (a replay)."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> int:
    """Check a callback's signature; return its timestamp or raise ``BadSignature``.

    Replays within ``tolerance`` are the receiver's to refuse: keep the signatures accepted in
    the last ``tolerance`` seconds and refuse one seen before."""
    value = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER.lower()), "")
    match = re.fullmatch(r"t=(\d{1,12}),v1=([0-9a-f]{64})", value.strip())
    if not match:
        raise BadSignature(f"no well-formed {SIGNATURE_HEADER} header")
    t = int(match.group(1))
    expected = sign(secret, body, t).split("v1=", 1)[1]
    if not hmac.compare_digest(expected, match.group(2)):
        raise BadSignature("the signature does not match the body")
    if abs((time.time() if now is None else now) - t) > tolerance:
        raise BadSignature(f"the timestamp is more than {tolerance:g} s away: a replay?")
    return t


def deliver(
    settings: Settings,
    trust: CallbackTrust,
    url: str,
    payload: dict[str, Any],
    delivery: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST ``payload`` to ``url`` until a 2xx answer, at most ``callback_attempts`` times,
    waiting ``callback_backoff_seconds`` × 2^n between tries. A refused URL is not retried.
    Returns what happened, for the job."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    attempts: list[dict[str, Any]] = []
    for n in range(max(1, settings.callback_attempts)):
        if n:
            sleep(settings.callback_backoff_seconds * 2 ** (n - 1))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(trust.secret, body),
            DELIVERY_HEADER: f"{delivery}.{n + 1}",
        }
        at = time.time()
        try:
            answer = request(
                "POST",
                url,
                trust.hosts,
                allow_loopback=settings.unsafe_allow_loopback_for_tests,
                timeout=settings.callback_timeout_seconds,
                max_bytes=_ANSWER_BYTES,
                content=body,
                headers=headers,
            )
        except FetchRefused as e:
            attempts.append({"at": at, "status": None, "error": public_text(str(e))})
            log.warning("callback %s to %s refused: %s", delivery, url, e)
            break
        except httpx.HTTPError as e:
            error = public_text(f"{type(e).__name__}: {e}")
            attempts.append({"at": at, "status": None, "error": error})
            log.warning("callback %s to %s failed: %s", delivery, url, e)
            continue
        attempts.append({"at": at, "status": answer.status, "error": None})
        if 200 <= answer.status < 300:
            return {"url": url, "delivered": True, "attempts": attempts}
        log.warning("callback %s to %s answered %s", delivery, url, answer.status)
    return {"url": url, "delivered": False, "attempts": attempts}
