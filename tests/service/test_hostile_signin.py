"""The review page's sign-in against a planted form token: a sibling subdomain can set the
``whaleid_csrf`` cookie (cookie tossing), and a browser that sends no Sec-Fetch-Site lets the
forged POST through unless the token must be one this server signed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.access.auth import form_secret, form_token_valid, new_form_token
from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.service.test_review_sessions import CSRF, SESSION, form_token, sessions_of


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    yield from run_server(settings)


def _planted(server: LiveServer, tmp_path: Path) -> dict[str, str]:
    other_secret = form_secret(tmp_path / "elsewhere")
    forged_signature = new_form_token(b"not this server's secret")
    nonce, expires, _ = new_form_token(b"x").split(".")
    own = form_secret(server.settings.data_dir)
    expired = new_form_token(own, hours=-1)
    return {
        "chosen by the attacker": "A" * 43,  # the old format: any 43 URL-safe characters
        "forged signature": forged_signature,
        "another server's": new_form_token(other_secret),
        "signature cut": f"{nonce}.{expires}.",
        "expired": expired,
    }


def test_a_planted_form_token_is_refused_without_sec_fetch_site(
    server: LiveServer, tmp_path: Path
) -> None:
    for case, token in _planted(server, tmp_path).items():
        with httpx.Client(base_url=server.url, cookies={CSRF: token}, timeout=60) as victim:
            forged = victim.post(
                "/review/login", data={"key": server.keys["curator"], "csrf": token}
            )
            assert forged.status_code == 403, (case, forged.status_code)
            assert "form token is missing or does not match" in forged.text
            assert SESSION not in victim.cookies
            # The page that refused hands out a token of this server's: that one signs in.
            fresh = form_token(forged)
            assert fresh != token and form_token_valid(form_secret(server.settings.data_dir), fresh)
    assert sessions_of(server.settings) == []
    with httpx.Client(base_url=server.url, timeout=60) as browser:
        token = form_token(browser.get("/review/login"))
        assert browser.cookies[CSRF] == token
        signed_in = browser.post(
            "/review/login", data={"key": server.keys["curator"], "csrf": token}
        )
        assert signed_in.status_code == 303 and SESSION in browser.cookies


def test_the_form_secret_is_made_once_and_shared_by_the_data_directory(tmp_path: Path) -> None:
    """Replicas sharing a data directory agree on the secret; WHALEID_FORM_SECRET overrides it."""
    data = tmp_path / "data"
    here = form_secret(data)
    code = "from pathlib import Path; import sys; from service.access.auth import form_secret; "
    code += f"sys.stdout.write(form_secret(Path({str(data)!r})).decode())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert there == here and len(here) >= 43
    assert (data / "form-secret").stat().st_mode & 0o077 == 0  # readable by its owner only
    assert form_secret(data, "configured") == b"configured"
    token = new_form_token(here)
    assert form_token_valid(here, token) and not form_token_valid(b"configured", token)
    assert not form_token_valid(here, token, for_seconds=25 * 3600)  # 24 h, then a fresh one
    assert time.time() < int(token.split(".")[1])
