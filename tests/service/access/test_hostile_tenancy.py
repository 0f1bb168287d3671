"""What one partner may read of another's photos, when a curator changes their mind: a query
photo confirmed into the catalogue is everyone's; once the confirmation is rejected it is its
sender's again, and no route still serves it to another partner (``/matches`` did)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import encode, photo


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    yield from run_server(catalogue.settings)


@pytest.mark.slow
def test_matches_never_reach_a_photo_that_became_private_again(server: LiveServer) -> None:
    with server.client("admin") as admin:
        b_key = admin.post("/keys", json={"name": "partner B", "role": "integration"}).json()
    query = photo(3, 5)
    with server.client() as a:  # partner A
        first = a.post("/identify", files={"photo": ("a.png", encode(query))}).json()
    a_ident, a_image = first["identification_id"], first["query_image_id"]
    with server.client("curator") as curator:
        confirmed = curator.post(
            f"/identifications/{a_ident}/decision",
            json={"decision": "confirm", "individual_id": "ind-3"},
        )
        assert confirmed.status_code == 200, confirmed.text
    with server.client(None) as b:
        b.headers["Authorization"] = f"Bearer {b_key['key']}"
        # Nearly the same photo (other bytes): A's confirmed photo is its best match.
        second = b.post("/identify", files={"photo": ("b.jpg", encode(query, "JPEG"))}).json()
        b_ident = second["identification_id"]
        assert second["query_image_id"] != a_image
        assert second["candidates"][0]["individual_id"] == "ind-3"
        shared = b.get(f"/identifications/{b_ident}/matches", params={"candidate": 1})
        assert shared.status_code == 200, shared.text
        assert shared.json()["candidate_image_id"] == a_image  # the scenario holds
        with server.client("curator") as curator:
            rejected = curator.post(
                f"/identifications/{a_ident}/decision",
                json={"decision": "reject", "supersede": True},
            )
            assert rejected.status_code == 200, rejected.text
        assert b.get(f"/images/{a_image}/file").status_code == 404
        private = b.get(f"/identifications/{b_ident}/matches", params={"candidate": 1})
        assert private.status_code == 404, private.text
        assert "no longer shared" in private.json()["detail"]
