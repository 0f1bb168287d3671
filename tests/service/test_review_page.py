"""The review page in a real headless browser (Debian's Chromium driven by Selenium)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from service.settings import Settings
from tests.conftest import LiveServer, run_server
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
    # The browser holds a random session id, never the key.
    cookies = {c["name"]: c for c in browser.get_cookies()}
    assert not any(live.keys["curator"] in c["value"] for c in cookies.values())
    session = cookies["whaleid_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"

    query = browser.find_element(By.CSS_SELECTOR, "figure.query img")
    assert browser.execute_script("return arguments[0].naturalWidth", query) == 64
    first = browser.find_element(By.CSS_SELECTOR, 'figure.candidate[data-rank="1"]')
    assert "ind-3" in first.text and "votes 3" in first.text and "confidence" in first.text
    best = first.find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].naturalWidth", best) == 64

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

    # Logging out ends the session on the server: the page asks for a key again, and a copy of
    # the cookie taken before is refused.
    browser.find_element(By.ID, "logout").click()
    wait_for(browser, "#key")
    browser.get(f"{live.url}/review")
    wait_for(browser, "#key")
    with httpx.Client(
        base_url=live.url, cookies={session["name"]: session["value"]}, timeout=60
    ) as copy:
        assert copy.get("/review").headers["location"] == "/review/login"
        assert copy.get(f"/identifications/{known}").status_code == 401


ROOT = Path(__file__).parents[2]
SCREENSHOT = ROOT / "docs" / "review-page.png"


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[LiveServer]:
    """The README's demo: demo/setup.sh (the demo model, a synthetic gallery of 40 dolphins) in a
    fresh data directory, served over loopback."""
    data = tmp_path / "data"
    env = {**os.environ, "WHALEID_DATA_DIR": str(data)}
    env.pop("WHALEID_DATABASE_URL", None)
    venv = Path(sys.executable).parent.parent
    subprocess.run(
        ["bash", "demo/setup.sh", str(venv)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    yield from run_server(Settings(data_dir=data, _env_file=None))  # type: ignore[call-arg]


def box(driver: WebDriver, css: str) -> dict[str, float]:
    rect: dict[str, float] = driver.execute_script(
        "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()", css
    )
    return rect


def test_demo_review_page_compares_side_by_side_with_actions_in_view(
    demo: LiveServer, browser: WebDriver
) -> None:
    """Also regenerates docs/review-page.png: WHALEID_UPDATE_SCREENSHOT=1 pytest -k demo_review."""
    with demo.client() as integration, (ROOT / "demo/queries/fin-s7-0003_005.jpg").open("rb") as f:
        answer = integration.post("/identify", files={"photo": f}).json()
    assert len(answer["candidates"]) == 5
    first = next(c for c in answer["candidates"] if c["best_image_id"])
    sign_in(browser, demo.url, demo.keys["curator"])
    wait_for(browser, "h1", f"Identification #{answer['identification_id']}")
    WebDriverWait(browser, 15).until(
        lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )

    # The query photo and the compared candidate's best photo side by side, the same size.
    query, compared = box(browser, "figure.query .zoom"), box(browser, "figure.compared .zoom")
    assert query["top"] == compared["top"] and query["height"] == compared["height"]
    assert compared["left"] >= query["right"] and query["height"] >= 250
    src = browser.find_element(By.ID, "compared-img").get_attribute("src") or ""
    assert src.endswith(f"/images/{first['best_image_id']}/file")
    assert (
        f"{first['rank']}. {first['individual_id']}"
        in browser.find_element(By.ID, "compared-label").text
    )

    # Every action is in view at 1400x900, without scrolling.
    size = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert size == [1400, 900]
    for css in ("#new", "#reject", "#comment", "#code", *candidate_buttons(answer)):
        rect = box(browser, css)
        assert rect["bottom"] <= 900 and rect["right"] <= 1400, css
    assert browser.execute_script(
        "const m = document.querySelector('main');"
        "return m.scrollHeight <= m.clientHeight && document.documentElement.scrollHeight <= 900"
    )
    if os.environ.get("WHALEID_UPDATE_SCREENSHOT"):
        browser.save_screenshot(str(SCREENSHOT))

    # Another candidate goes beside the query; zoom applies to both photos.
    other = next(c for c in answer["candidates"][1:] if c["best_image_id"] and c != first)
    browser.find_element(
        By.CSS_SELECTOR, f'figure.candidate[data-rank="{other["rank"]}"] img'
    ).click()
    src = browser.find_element(By.ID, "compared-img").get_attribute("src") or ""
    assert src.endswith(f"/images/{other['best_image_id']}/file")
    browser.find_element(By.TAG_NAME, "body").send_keys("+")
    transforms = browser.execute_script(
        "return [...document.querySelectorAll('.zoom img')].map(i => i.style.transform)"
    )
    assert len(transforms) == 2 and all("scale(1.25)" in t for t in transforms)


def candidate_buttons(answer: dict[str, Any]) -> list[str]:
    return [f'figure.candidate[data-rank="{c["rank"]}"] button' for c in answer["candidates"]]
