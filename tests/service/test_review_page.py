"""The review page in a real headless browser (Debian's Chromium driven by Selenium)."""

from __future__ import annotations

import os
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import LiveServer
from tests.service.browser import sign_in, wait_for
from tests.service.test_curation import identify


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
