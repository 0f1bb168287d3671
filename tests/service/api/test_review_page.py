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
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy.orm import Session, sessionmaker

from service.catalogue.imports import CatalogueImport
from service.matching.features import extractor_for
from service.models.calibration import set_verification
from service.models.registry import register_builtin, register_model
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.service.browser import sign_in, wait_for
from tests.service.catalogue.test_curation import identify
from tests.toy import encode, textured_photo, write_catalogue


@pytest.mark.slow
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


ROOT = Path(__file__).parents[3]
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


@pytest.mark.slow
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


MATCHES_SCREENSHOT = ROOT / "docs" / "review-page-matches.png"


@pytest.fixture
def verifying(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path, toy_model: Path
) -> Iterator[LiveServer]:
    """A catalogue of textured photos (12 individuals, 3 shots each) under the toy model with
    verification: its candidates carry inliers and a score, and their keypoints match."""
    model = register_model(settings, sessions, toy_model)
    set_verification(sessions, model.id, "rerank")
    activate_model(settings, sessions, model.id)
    folder = tmp_path / "textured"
    csv_path = write_catalogue(folder, range(12), (0, 1, 2), textured=True)
    embedder = Embedder.for_model(settings, model.file_path)
    features = extractor_for(settings)
    report = CatalogueImport(settings, sessions, embedder, model.id, features).run(
        csv_path, folder / "images"
    )
    assert not report.errors and report.imported == 36
    yield from run_server(settings)


def photo_box(driver: WebDriver, css: str) -> dict[str, float]:
    """Where the photo of an <img> (object-fit: contain) shows, and its scale."""
    found: dict[str, float] = driver.execute_script(
        """const img = document.querySelector(arguments[0]);
        const r = img.getBoundingClientRect();
        const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        const left = r.left + (r.width - img.naturalWidth * scale) / 2;
        const top = r.top + (r.height - img.naturalHeight * scale) / 2;
        return {left, top, scale, right: left + img.naturalWidth * scale,
                bottom: top + img.naturalHeight * scale};""",
        css,
    )
    return found


def drawn_lines(driver: WebDriver) -> list[tuple[float, float, float, float]]:
    """The overlay's lines, their ends in the viewport's pixels."""
    lines: list[list[float]] = driver.execute_script(
        """const svg = document.getElementById("matches");
        const o = svg.getBoundingClientRect();
        return [...svg.querySelectorAll("line")].map((l) => [
          +l.getAttribute("x1") + o.left, +l.getAttribute("y1") + o.top,
          +l.getAttribute("x2") + o.left, +l.getAttribute("y2") + o.top]);"""
    )
    return [(a, b, c, d) for a, b, c, d in lines]


def inside(box: dict[str, float], x: float, y: float) -> bool:
    return (
        box["left"] - 0.5 <= x <= box["right"] + 0.5
        and box["top"] - 0.5 <= y <= box["bottom"] + 0.5
    )


@pytest.mark.slow
def test_review_page_draws_the_matched_keypoints_of_the_compared_candidate(
    verifying: LiveServer, browser: WebDriver
) -> None:
    """``M`` (or the Matches button) draws a line per inlier from the query photo to the
    compared photo. Also regenerates docs/review-page-matches.png:
    WHALEID_UPDATE_SCREENSHOT=1 pytest -k matched_keypoints."""
    with verifying.client() as integration:
        photo = ("q.png", encode(textured_photo(3, 7)))  # a shot the gallery does not hold
        answer = integration.post("/identify", files={"photo": photo}).json()
        first = answer["candidates"][0]
        assert first["individual_id"] == "ind-3" and first["inliers"] > 10
        ident = answer["identification_id"]
        found = integration.get(f"/identifications/{ident}/matches?candidate=1").json()
    assert found["inliers"] == first["inliers"] > 10
    assert found["candidate_image_id"] == first["best_image_id"]

    sign_in(browser, verifying.url, verifying.keys["curator"])
    wait_for(browser, "h1", f"Identification #{ident}")
    caption = browser.find_element(By.CSS_SELECTOR, 'figure.candidate[data-rank="1"] figcaption')
    assert f"inliers {first['inliers']} · score {first['score']:.3f}" in caption.text
    body = browser.find_element(By.TAG_NAME, "body")
    assert not drawn_lines(browser)

    body.send_keys("m")
    wait_for(browser, "#matches-info", f"{found['inliers']} inliers")
    assert browser.find_element(By.ID, "matches").get_attribute("data-rank") == "1"
    WebDriverWait(browser, 15).until(
        lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    lines = drawn_lines(browser)
    assert len(lines) == found["inliers"]
    assert browser.find_element(By.ID, "matches").is_displayed()
    query, compared = photo_box(browser, "figure.query img"), photo_box(browser, "#compared-img")
    assert query["right"] < compared["left"]  # side by side
    for x1, y1, x2, y2 in lines:
        assert inside(query, x1, y1) and inside(compared, x2, y2), (x1, y1, x2, y2)
    # Each line joins a matched pair, scaled from the photos' pixels to their displayed size.
    expected = sorted(
        (
            query["left"] + m["query"][0] * query["scale"],
            query["top"] + m["query"][1] * query["scale"],
            compared["left"] + m["candidate"][0] * compared["scale"],
            compared["top"] + m["candidate"][1] * compared["scale"],
        )
        for m in found["matches"]
        if m["inlier"]
    )
    assert [v for line in sorted(lines) for v in line] == pytest.approx(
        [v for line in expected for v in line], abs=0.5
    )
    assert all(box(browser, css)["bottom"] <= 900 for css in ("#new", "#reject", "#matches-toggle"))
    assert browser.execute_script(  # the evidence and the button fit without scrolling
        "const m = document.querySelector('main'); return m.scrollHeight <= m.clientHeight"
    )
    if os.environ.get("WHALEID_UPDATE_SCREENSHOT"):
        browser.save_screenshot(str(MATCHES_SCREENSHOT))

    # Another candidate beside the query: its own matches.
    body.send_keys(Keys.ARROW_RIGHT)
    other = browser.find_element(By.CSS_SELECTOR, "figure.candidate.selected").get_attribute(
        "data-rank"
    )
    assert other != "1"
    with verifying.client() as integration:
        theirs = integration.get(f"/identifications/{ident}/matches?candidate={other}").json()
    wait_for(browser, f'#matches[data-rank="{other}"]')
    assert len(drawn_lines(browser)) == theirs["inliers"] < found["inliers"]
    assert browser.find_element(By.ID, "matches-info").text == f"{theirs['inliers']} inliers"

    # M again hides them; the button shows them again.
    body.send_keys("m")
    WebDriverWait(browser, 5).until(lambda d: not d.find_element(By.ID, "matches").is_displayed())
    assert not drawn_lines(browser)
    assert browser.find_element(By.ID, "matches-toggle").get_attribute("aria-pressed") == "false"
    browser.find_element(By.ID, "matches-toggle").click()
    wait_for(browser, f'#matches[data-rank="{other}"]')
    assert len(drawn_lines(browser)) == theirs["inliers"]


@pytest.mark.slow
def test_review_page_shows_the_local_matchers_evidence_without_a_distance(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The built-in local-features matcher has votes, inliers and a score but no distance."""
    model = register_builtin(sessions, "builtin:local-features")
    activate_model(settings, sessions, model.id)
    csv_path = write_catalogue(tmp_path / "textured", range(6), (0, 1), textured=True)
    embedder = Embedder.for_model(settings, model.file_path)  # the matcher's stand-in
    report = CatalogueImport(settings, sessions, embedder, model.id, extractor_for(settings)).run(
        csv_path, tmp_path / "textured" / "images"
    )
    assert not report.errors and report.imported == 12
    for live in run_server(settings):
        with live.client() as integration:
            photo = ("q.png", encode(textured_photo(2, 5)))
            candidates = integration.post("/identify", files={"photo": photo}).json()["candidates"]
        first = candidates[0]
        assert first["individual_id"] == "ind-2" and first["distance"] is None, str(candidates)
        with httpx.Client(base_url=live.url, timeout=60) as page:
            page.get("/review/login")
            form = {"key": live.keys["curator"], "csrf": page.cookies["whaleid_csrf"]}
            page.post("/review/login", data=form)
            shown = page.get("/review")
        assert shown.status_code == 200, shown.text
        facts = f"votes {first['votes']} · inliers {first['inliers']} · score {first['score']:.3f}"
        assert facts in shown.text and "distance" not in shown.text
