"""The review page in a real headless browser (Debian's Chromium driven by Selenium)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import LiveServer
from tests.service.test_curation import identify

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: run scripts/test.sh")
        pytest.skip("no chromium: run scripts/test.sh, which installs Debian's chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str, text: str | None = None) -> None:
    wait = WebDriverWait(driver, 15)
    if text is None:
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
    else:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))


def sign_in(driver: WebDriver, url: str, key: str) -> None:
    driver.get(f"{url}/review")
    wait_for(driver, "#key")
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def test_curator_reviews_the_queue_with_keyboard_and_buttons(
    live: LiveServer, browser: WebDriver
) -> None:
    with live.client() as integration:
        known = identify(integration, 3, 40)["identification_id"]
        unseen = identify(integration, 55, 1)["identification_id"]

    sign_in(browser, live.url, live.keys["integration"])
    wait_for(browser, ".error", "curator role")
    sign_in(browser, live.url, live.keys["curator"])
    wait_for(browser, "h1", f"Identification #{known}")

    query = browser.find_element(By.CSS_SELECTOR, "figure.query img")
    assert browser.execute_script("return arguments[0].naturalWidth", query) == 64
    first = browser.find_element(By.CSS_SELECTOR, 'figure.candidate[data-rank="1"]')
    assert "ind-3" in first.text and "votes 3" in first.text and "confidence" in first.text
    best = first.find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].naturalWidth", best) == 64
    if os.environ.get("WHALEID_UPDATE_SCREENSHOT"):
        browser.save_screenshot(str(Path(__file__).parents[2] / "docs" / "review-page.png"))

    browser.find_element(By.TAG_NAME, "body").send_keys("1")  # confirm candidate 1
    wait_for(browser, "h1", f"Identification #{unseen}")
    with live.client() as integration:
        decided = integration.get(f"/identifications/{known}").json()
        assert decided["status"] == "confirmed"
        assert decided["decisions"][0]["individual_id"] == "ind-3"
        assert decided["decisions"][0]["curator"] == "curator tester"
        assert decided["decisions"][0]["candidate_rank"] == 1

    browser.find_element(By.ID, "code").send_keys("HW-55")
    browser.find_element(By.ID, "comment").send_keys("new left flank")
    browser.find_element(By.ID, "new").click()
    wait_for(browser, "h1", "Nothing to review")
    with live.client() as integration:
        created = integration.get("/individuals/HW-55").json()
        assert len(created["images"]) == 1
        decision = integration.get(f"/identifications/{unseen}").json()["decisions"][0]
        assert decision["comment"] == "new left flank"

    # A conflicting decision shows the server's message on the page.
    browser.get(f"{live.url}/review?identification_id={known}&status=")
    wait_for(browser, "h1", f"Identification #{known}")
    browser.find_element(By.ID, "reject").click()
    wait_for(browser, "#message", "supersede")
