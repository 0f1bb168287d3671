"""Re-indexing after retraining, end to end over loopback: upload, the background job, catch-up
of decisions made meanwhile, the shadow evaluation's gate, activation, rollback and retirement."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sqlalchemy import func, select

from service.db.tables import Embedding, Image, Individual, Model
from service.gallery.sync import gallery_rows
from service.jobs.queue import Worker
from service.models.reindex import Embedders, worker_handlers
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import build_toy_model, encode, photo


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    """The catalogue's server with a quick in-process worker and a low confirmation floor."""
    catalogue.settings.job_poll_seconds = 0.05
    catalogue.settings.shadow_min_confirmations = 6
    yield from run_server(catalogue.settings)


@pytest.fixture
def idle_server(catalogue: Catalogue) -> Iterator[LiveServer]:
    """A server without its worker: the test runs the chunks itself, one at a time."""
    catalogue.settings.worker = False
    catalogue.settings.shadow_min_confirmations = 6
    yield from run_server(catalogue.settings)


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post(
        "/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )


def wait_job(client: httpx.Client, job_id: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if body["state"] not in ("queued", "running"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {body}")


def identify(client: httpx.Client, individual: int, shot: int) -> dict[str, Any]:
    r = client.post("/identify", files={"photo": ("q.png", encode(photo(individual, shot)))})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def confirm(live: LiveServer, individual: int, shot: int) -> int:
    """Identify a new photo of ``individual`` and have a curator confirm it; its image id."""
    with live.client() as client:
        answer = identify(client, individual, shot)
    with live.client("curator") as curator:
        r = curator.post(
            f"/identifications/{answer['identification_id']}/decision",
            json={"decision": "confirm", "individual_id": f"ind-{individual}"},
        )
        assert r.status_code == 200, r.text
    return int(answer["query_image_id"])


def model_status(catalogue: Catalogue, model_id: int) -> str:
    with catalogue.sessions() as session:
        return session.get_one(Model, model_id).status


@pytest.mark.slow
def test_upload_reindex_activate_rollback(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    with server.client("admin") as admin, server.client() as client:
        r = upload(admin, new_file)
        assert r.status_code == 201, r.text
        new = r.json()
        assert (new["name"], new["status"], new["embedding_dim"]) == ("toy-v2", "registered", 64)
        assert upload(admin, new_file).status_code == 200  # the same file: the same model

        r = admin.post(f"/models/{new['id']}/reindex", json={})
        assert r.status_code == 202, r.text
        job = wait_job(admin, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["done"] == job["total"] == 36 and job["failed"] == 0
        assert job["rate"] > 0 and job["eta_seconds"] == 0
        assert model_status(catalogue, new["id"]) == "ready"
        assert identify(client, 3, 40)["model"]["name"] == "toy"  # the old model still answers
        with catalogue.sessions() as session:
            assert len(gallery_rows(session, new["id"])) == 36

        # No curator has confirmed anything: the gate cannot judge, and says so.
        r = admin.post(f"/models/{new['id']}/activate", json={})
        assert r.status_code == 409
        assert "confirmed identifications" in r.json()["detail"]
        assert r.json()["shadow"]["evaluated"] < 6
        r = admin.post(f"/models/{new['id']}/activate", json={"force": True})
        assert r.status_code == 200, r.text
        assert r.json()["from_model_id"] == catalogue.model_id
        assert identify(client, 3, 41)["model"]["name"] == "toy-v2"
        assert model_status(catalogue, catalogue.model_id) == "ready"  # kept for a rollback

        r = admin.post("/models/rollback")
        assert r.status_code == 200, r.text
        assert r.json()["to_model_id"] == catalogue.model_id
        assert identify(client, 3, 42)["model"]["name"] == "toy"
        assert model_status(catalogue, new["id"]) == "ready"
        assert admin.post(f"/models/{catalogue.model_id}/retire").status_code == 409  # active
        r = admin.post(f"/models/{new['id']}/retire")
        assert r.status_code == 200 and r.json()["status"] == "retired"
        assert admin.post("/models/rollback").status_code == 409  # nothing left to go back to
        assert admin.post(f"/models/{new['id']}/activate", json={"force": True}).status_code == 409


@pytest.mark.slow
def test_a_second_reindex_embeds_only_what_is_missing(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    with server.client("admin") as admin:
        new_id = upload(admin, new_file).json()["id"]
        first = wait_job(admin, admin.post(f"/models/{new_id}/reindex").json()["id"])
        assert first["done"] == 36
        # Retired (or a cancelled run): a new re-index resumes, it does not start over.
        admin.post(f"/models/{new_id}/retire")
        confirm(server, 5, 50)
        second = wait_job(admin, admin.post(f"/models/{new_id}/reindex").json()["id"])
        assert second["state"] == "succeeded" and second["total"] == 1, second
    with catalogue.sessions() as session:
        per_image = session.execute(
            select(Embedding.image_id, func.count())
            .where(Embedding.model_id == new_id)
            .group_by(Embedding.image_id)
        ).all()
    assert len(per_image) == 37 and {n for _, n in per_image} == {1}


@pytest.mark.slow
def test_decisions_made_during_the_job_are_caught_up_before_activation(
    idle_server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    s = catalogue.settings
    s.reindex_chunk_size = 10
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    worker = Worker(
        catalogue.sessions,
        worker_handlers(s, catalogue.sessions, Embedders(s, catalogue.sessions)),
        lease_seconds=30,
    )
    with idle_server.client("admin") as admin:
        new_id = upload(admin, new_file).json()["id"]
        job_id = admin.post(f"/models/{new_id}/reindex").json()["id"]
        assert worker.run_once()  # the first chunk of 10 photos
        during_job = confirm(idle_server, 7, 60)
        with idle_server.client("curator") as curator:
            r = curator.post("/individuals/ind-1/merge", json={"into": "ind-2"})
            assert r.status_code == 200, r.text
        assert admin.get(f"/jobs/{job_id}").json()["done"] == 10
        while worker.run_once():
            pass
        job = admin.get(f"/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["result"]["caught_up"] == 1
        after_ready = confirm(idle_server, 8, 61)
        r = admin.post(f"/models/{new_id}/activate", json={"force": True})
        assert r.status_code == 200 and r.json()["caught_up"] == 1
    with catalogue.sessions() as session:
        labels = {row[1]: row[2] for row in gallery_rows(session, new_id)}
        photos = session.scalar(select(func.count()).where(Image.individual_id.is_not(None)))
    assert labels[during_job] == "ind-7" and labels[after_ready] == "ind-8"
    assert len(labels) == photos == 38
    assert "ind-1" not in labels.values()
    assert list(labels.values()).count("ind-2") == 6  # merged during the job


@pytest.mark.slow
def test_a_worse_model_is_refused_with_both_figures_unless_forced(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    for individual in range(8):
        confirm(server, individual, 70)
    # One colour average per photo: it cannot tell the individuals apart.
    worse = build_toy_model(tmp_path / "worse.onnx", grid=1, metadata={"whaleid.name": "blur"})
    with server.client("admin") as admin, server.client() as client:
        worse_id = upload(admin, worse).json()["id"]
        job = wait_job(admin, admin.post(f"/models/{worse_id}/reindex").json()["id"])
        shadow = job["result"]["shadow"]
        assert shadow["evaluated"] == 8 and shadow["sufficient"]
        old = shadow["baseline"]["heads"]["model"]["map5"]
        new = shadow["candidate"]["heads"]["model"]["map5"]
        assert old > new
        best = shadow["candidate"]["heads"]["best"]
        assert best["map5"] >= max(new, shadow["candidate"]["heads"]["paper"]["map5"])
        r = admin.post(f"/models/{worse_id}/activate", json={"head": "model"})
        assert r.status_code == 409
        assert f"{new:.4f}" in r.json()["detail"] and f"{old:.4f}" in r.json()["detail"]
        assert identify(client, 1, 71)["model"]["name"] == "toy"
        r = admin.post(f"/models/{worse_id}/activate", json={"head": "best", "force": True})
        assert r.status_code == 200, r.text
        answer = identify(client, 1, 72)["model"]
        assert answer["name"] == "blur"
        assert (answer["k"], answer["cutoff"], answer["ranking"]) == (
            best["k"],
            best["cutoff"],
            best["ranking"],
        )


@pytest.mark.slow
def test_the_shadow_evaluation_leaves_out_the_query_photo_itself(
    server: LiveServer, catalogue: Catalogue
) -> None:
    """A query searched against a gallery holding its own photo would score a perfect 1.0; an
    individual whose only photo is the query itself cannot be found."""
    image_id = confirm(server, 2, 80)
    with catalogue.sessions() as session:
        lone = Individual(catalogue_id="lone", species="bottlenose_dolphin")
        session.add(lone)
        session.flush()
        session.get_one(Image, image_id).individual_id = lone.id
        session.commit()
    with server.client("admin") as admin:
        report = admin.get(f"/models/{catalogue.model_id}/shadow").json()
    assert report["evaluated"] == 1
    assert report["candidate"]["heads"]["model"]["map5"] == 0.0


@pytest.mark.slow
def test_model_routes_refuse_bad_input_with_a_clear_4xx(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    no_metadata = build_toy_model(
        tmp_path / "bare.onnx",
        metadata={"whaleid.input_size": None},  # type: ignore[dict-item]
    )
    with server.client("admin") as admin:
        r = upload(admin, no_metadata)
        assert r.status_code == 422 and "whaleid.input_size" in r.json()["detail"]
        assert upload(admin, tmp_path / "bare.onnx").status_code == 422
        r = admin.post("/models", content=b"not onnx at all")
        assert r.status_code == 422 and "not a loadable ONNX model" in r.json()["detail"]
        assert admin.post("/models", content=b"").status_code == 422
        # Another file under a name and version already registered: say so, do not 500.
        clash = build_toy_model(tmp_path / "clash.onnx", seed=3)  # toy seed3 vs the active seed0
        assert upload(admin, clash).status_code == 201
        clash2 = build_toy_model(
            tmp_path / "clash2.onnx", seed=4, metadata={"whaleid.version": "seed3"}
        )
        r = upload(admin, clash2)
        assert r.status_code == 409 and "another whaleid.version" in r.json()["detail"]
        dead = onnx.load(str(build_toy_model(tmp_path / "dead.onnx", seed=5)))
        for weights in dead.graph.initializer:
            if weights.name == "weights":
                weights.CopyFrom(
                    numpy_helper.from_array(np.zeros((192, 64), np.float32), "weights")
                )
        onnx.save(dead, str(tmp_path / "dead.onnx"))
        r = upload(admin, tmp_path / "dead.onnx")
        assert r.status_code == 422 and "probe embedding" in r.json()["detail"]
        # One character over the documented 200.
        long_name = build_toy_model(tmp_path / "long.onnx", metadata={"whaleid.name": "x" * 201})
        r = upload(admin, long_name)
        assert r.status_code == 422 and "whaleid.name must be 1 to 200" in r.json()["detail"]
        assert admin.post(f"/models/{2**63}/reindex").status_code == 422
        assert admin.post("/models/999/reindex").status_code == 404
        assert admin.get("/jobs/999").status_code == 404
        assert admin.post("/jobs/999/cancel").status_code == 404
        assert admin.post(f"/models/{catalogue.model_id}/reindex").status_code == 409
        r = admin.post("/models/1/activate", json={"head": "nonsense"})
        assert r.status_code == 422
    with server.client("curator") as curator:
        assert upload(curator, no_metadata).status_code == 403
        # A key lists its own jobs only: none of the admin's re-index jobs (issue 14).
        assert curator.get("/jobs").json() == []
    with server.client(None) as anonymous:
        assert anonymous.post("/models", content=b"x" * 100).status_code == 401
    assert not list(catalogue.settings.models_dir.glob(".upload.*"))


@pytest.mark.slow
def test_an_upload_over_the_limit_is_refused_while_streaming(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    catalogue.settings.max_model_bytes = 4096
    big = build_toy_model(tmp_path / "big.onnx", dim=256)
    for live in run_server(catalogue.settings):
        with live.client("admin") as admin:
            r = upload(admin, big)
            assert r.status_code == 413
            # Chunked, with no Content-Length: the route counts the bytes itself.
            data = big.read_bytes()
            r = admin.post(
                "/models", content=iter([data[i : i + 1000] for i in range(0, len(data), 1000)])
            )
            assert r.status_code == 413 and "WHALEID_MAX_MODEL_BYTES" in r.json()["detail"]
    assert not list(catalogue.settings.models_dir.glob(".upload.*"))


@pytest.mark.slow
def test_cancelling_a_reindex_returns_the_model_to_registered(
    idle_server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7)
    with idle_server.client("admin") as admin:
        new_id = upload(admin, new_file).json()["id"]
        job_id = admin.post(f"/models/{new_id}/reindex").json()["id"]
        assert model_status(catalogue, new_id) == "indexing"
        assert admin.post(f"/models/{new_id}/reindex").status_code == 409
        r = admin.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert admin.post(f"/jobs/{job_id}/cancel").status_code == 409
        assert model_status(catalogue, new_id) == "registered"
        assert admin.post(f"/models/{new_id}/activate", json={"force": True}).status_code == 409


@pytest.mark.slow
def test_the_command_line_reindexes_activates_and_rolls_back(
    catalogue: Catalogue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli import main

    s = catalogue.settings
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    assert main(["reindex", str(new_file)]) == 0
    job_id = int(capsys.readouterr().out.split()[-1])
    assert main(["jobs", "list"]) == 0
    assert f"{job_id}\treindex\tqueued" in capsys.readouterr().out
    assert main(["worker", "--exit-when-idle"]) == 0
    assert main(["jobs", "show", str(job_id), "--follow"]) == 0
    assert main(["jobs", "show", str(job_id)]) == 0
    assert '"state": "succeeded"' in capsys.readouterr().out
    with catalogue.sessions() as session:
        new_id = session.scalar(select(Model.id).where(Model.name == "toy-v2"))
    assert main(["models", "activate", str(new_id)]) == 3  # too few confirmations to judge
    assert main(["models", "activate", str(new_id), "--force", "--head", "paper"]) == 0
    assert model_status(catalogue, new_id) == "active"
    assert main(["models", "rollback"]) == 0
    assert model_status(catalogue, catalogue.model_id) == "active"
    assert main(["models", "retire", str(new_id)]) == 0
    assert main(["jobs", "cancel", str(job_id)]) == 2  # finished already
    assert main(["reindex", "999"]) == 2


@pytest.mark.slow
def test_a_photo_the_old_model_answered_and_confirmed_after_the_switch_joins_the_new_gallery(
    idle_server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    from service.models.reindex import ActiveGalleryKeeper

    s = catalogue.settings
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    embedders = Embedders(s, catalogue.sessions)
    worker = Worker(catalogue.sessions, worker_handlers(s, catalogue.sessions, embedders))
    keeper = ActiveGalleryKeeper(catalogue.sessions, embedders)
    with idle_server.client("admin") as admin, idle_server.client() as client:
        new_id = upload(admin, new_file).json()["id"]
        admin.post(f"/models/{new_id}/reindex")
        while worker.run_once():
            pass
        answered_by_old = identify(client, 9, 90)
        assert admin.post(f"/models/{new_id}/activate", json={"force": True}).status_code == 200
    with idle_server.client("curator") as curator:
        r = curator.post(
            f"/identifications/{answered_by_old['identification_id']}/decision",
            json={"decision": "confirm", "individual_id": "ind-9"},
        )
        assert r.status_code == 200
    image_id = answered_by_old["query_image_id"]

    def in_new_gallery() -> bool:
        with catalogue.sessions() as session:
            return image_id in {row[1] for row in gallery_rows(session, new_id)}

    assert not in_new_gallery()  # only the old model embedded it
    keeper()
    assert in_new_gallery()
    with idle_server.client() as client:
        labels = [c["individual_id"] for c in identify(client, 9, 91)["candidates"]]
    assert labels[0] == "ind-9"


@pytest.mark.slow
def test_a_gallery_photo_whose_file_is_gone_is_reported_and_the_rest_is_indexed(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    s = catalogue.settings
    with catalogue.sessions() as session:
        lost = session.scalars(
            select(Image).where(Image.individual_id.is_not(None)).order_by(Image.id)
        ).first()
        assert lost is not None
    (s.photos_dir / lost.file_path).unlink()
    new_file = build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "toy-v2"})
    with server.client("admin") as admin, server.client() as client:
        new_id = upload(admin, new_file).json()["id"]
        job = wait_job(admin, admin.post(f"/models/{new_id}/reindex").json()["id"])
        assert job["state"] == "succeeded", job
        assert (job["done"], job["failed"], job["total"]) == (35, 1, 36)
        assert any(lost.file_path in e for e in job["errors"])
        r = admin.post(f"/models/{new_id}/activate", json={"force": True})
        assert r.status_code == 200, r.text
        assert identify(client, 4, 95)["model"]["name"] == "toy-v2"
    with catalogue.sessions() as session:
        assert len(gallery_rows(session, new_id)) == 35
