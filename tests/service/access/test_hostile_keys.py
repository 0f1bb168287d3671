"""A key revoked moments ago, still in ``/identify``'s key cache, is answered 401 whatever it
sends: its confirmation, read beside the decoding, wins over a photo that does not decode (it
got 415 before, and kept its place in the cache, a decode slot each time)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from service.db.tables import ApiKey, make_engine, make_sessionmaker, utcnow
from tests.conftest import LiveServer
from tests.toy import encode, photo


@pytest.mark.slow
@pytest.mark.parametrize(
    "upload", [b"not a photo at all", encode(photo(2, 62))[:200]], ids=["text", "truncated"]
)
def test_a_revoked_cached_key_gets_401_not_415_for_a_non_image(
    live: LiveServer, upload: bytes
) -> None:
    engine = make_engine(live.settings.sqlalchemy_url)
    with live.client("integration") as client:
        first = client.post("/identify", files={"photo": ("a.png", encode(photo(2, 61)))})
        assert first.status_code == 200, first.text  # the key is cached, the model loaded
        with make_sessionmaker(engine).begin() as session:
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.name == "integration tester"))
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        refused = client.post("/identify", files={"photo": ("b.png", upload)})
        assert refused.status_code == 401, refused.text
        assert "revoked" in refused.json()["detail"]
        # The cache forgot the key: the next upload is refused before its body is read.
        again = client.post("/identify", files={"photo": ("c.png", upload)})
        assert again.status_code == 401, again.text
    engine.dispose()
    with live.client("admin") as admin:  # a live key's bad photo is refused as before
        bad = admin.post("/identify", files={"photo": ("d.png", upload)})
        assert bad.status_code in (415, 422), bad.text
