"""``service.client`` against a real server over loopback: the sync client through the whole
lifecycle a platform drives (identify, an encounter, decide, individuals, models, jobs), and the
async client for identification and a batch job."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client import AsyncWhaleidClient, JobTimeout, WhaleidClient, WhaleidError
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import build_toy_model, encode, photo


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    catalogue.settings.job_poll_seconds = 0.05
    yield from run_server(catalogue.settings)


@pytest.mark.slow
def test_a_platform_lifecycle_through_the_sync_client(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    with (
        WhaleidClient(server.url, server.keys["integration"]) as platform,
        WhaleidClient(server.url, server.keys["curator"]) as curator,
        WhaleidClient(server.url, server.keys["admin"]) as admin,
    ):
        answer = platform.identify(("q.png", encode(photo(4, 30))), species="bottlenose_dolphin")
        assert answer["candidates"][0]["individual_id"] == "ind-4"
        assert platform.identification(answer["identification_id"])["status"] == "pending"
        decided = curator.decide(answer["identification_id"], "confirm", individual_id="ind-4")
        assert decided["decision"] == "confirm"
        with pytest.raises(WhaleidError) as refused:  # integration keys cannot decide
            platform.decide(answer["identification_id"], "reject")
        assert refused.value.status == 403
        page = platform.individuals(limit=5)
        assert page["total"] == 12 and len(page["items"]) == 5
        assert platform.individual("ind-4")["image_count"] == 4

        new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "v2"})
        model = admin.upload_model(new_file.read_bytes())
        assert model["status"] == "registered"
        job = admin.wait_job(admin.reindex(model["id"])["id"], timeout=60, poll=0.05)
        assert job["state"] == "succeeded" and job["done"] == 37
        with pytest.raises(WhaleidError) as gated:  # too few confirmations to judge
            admin.activate(model["id"])
        assert gated.value.status == 409
        assert admin.activate(model["id"], force=True)["to_model_id"] == model["id"]
        assert platform.identify(encode(photo(2, 31)))["model"]["name"] == "v2"
        assert admin.rollback()["to_model_id"] == catalogue.model_id
        assert {m["id"] for m in admin.models()} >= {model["id"], catalogue.model_id}

        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as zf:
            zf.writestr("a.png", encode(photo(7, 32)))
        job = platform.identify_archive(zipped.getvalue())
        with pytest.raises(JobTimeout):
            platform.wait_job(job["id"], timeout=0, poll=0)  # one poll, not finished yet
        done = platform.wait_job(job["id"], timeout=60, poll=0.05)
        assert done["state"] == "succeeded"
        assert platform.job_results(job["id"])[0]["candidates"][0]["individual_id"] == "ind-7"
        assert platform.job_results_csv(job["id"]).startswith("image,predictions\na.png,ind-7 ")

        encounter = platform.identify_encounter([encode(photo(1, 33)), encode(photo(1, 34))])
        assert encounter["candidates"][0]["individual_id"] == "ind-1"
        assert len(encounter["photos"]) == len(encounter["identification_ids"]) == 2


@pytest.mark.slow
def test_the_async_client(server: LiveServer) -> None:
    async def scenario() -> None:
        async with AsyncWhaleidClient(server.url, server.keys["integration"]) as client:
            answers = await asyncio.gather(
                *(client.identify(encode(photo(i, 35))) for i in range(4))
            )
            assert [a["candidates"][0]["individual_id"] for a in answers] == [
                f"ind-{i}" for i in range(4)
            ]
            ids = [
                (await client.identification(a["identification_id"]))["query_image_id"]
                for a in answers[:2]
            ]
            job = await client.identify_batch(image_ids=ids)
            done = await client.wait_job(job["id"], timeout=60, poll=0.05)
            assert done["state"] == "succeeded" and done["done"] == 2
            rows = await client.job_results(job["id"])
            assert [r["candidates"][0]["individual_id"] for r in rows] == ["ind-0", "ind-1"]
            with pytest.raises(WhaleidError) as bad:
                await client.identify_batch(image_ids=[1], urls=["http://x/"])
            assert bad.value.status == 422

    asyncio.run(scenario())
