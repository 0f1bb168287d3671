"""A signed photo URL's token never reaches a partner, however its query is written: a quote, a
``<`` or a space in it stopped the old pattern, and the rest of the query (the signature) went
into the job's errors and results, stayed in ``jobs.result`` after close, and went out in the
callback. The URL is now redacted as parsed, where it is known."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.client import WhaleidClient
from service.db.tables import Job, make_engine, make_sessionmaker
from service.jobs.batch.chunks import item_error
from service.outbound.fetch import FetchRefused, check_url, fetch_photo
from service.outbound.redact import public_text, without_secrets
from tests.conftest import Catalogue, LiveServer, run_server
from tests.service.jobs import test_batch
from tests.service.jobs.test_batch import SECRET, Receiver, trust_callbacks

receiver = test_batch.receiver  # the platform on loopback, a fixture

# The query's first value ends where the old pattern stopped; the signature follows.
AWKWARD = ["a='", "a=<b>", "a=x y", 'a="', "a=%27 '"]


def signed(base: str, n: int, value: str) -> str:
    return f"{base}?{value}&X-Amz-Signature=TOKEN{n}SECRET"


@pytest.mark.parametrize("value", AWKWARD)
def test_a_refusal_never_quotes_the_query(value: str) -> None:
    url = signed("http://elsewhere.example/x.jpg", 1, value)
    with pytest.raises(FetchRefused) as refused:
        check_url(url, ["photos.example"])
    assert "TOKEN1SECRET" not in str(refused.value)
    assert "TOKEN1SECRET" not in item_error(refused.value, url)


@pytest.mark.parametrize("value", AWKWARD)
def test_an_error_naming_the_url_loses_its_query_however_quoted(value: str) -> None:
    url = signed("https://photos.example/x.jpg", 2, value)
    for text in (f"GET {url} failed", f"GET {url!r} failed", f"<{url}> failed"):
        shown = public_text(without_secrets(text, url))
        assert "TOKEN2SECRET" not in shown and "photos.example/x.jpg" in shown, shown
        wrapped = httpx.ConnectError(text)
        assert "TOKEN2SECRET" not in item_error(wrapped, url)


def test_the_answer_status_of_a_signed_url_is_shown_without_its_token(receiver: Receiver) -> None:
    url = signed(f"{receiver.url}/gone.png", 3, "a='")
    with pytest.raises(FetchRefused) as refused:
        fetch_photo(url, ["127.0.0.1"], allow_loopback=True, timeout=10, max_bytes=1000)
    assert str(refused.value) == f"{f'{receiver.url}/gone.png'!r} answered 404"


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    s = catalogue.settings
    s.job_poll_seconds = 0.05
    s.batch_chunk_size = 4
    s.fetch_hosts = ["127.0.0.1"]
    s.callback_attempts = 1
    s.unsafe_allow_loopback_for_tests = True
    for live in run_server(s):
        trust_callbacks(live, "integration", SECRET)
        yield live


@pytest.mark.slow
def test_no_token_reaches_errors_results_the_closed_job_or_the_callback(
    server: LiveServer, receiver: Receiver
) -> None:
    urls = [signed(f"{receiver.url}/missing{n}.png", n, v) for n, v in enumerate(AWKWARD)]
    with WhaleidClient(server.url, server.keys["integration"], timeout=30) as api:
        submitted = api.identify_batch(urls=urls, callback_url=f"{receiver.url}/hook")
        job = api.wait_job(submitted["id"], timeout=60, poll=0.05)
        rows = api.job_results(job["id"])
        csv_text = api.job_results_csv(job["id"])
        deadline_job = api.wait_job(job["id"], timeout=60, poll=0.05)
    assert job["failed"] == len(AWKWARD), job
    assert all("404" in r["error"] for r in rows[: len(AWKWARD)]), rows
    engine = make_engine(server.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        stored = session.get_one(Job, job["id"])
        kept = repr(stored.result) + repr(stored.errors) + repr(stored.params)
    engine.dispose()
    assert receiver.accepted, receiver.refused
    everything = repr(job) + repr(deadline_job) + repr(rows) + csv_text + kept
    everything += repr(receiver.accepted)
    assert "SECRET" not in everything
    assert f"{receiver.url}/missing0.png" in repr(rows)


def test_a_short_query_is_cut_with_its_mark_and_leaves_other_words_alone() -> None:
    url = "http://photos.example/x.jpg?4"
    assert (
        without_secrets(f"{url!r} answered 404", url)
        == "'http://photos.example/x.jpg' answered 404"
    )
