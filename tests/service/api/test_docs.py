"""The API documentation works offline and with a key: Swagger UI in a real headless browser
that cannot reach the internet, Authorize, then Try it out."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.service.browser import wait_for


@pytest.fixture
def bare(sqlite_settings: Settings) -> Iterator[LiveServer]:
    """The service over loopback with no model: enough to read the catalogue."""
    yield from run_server(sqlite_settings)


def test_the_schema_declares_the_bearer_key_and_every_identify_error(bare: LiveServer) -> None:
    schema = httpx.get(f"{bare.url}/openapi.json", timeout=60).json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `whaleid keys create --role ROLE --name NAME` prints one.",
    }
    identify = schema["paths"]["/identify"]["post"]
    assert identify["security"] == [{"apiKey": []}]
    assert {"200", "401", "403", "413", "415", "422", "503"} <= set(identify["responses"])
    assert "votes: 0" in identify["description"]
    # Open endpoints declare no key.
    assert "security" not in schema["paths"]["/ready"]["get"]
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{bare.url}{page}", timeout=60).text
        assert "http" not in html.replace("http-equiv", "")  # no absolute URL: nothing remote
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert httpx.get(f"{bare.url}/docs-assets/{asset}", timeout=60).status_code == 200


@pytest.mark.slow
def test_swagger_ui_renders_offline_and_try_it_out_works_with_a_key(
    bare: LiveServer, browser: WebDriver
) -> None:
    browser.get(f"{bare.url}/docs")
    wait_for(browser, ".swagger-ui .info .title", "whaleid")
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(bare.url) for url in loaded), loaded

    operation = browser.find_element(
        By.CSS_SELECTOR, 'div.opblock-get:has(span.opblock-summary-path[data-path="/individuals"])'
    )
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for(browser, ".try-out__btn")
    operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    wait_for(browser, ".live-responses-table tr.response .response-col_status", "401")

    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper button.authorize").click()
    wait_for(browser, ".modal-ux input")
    browser.find_element(By.CSS_SELECTOR, ".modal-ux input").send_keys(bare.keys["integration"])
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()

    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    wait_for(browser, ".live-responses-table tr.response .response-col_status", "200")
    curl = operation.find_element(By.CSS_SELECTOR, ".curl-command").text
    assert f"Authorization: Bearer {bare.keys['integration']}" in curl
