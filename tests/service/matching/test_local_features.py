"""Local features: RootSIFT per photo, verification of the top candidates with a calibrated fused
score, the built-in local-features matcher, and the matches a curator sees — on real OpenCV,
faiss, SQLite and PostgreSQL, and uvicorn over loopback."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.catalogue.imports import CatalogueImport
from service.cli import main
from service.contract import Calibration
from service.db.tables import Feature, Image, Model, make_engine, make_sessionmaker, transaction
from service.errors import TooFewPairs
from service.gallery.sync import Filters
from service.knn import NEW_INDIVIDUAL, average_precision_at_5
from service.matching.features import Features, RootSift, extractor_for
from service.matching.identify import Identifier
from service.matching.runtime import Runtime
from service.matching.verify import (
    Pair,
    fit_calibration,
    map5_at_thresholds,
    match_pair,
    probability,
)
from service.models.registry import register_builtin, register_model
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings
from tests.conftest import run_server
from tests.toy import encode, textured_photo, write_catalogue

KNOWN = range(10)  # individuals in the gallery
UNSEEN = (60, 61, 62, 63)  # individuals it has never seen
SHOTS = (0, 1, 2)  # gallery photos per individual
QUERY_SHOTS = (7, 8)


# The extractor and the pair matcher ------------------------------------------------------------


def test_rootsift_points_lie_in_the_photo_and_survive_the_database_bytes() -> None:
    image = textured_photo(3, 0)
    features = RootSift(max_side=640, n_features=400).extract(image)
    assert len(features) > 40
    assert features.descriptors.dtype == np.uint8 and features.descriptors.shape[1] == 128
    assert (features.points >= 0).all()
    assert (features.points[:, 0] < image.width).all()
    assert (features.points[:, 1] < image.height).all()
    # RootSIFT vectors are unit vectors once read back.
    assert np.allclose(np.linalg.norm(features.unit, axis=1), 1.0, atol=1e-5)
    again = Features.unpack(*features.pack())
    assert np.array_equal(again.points, features.points)
    assert np.array_equal(again.descriptors, features.descriptors)
    assert (again.width, again.height) == image.size


def test_points_of_a_reduced_photo_are_given_in_the_full_photos_pixels() -> None:
    image = textured_photo(3, 0, size=192)
    full = RootSift(max_side=96).extract(image)  # extracted at half size
    assert full.points.max() > 96  # ...but its points span the whole photo
    small = image.resize((96, 96))
    mapped = RootSift(max_side=96).extract(small, size=(192, 192))
    assert (mapped.width, mapped.height) == (192, 192)
    assert mapped.points.max() > 96


def test_the_extractor_name_spells_its_settings(sqlite_settings: Settings) -> None:
    assert RootSift(640, 400).name != RootSift(512, 400).name != RootSift(640, 300).name
    assert extractor_for(sqlite_settings).name == "rootsift-v1-640px-400"


def test_inliers_separate_photos_of_one_animal_from_photos_of_others() -> None:
    """Every pair of shots of one individual has more inliers than any pair of different
    individuals (8 individuals: 24 same pairs, 56 different pairs)."""
    extractor = RootSift()
    feats = {(i, s): extractor.extract(textured_photo(i, s)) for i in range(8) for s in range(4)}
    same = [match_pair(feats[(i, 0)], feats[(i, s)]).inliers for i in range(8) for s in (1, 2, 3)]
    different = [
        match_pair(feats[(i, 0)], feats[(j, 1)]).inliers
        for i in range(8)
        for j in range(8)
        if i != j
    ]
    assert min(same) > max(different), (sorted(same), sorted(different))
    # The same photos give the same inliers, every time (RANSAC is seeded).
    assert match_pair(feats[(1, 0)], feats[(1, 2)]).inliers == same[4]


def test_match_pairs_are_in_both_photos_pixels() -> None:
    extractor = RootSift()
    a = extractor.extract(textured_photo(2, 0))
    b = extractor.extract(textured_photo(2, 1))
    match = match_pair(a, b)
    assert match.inliers >= 8
    kept = match.pairs[match.inlier]
    assert (kept >= 0).all() and (kept < 192).all()


# The calibration --------------------------------------------------------------------------------


def test_default_calibration_puts_the_global_midpoint_at_the_cutoff() -> None:
    calibration = Calibration.default(0.4)
    assert probability(calibration, 0.4, None) == pytest.approx(0.5)
    assert probability(calibration, 0.2, None) > 0.5 > probability(calibration, 0.6, None)
    # More inliers never lower the probability; no evidence at all is no match.
    local = [probability(calibration, None, n) for n in range(0, 60, 5)]
    assert local == sorted(local)
    assert probability(calibration, None, None) == 0.0


def test_fitted_calibration_learns_which_evidence_tells_animals_apart() -> None:
    """Distances carry no information here, inliers do: the fit gives the inliers the weight."""
    rng = np.random.default_rng(0)
    pairs = [Pair(float(rng.uniform(0.2, 0.6)), int(rng.integers(15, 40)), True) for _ in range(60)]
    pairs += [
        Pair(float(rng.uniform(0.2, 0.6)), int(rng.integers(0, 7)), False) for _ in range(200)
    ]
    fitted = fit_calibration(pairs, Calibration.default(0.62), source="test")
    w0, w1, w2 = fitted.fused_weights
    assert w2 > 1.0 and abs(w1) < w2
    right = [probability(fitted, p.distance, p.inliers) for p in pairs if p.match]
    wrong = [probability(fitted, p.distance, p.inliers) for p in pairs if not p.match]
    assert min(right) > 0.5 > max(wrong)
    stored = Calibration.from_dict(json.loads(json.dumps(fitted.as_dict())), 0.62)
    assert stored.fused_weights == pytest.approx(fitted.fused_weights)
    assert stored.fitted["pairs"] == 260


def test_map5_places_new_individual_at_each_threshold() -> None:
    """A known query whose right candidate has probability 0.4, and an unseen one whose best
    wrong candidate has 0.2: only a threshold between them answers both right."""
    calibration = Calibration(global_=(0.0, -1.0))  # p = 1 / (1 + exp(d)): d = -logit(p)

    def d(p: float) -> float:
        return -math.log(p / (1 - p))

    pairs = [
        Pair(d(0.4), None, True, 1),
        Pair(d(0.1), None, False, 1),
        Pair(d(0.2), None, False, 2, unseen=True),
    ]
    scores = map5_at_thresholds(pairs, calibration)
    assert scores[0.3] == pytest.approx(1.0)
    assert scores[0.5] == pytest.approx((0.5 + 1.0) / 2)  # new first for both
    assert scores[0.15] == pytest.approx((1.0 + 0.5) / 2)  # the wrong one before new


def test_the_threshold_is_chosen_for_map5_on_the_labelled_queries() -> None:
    rng = np.random.default_rng(1)
    pairs = []
    for q in range(40):  # known: a right candidate, three wrong ones, overlapping evidence
        pairs.append(Pair(None, int(rng.integers(4, 16)), True, q))
        pairs += [Pair(None, int(rng.integers(0, 8)), False, q) for _ in range(3)]
    for q in range(40, 60):
        pairs += [Pair(None, int(rng.integers(0, 8)), False, q, unseen=True) for _ in range(4)]
    fitted = fit_calibration(pairs, Calibration.default(0.62), source="t")
    scores = map5_at_thresholds(pairs, fitted)
    assert scores[fitted.threshold] == pytest.approx(max(scores.values()))
    assert scores[fitted.threshold] >= scores[0.5]
    assert fitted.fitted["queries"] == 60 and fitted.fitted["threshold_chosen_on_map5"]


def test_a_calibration_needs_enough_right_and_wrong_candidates() -> None:
    few = [Pair(0.2, 30, True)] * 9 + [Pair(0.5, 2, False)] * 50
    with pytest.raises(TooFewPairs, match="at least 10 right and 10 wrong"):
        fit_calibration(few, Calibration.default(0.62), source="test")
    with pytest.raises(ValueError, match="threshold"):
        Calibration.from_dict({"threshold": 1.5}, 0.62)


# In the service ---------------------------------------------------------------------------------


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(settings.sqlalchemy_url))


def _textured_catalogue(
    settings: Settings, folder: Path, model: Model, *, features: bool = True
) -> None:
    factory = _sessions(settings)
    csv_path = write_catalogue(folder, KNOWN, SHOTS, textured=True)
    embedder = Embedder.for_model(settings, model.file_path)
    run = CatalogueImport(
        settings, factory, embedder, model.id, extractor_for(settings) if features else None
    )
    report = run.run(csv_path, folder / "images")
    assert not report.errors and report.imported == len(KNOWN) * len(SHOTS)


def _map5(identifier: Identifier) -> tuple[float, float]:
    """MAP@5 on held-out shots of the known individuals, and on the unseen ones."""
    known, unseen = [], []
    for ind in [*KNOWN, *UNSEEN]:
        for shot in QUERY_SHOTS:
            answer = identifier.identify(
                encode(textured_photo(ind, shot)), filters=Filters(), record=False
            )
            labels = [c.individual_id for c in answer.candidates]
            if ind in KNOWN:
                known.append(average_precision_at_5(labels, f"ind-{ind}"))
            else:
                unseen.append(average_precision_at_5(labels, NEW_INDIVIDUAL))
    return float(np.mean(known)), float(np.mean(unseen))


@pytest.fixture
def reranking(settings: Settings, tmp_path: Path, toy_model: Path) -> Iterator[Model]:
    """The toy model (which pools colours, so turned photos fool it) verifying its answers."""
    factory = _sessions(settings)
    model = register_model(settings, factory, toy_model)
    with transaction(factory) as session:
        session.get_one(Model, model.id).verification = "rerank"
    activate_model(settings, factory, model.id)
    with factory() as session:
        model = session.get_one(Model, model.id)
    _textured_catalogue(settings, tmp_path / "catalogue", model)
    yield model


@pytest.mark.slow
def test_verification_beats_the_embedding_alone_and_keeps_its_evidence(
    settings: Settings, reranking: Model
) -> None:
    factory = _sessions(settings)
    with factory() as session:
        stored = session.scalar(select(func.count()).select_from(Feature))
    assert stored == len(KNOWN) * len(SHOTS)  # extracted at import

    identifier = Runtime(settings, factory).current()
    fused_known, _ = _map5(identifier)
    identifier.model = identifier.model.__class__(
        **{**identifier.model.__dict__, "verification": "none"}
    )
    global_known, _ = _map5(identifier)
    assert fused_known >= global_known + 0.2, (fused_known, global_known)
    assert fused_known >= 0.85


@pytest.mark.slow
def test_a_verified_answer_carries_inliers_and_scores_and_is_recorded(
    settings: Settings, reranking: Model
) -> None:
    for server in run_server(settings):
        with server.client() as client:
            response = client.post(
                "/identify",
                files={"photo": ("q.png", encode(textured_photo(4, 7)))},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"]["verification"] == "rerank"
            first = body["candidates"][0]
            assert first["individual_id"] == "ind-4"
            assert first["inliers"] >= 8 and first["score"] > 0.5
            named = [c for c in body["candidates"] if c["individual_id"] != NEW_INDIVIDUAL]
            assert all(c["inliers"] is not None and c["score"] is not None for c in named)
            scores = [c["score"] for c in body["candidates"] if c["score"] is not None]
            assert scores == sorted(scores, reverse=True)
            assert "verify;dur=" in response.headers["Server-Timing"]

            recorded = client.get(f"/identifications/{body['identification_id']}", timeout=60)
            again = recorded.json()["candidates"]
            assert [(c["individual_id"], c["inliers"], c["score"]) for c in again] == [
                (c["individual_id"], c["inliers"], c["score"]) for c in body["candidates"]
            ]
            # The query's features were kept with its photo, for the gallery after a confirmation.
            factory = _sessions(settings)
            with factory() as session:
                kept = session.scalar(
                    select(func.count())
                    .select_from(Feature)
                    .where(Feature.image_id == body["query_image_id"])
                )
            assert kept == 1

            matches = client.get(
                f"/identifications/{body['identification_id']}/matches",
                params={"candidate": 1},
                timeout=60,
            )
            assert matches.status_code == 200, matches.text
            m = matches.json()
            assert m["inliers"] == first["inliers"]
            assert m["candidate_image_id"] == first["best_image_id"]
            assert m["query_image_id"] == body["query_image_id"]
            inliers = [p for p in m["matches"] if p["inlier"]]
            assert len(inliers) == m["inliers"]
            qw, qh = m["query_size"]
            cw, ch = m["candidate_size"]
            for p in inliers:
                assert 0 <= p["query"][0] < qw and 0 <= p["query"][1] < qh
                assert 0 <= p["candidate"][0] < cw and 0 <= p["candidate"][1] < ch

            for bad in ("0", "6", "x", "99999999999999999999"):
                r = client.get(
                    f"/identifications/{body['identification_id']}/matches",
                    params={"candidate": bad},
                    timeout=60,
                )
                assert r.status_code == 422, (bad, r.text)
            missing = client.get("/identifications/999999/matches", timeout=60)
            assert missing.status_code == 404
        with server.client(None) as anonymous:
            r = anonymous.get(f"/identifications/{body['identification_id']}/matches", timeout=60)
            assert r.status_code == 401


@pytest.mark.slow
def test_another_partners_matches_are_not_found(settings: Settings, reranking: Model) -> None:
    from service.access.auth import create_key

    other = create_key(_sessions(settings), "partner B", "integration")[1]
    for server in run_server(settings):
        with server.client() as client:
            body = client.post(
                "/identify",
                files={"photo": ("q.png", encode(textured_photo(4, 7)))},
                timeout=60,
            ).json()
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=60
        ) as b:
            r = b.get(f"/identifications/{body['identification_id']}/matches")
            assert r.status_code == 404


@pytest.mark.slow
def test_verification_is_switched_per_model_without_a_restart(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    factory = _sessions(settings)
    model = register_model(settings, factory, toy_model)
    activate_model(settings, factory, model.id)
    with factory() as session:
        model = session.get_one(Model, model.id)
    _textured_catalogue(settings, tmp_path / "catalogue", model, features=False)
    photo = {"photo": ("q.png", encode(textured_photo(2, 8)))}
    for server in run_server(settings):
        with server.client() as client:
            before = client.post("/identify", files=photo, timeout=60).json()
            assert before["model"]["verification"] == "none"
            assert all(c["inliers"] is None for c in before["candidates"])
        with server.client("integration") as client:
            r = client.put(
                f"/models/{model.id}/verification", json={"verification": "rerank"}, timeout=60
            )
            assert r.status_code == 403
        with server.client("admin") as admin:
            r = admin.put(
                f"/models/{model.id}/verification", json={"verification": "sometimes"}, timeout=60
            )
            assert r.status_code == 422
            r = admin.put(
                f"/models/{model.id}/verification", json={"verification": "rerank"}, timeout=60
            )
            assert r.status_code == 200 and r.json()["verification"] == "rerank"
        with server.client() as client:
            after = client.post("/identify", files=photo, timeout=60).json()
            assert after["model"]["verification"] == "rerank"
            # The gallery had no features (imported before): they were extracted on demand.
            assert after["candidates"][0]["individual_id"] == "ind-2"
            assert after["candidates"][0]["inliers"] >= 8


# The built-in local-features matcher --------------------------------------------------------------


@pytest.fixture
def local_matcher(settings: Settings, tmp_path: Path) -> Iterator[Model]:
    factory = _sessions(settings)
    model = register_builtin(factory, "builtin:local-features")
    assert register_builtin(factory, "builtin:local-features").id == model.id  # idempotent
    activate_model(settings, factory, model.id)
    with factory() as session:
        model = session.get_one(Model, model.id)
    _textured_catalogue(settings, tmp_path / "catalogue", model)
    yield model


@pytest.mark.slow
def test_the_local_matcher_identifies_with_no_trained_model(
    settings: Settings, local_matcher: Model
) -> None:
    identifier = Runtime(settings, _sessions(settings)).current()
    assert identifier.local is not None
    known, unseen = _map5(identifier)
    assert known >= 0.9, known
    assert unseen >= 0.75, unseen  # most unseen animals are called new first
    answer = identifier.identify(encode(textured_photo(5, 7)), filters=Filters(), record=False)
    first = answer.candidates[0]
    assert first.individual_id == "ind-5" and first.distance is None
    assert first.confidence == first.score and first.inliers is not None and first.inliers >= 8


@pytest.mark.slow
def test_the_local_matchers_index_follows_the_catalogue_at_once(
    settings: Settings, local_matcher: Model
) -> None:
    """A curator names a new animal; the next photo of it is recognised, on this replica and
    on a second one that only sees the database."""
    for server in run_server(settings):
        with server.client() as client:
            body = client.post(
                "/identify",
                files={"photo": ("q.png", encode(textured_photo(61, 0)))},
                timeout=60,
            ).json()
            assert body["candidates"][0]["individual_id"] == NEW_INDIVIDUAL, body["candidates"]
            refused = client.get(
                f"/identifications/{body['identification_id']}/matches",
                params={"candidate": 1},
                timeout=60,
            )
            assert refused.status_code == 422 and "no photo to match" in refused.json()["detail"]
        with server.client("curator") as curator:
            r = curator.post(
                f"/identifications/{body['identification_id']}/decision",
                json={"decision": "new_individual", "code": "ind-61"},
                timeout=60,
            )
            assert r.status_code in (200, 201), r.text
        with server.client() as client:
            again = client.post(
                "/identify",
                files={"photo": ("q.png", encode(textured_photo(61, 3)))},
                timeout=60,
            ).json()
            assert again["candidates"][0]["individual_id"] == "ind-61"
    other = Runtime(settings, _sessions(settings)).current()
    answer = other.identify(encode(textured_photo(61, 4)), filters=Filters(), record=False)
    assert answer.candidates[0].individual_id == "ind-61"
    assert other.local is not None
    with _sessions(settings)() as session:
        gallery = set(session.scalars(select(Image.id).where(Image.individual_id.is_not(None))))
    assert other.local.descriptors.images == gallery


@pytest.mark.slow
def test_the_local_matcher_honours_filters(settings: Settings, local_matcher: Model) -> None:
    identifier = Runtime(settings, _sessions(settings)).current()
    answer = identifier.identify(
        encode(textured_photo(5, 7)), filters=Filters(species="humpback_whale"), record=False
    )
    assert answer.candidates[0].individual_id == NEW_INDIVIDUAL
    assert all(c.individual_id != "ind-5" for c in answer.candidates)


# The command line ---------------------------------------------------------------------------------


def _queries(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    path = folder / "queries.csv"
    lines = ["image,species,individual_id"]
    for ind in [*KNOWN, *UNSEEN]:
        for shot in (*QUERY_SHOTS, 9):
            name = f"q{ind}_{shot}.png"
            (folder / "images" / name).write_bytes(encode(textured_photo(ind, shot)))
            truth = f"ind-{ind}" if ind in KNOWN else NEW_INDIVIDUAL
            lines.append(f"{name},bottlenose_dolphin,{truth}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHALEID_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", settings.sqlalchemy_url)


@pytest.mark.slow
def test_evaluate_compares_verification_and_calibrate_keeps_the_fit(
    settings: Settings,
    reranking: Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _env(settings, monkeypatch)
    queries = _queries(tmp_path / "queries")
    images = str(tmp_path / "queries" / "images")
    figures: dict[str, dict[str, Any]] = {}
    for mode in ("none", "rerank"):
        assert main(["evaluate", str(queries), "--images", images, "--verification", mode]) == 0
        figures[mode] = json.loads(capsys.readouterr().out)
    assert figures["rerank"]["map5_known"] >= figures["none"]["map5_known"] + 0.2
    assert figures["rerank"]["queries"] == (len(KNOWN) + len(UNSEEN)) * 3

    assert main(["models", "calibrate", str(reranking.id), str(queries), "--images", images]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["fitted"]["source"] == "labelled queries queries.csv"
    assert fitted["fitted"]["pairs"] >= 100
    with _sessions(settings)() as session:
        assert session.get_one(Model, reranking.id).calibration == fitted
    assert main(["evaluate", str(queries), "--images", images]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    # Calibrated on the catalogue's own evidence, unseen animals are called new far more often.
    assert calibrated["map5_unseen"] > figures["rerank"]["map5_unseen"]
    assert not math.isnan(calibrated["map5"])


@pytest.mark.slow
def test_calibrating_on_too_few_confirmations_says_what_to_do(
    settings: Settings,
    reranking: Model,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _env(settings, monkeypatch)
    # Without a CSV the command fits on the gallery (issue 26); --confirmations is the old path.
    assert main(["models", "calibrate", str(reranking.id), "--confirmations"]) == 2
    assert "at least 10 right and 10 wrong" in caplog.text
    with _sessions(settings)() as session:
        assert session.get_one(Model, reranking.id).calibration is None
    assert main(["models", "verify", str(reranking.id), "--mode", "none"]) == 0
    assert main(["models", "verify", "999", "--mode", "none"]) == 2


def test_the_builtin_matcher_registers_from_the_command_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _env(settings, monkeypatch)
    assert main(["models", "add", "builtin:local-features"]) == 0
    assert main(["models", "add", "builtin:sift-magic"]) == 2
    assert "unknown built-in matcher" in caplog.text
    with _sessions(settings)() as session:
        rows = session.scalars(select(Model)).all()
    assert [(m.kind, m.verification, m.status) for m in rows] == [
        ("local-features", "rerank", "registered")
    ]
    assert main(["models", "verify", str(rows[0].id), "--mode", "none"]) == 2
    assert "always verifies" in caplog.text


# Switching from the local matcher to a trained model --------------------------------------------


@pytest.mark.slow
def test_switching_from_the_local_matcher_is_a_reindex_whose_shadow_compares_verification(
    settings: Settings, local_matcher: Model, toy_model: Path
) -> None:
    from service.catalogue.curation import DecisionKind, DecisionRequest, decide
    from service.jobs.queue import Worker
    from service.models.calibration import set_verification
    from service.models.reindex import Embedders, start_reindex, worker_handlers

    factory = _sessions(settings)
    identifier = Runtime(settings, factory).current()
    for ind in [*KNOWN, *UNSEEN]:
        for shot in (10, 11) if ind in KNOWN else (10,):
            answer = identifier.identify(encode(textured_photo(ind, shot)), filters=Filters())
            assert answer.identification_id is not None
            request = (
                DecisionRequest(DecisionKind.CONFIRM, individual_id=f"ind-{ind}")
                if ind in KNOWN
                else DecisionRequest(DecisionKind.NEW_INDIVIDUAL, code=f"ind-{ind}")
            )
            decide(factory, answer.identification_id, request, "curator tester")

    trained = register_model(settings, factory, toy_model)
    set_verification(factory, trained.id, "rerank")
    job = start_reindex(settings, factory, trained.id)
    worker = Worker(factory, worker_handlers(settings, factory, Embedders(settings, factory)))
    while worker.run_once():
        pass
    with factory() as session:
        from service.db.tables import Job

        result = session.get_one(Job, job.id).result
        assert session.get_one(Model, trained.id).status == "ready"
    shadow = result["shadow"]
    assert shadow["evaluated"] == len(KNOWN) * 2 + len(UNSEEN)
    baseline, candidate = shadow["baseline"], shadow["candidate"]
    # The local matcher is judged by its verified answers, on the same photos, each without
    # itself; it has no embedding whose head a grid could tune.
    local = baseline["verification"]["rerank"]
    assert baseline["heads"]["model"]["map5"] == local["map5"] >= 0.8
    assert baseline["heads"]["best"] == baseline["heads"]["model"]
    assert "none" not in baseline["verification"]
    # The trained model is scored with verification off and on: on, it is much better here.
    both = candidate["verification"]
    assert both["rerank"]["queries"] == both["none"]["queries"] == shadow["evaluated"]
    assert both["rerank"]["map5"] >= both["none"]["map5"] + 0.2
    assert candidate["heads"]["model"]["map5"] == both["rerank"]["map5"]


@pytest.mark.slow
def test_pruning_a_query_photo_removes_its_features_and_keeps_the_gallerys(
    settings: Settings, reranking: Model
) -> None:
    import datetime as dt

    from service.store.retention import prune_query_photos

    factory = _sessions(settings)
    identifier = Runtime(settings, factory).current()
    answer = identifier.identify(encode(textured_photo(4, 9)), filters=Filters())
    with factory() as session:
        count = session.scalar(select(func.count()).select_from(Feature))
    assert count == len(KNOWN) * len(SHOTS) + 1
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    assert prune_query_photos(settings, factory, 90, now=later).photos == 1
    with factory() as session:
        left = set(session.scalars(select(Feature.image_id)))
        gallery = set(session.scalars(select(Image.id).where(Image.individual_id.is_not(None))))
    assert answer.query_image_id not in left and left == gallery


def test_without_unseen_queries_the_threshold_stays_where_it_was() -> None:
    pairs = [Pair(None, 12, True, q) for q in range(30)]
    pairs += [Pair(None, n, False, q) for q in range(30) for n in (1, 3)]
    fitted = fit_calibration(pairs, Calibration.default(0.62), source="t")
    assert fitted.threshold == 0.5 and not fitted.fitted["threshold_chosen_on_map5"]


@pytest.mark.slow
def test_the_local_matcher_answers_the_same_from_an_ivf_index(
    settings: Settings, local_matcher: Model
) -> None:
    """Past the threshold the descriptors move to IVF (8-bit): still the right animals, and a
    photo that leaves the gallery leaves the index."""
    settings.local_ivf_threshold = 1000
    factory = _sessions(settings)
    identifier = Runtime(settings, factory).current()
    assert identifier.local is not None and not identifier.local.descriptors.exact
    known, unseen = _map5(identifier)
    assert known >= 0.9 and unseen >= 0.75, (known, unseen)
    before = identifier.local.descriptors.count
    gone = next(iter(sorted(identifier.local.descriptors.images)))
    identifier.local.descriptors.remove({gone})
    assert identifier.local.descriptors.count < before
    assert gone not in identifier.local.descriptors.images


@pytest.mark.slow
def test_non_finite_numbers_in_a_body_are_a_422_not_a_500(
    settings: Settings, reranking: Model
) -> None:
    """Python's JSON reader takes Infinity and NaN; the 422 that echoes them must still be JSON."""
    for server in run_server(settings):
        with server.client("admin") as admin:
            for body in ('{"verification": Infinity}', '{"verification": NaN}'):
                r = admin.put(
                    f"/models/{reranking.id}/verification",
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                assert r.status_code == 422, r.text
                assert r.json()["detail"][0]["input"] in ("inf", "nan")
            r = admin.post(
                "/individuals",
                content='{"code": -Infinity}',
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            assert r.status_code == 422, r.text
