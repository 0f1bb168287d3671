"""The review page's sign-in against a planted form token: a sibling subdomain can set the
``whaleid_csrf`` cookie (cookie tossing), and a browser that sends no Sec-Fetch-Site lets the
forged POST through unless the token must be one this server signed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from service.access.auth import FORM_SECRET_KEY, form_token_valid, new_form_token
from service.settings import Settings
from service.store.objects import shared_secret
from tests.conftest import LiveServer, run_server
from tests.service.access.test_review_sessions import CSRF, SESSION, form_token, sessions_of


def own_secret(settings: Settings) -> bytes:
    return shared_secret(settings, FORM_SECRET_KEY)


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    yield from run_server(settings)


def _planted(server: LiveServer, tmp_path: Path) -> dict[str, str]:
    elsewhere = Settings(data_dir=tmp_path / "elsewhere", _env_file=None)  # type: ignore[call-arg]
    nonce, expires, _ = new_form_token(b"x").split(".")
    return {
        "chosen by the attacker": "A" * 43,  # the old format: any 43 URL-safe characters
        "forged signature": new_form_token(b"not this server's secret"),
        "another server's": new_form_token(own_secret(elsewhere)),
        "signature cut": f"{nonce}.{expires}.",
        "expired": new_form_token(own_secret(server.settings), hours=-1),
    }


@pytest.mark.slow
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
            assert fresh != token and form_token_valid(own_secret(server.settings), fresh)
    assert sessions_of(server.settings) == []
    with httpx.Client(base_url=server.url, timeout=60) as browser:
        token = form_token(browser.get("/review/login"))
        assert browser.cookies[CSRF] == token
        signed_in = browser.post(
            "/review/login", data={"key": server.keys["curator"], "csrf": token}
        )
        assert signed_in.status_code == 303 and SESSION in browser.cookies


def _secret_elsewhere(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    """The form secret as another process (a replica) reads it."""
    code = "import sys; from service.store.objects import shared_secret; "
    code += "from service.settings import Settings; "
    code += f"sys.stdout.write(shared_secret(Settings(), {FORM_SECRET_KEY!r}).decode())"
    environment = {**os.environ, "WHALEID_DATA_DIR": str(data_dir), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=environment
    )
    return done.stdout


def test_the_form_secret_is_made_once_and_shared_by_the_store(tmp_path: Path) -> None:
    """Processes sharing a data directory agree on the secret, kept for its owner only."""
    here = own_secret(Settings(data_dir=tmp_path / "data", _env_file=None))  # type: ignore[call-arg]
    assert _secret_elsewhere(tmp_path / "data") == here and len(here) >= 43
    assert (tmp_path / "data" / FORM_SECRET_KEY).stat().st_mode & 0o077 == 0
    token = new_form_token(here)
    assert form_token_valid(here, token) and not form_token_valid(b"other", token)
    assert not form_token_valid(here, token, for_seconds=25 * 3600)  # 24 h, then a fresh one
    assert time.time() < int(token.split(".")[1])


@pytest.mark.slow
def test_replicas_sharing_a_bucket_agree_on_the_form_secret(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Each replica has its own data directory; the bucket holds the one secret."""
    found = {_secret_elsewhere(tmp_path / f"replica{n}", s3_env) for n in range(2)}
    assert len(found) == 1 and len(found.pop()) >= 43


def test_a_configured_form_secret_signs_the_tokens(sqlite_settings: Settings) -> None:
    sqlite_settings.form_secret = SecretStr("configured for every replica")
    for server in run_server(sqlite_settings):
        with httpx.Client(base_url=server.url, timeout=60) as browser:
            token = form_token(browser.get("/review/login"))
    assert form_token_valid(b"configured for every replica", token)
    assert not (sqlite_settings.data_dir / FORM_SECRET_KEY).exists()
