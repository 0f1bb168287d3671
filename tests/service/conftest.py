"""Fixtures of the service tests that drive a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.service.browser import start_browser


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a 1400x900 viewport and no network beyond loopback."""
    yield from start_browser(tmp_path / "profile")
