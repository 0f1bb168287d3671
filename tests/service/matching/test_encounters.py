"""Encounter identification: the fusion rule on its own, and end to end over loopback on SQLite
and PostgreSQL."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
from PIL import Image

from service.knn import NEW_INDIVIDUAL
from service.matching.encounters import Fusion, fuse
from service.matching.identify import AnsweredCandidate
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import encode, photo


def answer(*named: tuple[str, float], new_at: int | None = None) -> list[AnsweredCandidate]:
    out = [
        AnsweredCandidate(0, label, "dolphin", 3, d, 1 - d, i) for i, (label, d) in enumerate(named)
    ]
    if new_at is not None:
        out.insert(new_at, AnsweredCandidate(0, NEW_INDIVIDUAL, None, None, None, None, None))
    return out


def labels(candidates: list[AnsweredCandidate]) -> list[str]:
    return [c.individual_id for c in candidates]


@pytest.mark.parametrize("rule", [Fusion.SIMILARITY_SUM, Fusion.RANK_SUM])
def test_summing_rules_let_agreeing_photos_outvote_one_bad_photo(rule: Fusion) -> None:
    good = answer(("a", 0.20), ("b", 0.40), ("c", 0.45), ("d", 0.5))
    bad = answer(("x", 0.05), ("y", 0.4), ("z", 0.5), ("a", 0.55))
    fused = fuse([good, good, bad], cutoff=0.3, fusion=rule)
    assert labels(fused) == ["a", "x", NEW_INDIVIDUAL, "b", "c"]
    assert fused[0].votes == 9 and fused[0].distance == 0.2 and fused[0].rank == 1
    assert fused[0].confidence == 0.8 and fused[2].votes is None
    # The nearest over all photos follows the one bad photo.
    nearest = fuse([good, good, bad], cutoff=0.3, fusion=Fusion.MIN_DISTANCE)
    assert labels(nearest)[:2] == ["x", "a"]


def test_new_individual_leads_when_no_photo_comes_within_the_cutoff() -> None:
    far = answer(("a", 0.7), ("b", 0.8), new_at=0)
    fused = fuse([far, far], cutoff=0.62)
    assert labels(fused) == [NEW_INDIVIDUAL, "a", "b"]


def bad_photo_of(individual: int, intruder: int) -> bytes:
    """A photo of ``individual`` where ``intruder`` fills most of the frame: alone it misleads."""
    mostly = np.asarray(photo(intruder, 77), dtype=np.float32)
    barely = np.asarray(photo(individual, 77), dtype=np.float32)
    return encode(Image.fromarray((0.65 * mostly + 0.35 * barely).astype(np.uint8), "RGB"))


def post_encounter(client: httpx.Client, photos: list[bytes], **form: str) -> httpx.Response:
    files = [("photos", (f"p{i}.png", data, "image/png")) for i, data in enumerate(photos)]
    return client.post("/encounters/identify", files=files, data=form)


@pytest.mark.slow
def test_the_fused_ranking_beats_a_bad_photo_and_every_photo_is_recorded(
    live: LiveServer,
) -> None:
    bad = bad_photo_of(3, intruder=7)
    with live.client() as client:
        alone = client.post("/identify", files={"photo": ("bad.png", bad)})
        assert alone.status_code == 200
        assert alone.json()["candidates"][0]["individual_id"] != "ind-3"  # it misleads alone
        good = [encode(photo(3, 50)), encode(photo(3, 51))]
        response = post_encounter(client, [bad, *good])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["candidates"][0]["individual_id"] == "ind-3"
        assert body["fusion"] == "similarity_sum" and len(body["candidates"]) == 5
        assert [p["candidates"][0]["individual_id"] for p in body["photos"]][1:] == ["ind-3"] * 2
        assert len(body["identification_ids"]) == 3
        for ident, own in zip(body["identification_ids"], body["photos"], strict=True):
            assert own["identification_id"] == ident
            recorded = client.get(f"/identifications/{ident}")
            assert recorded.status_code == 200
            assert recorded.json()["candidates"] == own["candidates"]
        assert body["model"]["name"] == "toy" and body["gallery_size"] == 36
        metrics = client.get("/metrics").text
        assert 'whaleid_identify_stage_seconds_count{stage="embed"} 4.0' in metrics


@pytest.mark.slow
def test_encounter_limits_answer_413_or_422_never_500(catalogue: Catalogue) -> None:
    tight = catalogue.settings.model_copy(
        update={"encounter_max_photos": 2, "max_upload_bytes": 40_000}
    )
    for server in run_server(tight):
        with server.client() as client:
            small = encode(photo(1, 40))
            too_many = post_encounter(client, [small] * 3)
            assert too_many.status_code == 422
            assert "over the limit of 2 per encounter" in too_many.json()["detail"]
            huge = os.urandom(70_000)  # two of these exceed 2 x 40 kB + the form allowance
            assert post_encounter(client, [huge, huge]).status_code == 413
            unreadable = post_encounter(client, [small, b"not a photo at all"])
            assert unreadable.status_code in (415, 422)
            assert "photo 2 (p1.png)" in unreadable.json()["detail"]
            assert client.post("/encounters/identify", data={"species": "x"}).status_code == 422
            wrong_rule = post_encounter(client, [small], fusion="average")
            assert wrong_rule.status_code == 422
            for rule in ("rank_sum", "min_distance"):
                chosen = post_encounter(client, [small], fusion=rule)
                assert chosen.status_code == 200 and chosen.json()["fusion"] == rule
        with server.client(None) as anonymous:  # the key is checked before the photos are read
            refused = post_encounter(anonymous, [small])
            assert refused.status_code == 401 and "API key" in refused.json()["detail"]
