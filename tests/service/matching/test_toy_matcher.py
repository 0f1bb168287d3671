"""The toy matcher (``tests/service/matching/toy_matcher.py``) end to end: registered with one
line, it is a verification mode the API offers and accepts, ``POST /identify`` answers with it
composed with the kNN head, and the identification records the mode and the calibration's
version; on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.contract import Calibration
from service.db.tables import Identification
from service.matching.registry import fusion_for, register_verification, verifications
from tests.conftest import Catalogue, LiveServer
from tests.service.matching.toy_matcher import FAVOURITE, Favourite
from tests.toy import encode, photo


def identify(client: httpx.Client, individual: int, shot: int) -> dict[str, Any]:
    r = client.post("/identify", files={"photo": ("q.png", encode(photo(individual, shot)))})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_the_toy_is_one_registered_mode_composed_with_the_head() -> None:
    assert verifications()[-1] == "toy" and {"none", "rerank"} <= set(verifications())
    fusion = fusion_for("onnx", "toy")
    assert fusion.names == ("knn", "favourite") and fusion.calibrated
    assert isinstance(fusion.matchers[1], Favourite)
    alone = fusion_for("onnx", "none")
    assert alone.names == ("knn",) and not alone.calibrated
    with pytest.raises(ValueError, match="registered already"):
        register_verification("toy", Favourite)


@pytest.mark.slow
def test_identify_answers_and_records_with_the_toy_matcher(
    live: LiveServer, catalogue: Catalogue
) -> None:
    with live.client() as client:
        plain = identify(client, 3, 50)
        assert plain["model"]["verification"] == "none"
        assert plain["candidates"][0]["individual_id"] == "ind-3"
        assert FAVOURITE not in [c["individual_id"] for c in plain["candidates"]][:1]
        schema = client.get("/openapi.json").json()["components"]["schemas"]["VerificationIn"]
        assert "toy" in schema["properties"]["verification"]["enum"]
    with live.client("admin") as admin:
        r = admin.put(f"/models/{catalogue.model_id}/verification", json={"verification": "toy"})
        assert r.status_code == 200 and r.json()["verification"] == "toy", r.text
        refused = admin.put(
            f"/models/{catalogue.model_id}/verification", json={"verification": "toys"}
        )
        assert refused.status_code == 422 and "use none or rerank or toy" in refused.text
    with live.client() as client:
        body = identify(client, 3, 50)
        assert body["model"]["verification"] == "toy"
        first, *rest = body["candidates"]
        assert first["individual_id"] == FAVOURITE and first["score"] == pytest.approx(1.0)
        # The head scored it too: its votes among the k and its nearest photo's distance.
        assert first["votes"] == 3 and first["distance"] is not None
        assert first["best_image_id"] is not None
        # The head's candidates follow, scored by the calibrated distance alone.
        head = [c for c in rest if c["individual_id"] != "new_individual"]
        assert head[0]["individual_id"] == "ind-3"
        assert head[0]["distance"] == plain["candidates"][0]["distance"]
        assert head[0]["score"] == pytest.approx(
            1 / (1 + 2.718281828459045 ** -(10 * 0.62 - 10 * head[0]["distance"])), abs=1e-6
        )
        assert head[0]["inliers"] is None
        recorded = client.get(f"/identifications/{body['identification_id']}").json()
        assert recorded["model"]["verification"] == "toy"
        assert recorded["candidates"] == body["candidates"]
        before = client.get(f"/identifications/{plain['identification_id']}").json()
        assert before["model"]["verification"] == "none"
    with catalogue.sessions() as session:
        rows = {
            i.id: (i.verification, i.calibration_version)
            for i in session.scalars(select(Identification))
        }
    assert rows[plain["identification_id"]] == ("none", None)
    assert rows[body["identification_id"]] == ("toy", Calibration.default(0.62).version)
