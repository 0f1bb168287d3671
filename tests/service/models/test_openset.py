"""The open-set decision fitted on the gallery (``models.openset``): the fit is the expected
MAP@5's best value, recomputed by brute force; the sample is bounded and stratified; a real
gallery (toy ONNX model, faiss) gets a cutoff that answers known photos right and unseen ones
``new_individual``; too few animals is a clear error."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.contract import Calibration, Ranking
from service.errors import TooFewAnimals
from service.gallery.sync import Filters, GalleryEntries
from service.knn import (
    CUTOFF_GRID,
    NEW_INDIVIDUAL,
    Neighbour,
    head_order,
    map_at_5,
    rank_candidates,
)
from service.matching.identify import Identifier
from service.matching.verify import THRESHOLDS, Pair, fit_calibration
from service.models.openset import (
    HEAD,
    Asked,
    _head_answers,
    fit_decision,
    fit_on_gallery,
    sample_gallery,
)
from service.settings import Settings
from tests.conftest import load_catalogue


def _synthetic(seed: int) -> tuple[list[Asked], list[list[Neighbour]], list[str]]:
    rng = np.random.default_rng(seed)
    asked, neighbours, truths = [], [], []
    for q in range(80):
        animal = f"ind-{q % 16}"
        unseen = q % 3 == 0
        labels = rng.integers(0, 16, size=30)
        distances = np.sort(rng.uniform(0.05, 0.95, size=30))
        found = [
            Neighbour(f"ind-{a}", float(d), i)
            for i, (a, d) in enumerate(zip(labels, distances, strict=True))
            if not (unseen and f"ind-{a}" == animal)
        ]
        k = 10
        ordered = head_order(found[:k], ranking=Ranking.VOTE, beyond=found[k:])
        asked.append(Asked(q, animal, unseen, _head_answers(ordered)))
        neighbours.append(found)
        truths.append(NEW_INDIVIDUAL if unseen else animal)
    return asked, neighbours, truths


def test_the_fit_is_the_best_expected_map5_recomputed_by_brute_force() -> None:
    asked, neighbours, truths = _synthetic(4)
    cutoffs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.62, 0.8]
    fit = fit_decision(asked, cutoffs, p_new=0.3, start=0.62, mode=HEAD)
    known = [i for i, t in enumerate(truths) if t != NEW_INDIVIDUAL]
    unseen = [i for i, t in enumerate(truths) if t == NEW_INDIVIDUAL]
    brute = {}
    for cutoff in cutoffs:
        answers = [
            [c.label for c in rank_candidates(n[:10], cutoff=cutoff, beyond=n[10:])]
            for n in neighbours
        ]
        k_map = map_at_5([answers[i] for i in known], [truths[i] for i in known])
        u_map = map_at_5([answers[i] for i in unseen], [truths[i] for i in unseen])
        brute[cutoff] = 0.7 * k_map + 0.3 * u_map
        if cutoff == fit.value:
            new_first = sum(answers[i][0] == NEW_INDIVIDUAL for i in known) / len(known)
            assert fit.known_new_first == pytest.approx(new_first)
            assert fit.map5_known == pytest.approx(k_map)
            assert fit.map5_unseen == pytest.approx(u_map)
    assert dict(fit.grid) == pytest.approx(brute)
    assert fit.expected_map5 == pytest.approx(max(brute.values()))
    assert len({round(v, 6) for v in brute.values()}) > 3  # the cutoffs differ: it can fail
    assert (fit.known_photos, fit.unseen_photos) == (len(known), len(unseen))
    assert (fit.known_animals, fit.unseen_animals) == (16, len({q % 16 for q in range(0, 80, 3)}))
    # p_new moves the choice: with no new animals expected, new_individual is never worth it.
    never_new = fit_decision(asked, cutoffs, p_new=0.0, start=0.62, mode=HEAD)
    always_new = fit_decision(asked, cutoffs, p_new=1.0, start=0.62, mode=HEAD)
    assert never_new.value >= fit.value >= always_new.value
    assert always_new.map5_unseen >= fit.map5_unseen and never_new.map5_known >= fit.map5_known
    assert always_new.value < never_new.value


def test_animals_not_photos_are_counted() -> None:
    answer = _head_answers([])
    known = [Asked(i, f"ind-{i}", False, answer) for i in range(10)]
    one_unseen = [Asked(100 + i, "ind-x", True, answer) for i in range(6)]
    with pytest.raises(TooFewAnimals) as e:
        fit_decision(known + one_unseen, [0.5], p_new=0.2, start=0.5, mode=HEAD)
    message = str(e.value)
    assert "10 known and 1 unseen animals" in message and "at least 5 of each" in message
    assert "add photos of more individuals" in message
    five = [Asked(200 + i, f"new-{i}", True, answer) for i in range(5)]
    fit = fit_decision(known + five, [0.5], p_new=0.2, start=0.5, mode=HEAD)
    assert fit.unseen_animals == 5 and fit.expected_map5 == pytest.approx(0.2)


def test_the_sample_is_bounded_seeded_and_stratified() -> None:
    labels = [f"ind-{i}" for i in range(50) for _ in range(i % 7 + 1)]  # 1 to 7 photos each
    picked = sample_gallery(labels, seed=3, max_queries=60, per_individual=2)
    assert len(picked) == 60 == len(set(picked))
    per = Counter(labels[p] for p in picked)
    assert len(per) == 50 and max(per.values()) <= 2  # every individual first, then seconds
    assert picked == sample_gallery(labels, seed=3, max_queries=60, per_individual=2)
    assert picked != sample_gallery(labels, seed=4, max_queries=60, per_individual=2)
    small = sample_gallery(labels, seed=3, max_queries=400, per_individual=3)
    assert len(small) == sum(min(3, i % 7 + 1) for i in range(50))


def test_a_gallery_photo_asked_without_its_individual() -> None:
    day = dt.date(2024, 5, 1)
    entries = GalleryEntries.from_rows(
        [
            (1, 10, "a", "s", None, day, "e1"),
            (2, 11, "a", "s", None, day, None),
            (3, 12, "b", "s", None, day, "e1"),
        ]
    )
    assert list(entries.select(Filters(exclude_individual="a"))) == [3]
    assert list(entries.select(Filters(exclude_encounter="e1"))) == [2]
    assert list(entries.select(Filters(exclude_image=11))) == [1, 3]


def test_a_well_separated_gallery_answers_known_right_and_unseen_new(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=12, shots=(0, 1, 2))
    with cat.sessions() as session:
        from service.db.tables import Model

        model = session.get_one(Model, cat.model_id)
    identifier = Identifier.load(settings, cat.sessions, model)
    fit = fit_on_gallery(identifier, p_new=0.2, max_queries=20, per_individual=2)
    assert fit.mode == HEAD and fit.value in CUTOFF_GRID
    assert fit.known_photos == fit.unseen_photos == 20
    assert fit.known_animals == fit.unseen_animals == 12
    assert fit.map5_known == pytest.approx(1.0) and fit.map5_unseen == pytest.approx(1.0)
    assert fit.known_new_first == 0.0 and fit.expected_map5 == pytest.approx(1.0)
    # Brute force, through the head as /identify answers: each sampled photo against the
    # gallery without itself (no encounters here) and without its individual.
    gallery = identifier.gallery
    entries = gallery.entries
    words = entries.vocab["labels"].words
    labels = [str(words[c]) for c in entries.codes["labels"]]
    picked = sample_gallery(labels, seed=0, max_queries=20, per_individual=2)
    stored, vectors = gallery.index.contents()
    by_id = dict(zip(stored.tolist(), vectors, strict=True))
    answers, truths = [], []
    for p in picked:
        image_id = int(entries.image_ids[p])
        for filters, truth in (
            (Filters(exclude_image=image_id), labels[p]),
            (Filters(exclude_individual=labels[p]), NEW_INDIVIDUAL),
        ):
            vector = by_id[int(entries.ids[p])]
            neighbours, _ = gallery.search(vector, model.k, filters)
            beyond = gallery.search_beyond(vector, filters, neighbours)
            ranked = rank_candidates(neighbours, cutoff=fit.value, beyond=beyond)
            answers.append([c.label for c in ranked])
            truths.append(truth)
    assert map_at_5(answers, truths) == pytest.approx(1.0)
    # The model's own cutoff is the starting point: a value that puts new first everywhere is
    # not chosen.
    assert dict(fit.grid)[0.02] < fit.expected_map5


def test_too_small_a_gallery_names_the_count(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=4, shots=(0, 1))
    with cat.sessions() as session:
        from service.db.tables import Model

        model = session.get_one(Model, cat.model_id)
    identifier = Identifier.load(settings, cat.sessions, model)
    with pytest.raises(TooFewAnimals, match="4 known and 4 unseen animals"):
        fit_on_gallery(identifier, p_new=0.2)


def test_the_calibration_threshold_also_needs_five_unseen_animals() -> None:
    """``models calibrate`` chooses its threshold on the same rule (issue 26, item 6): one
    unseen animal photographed six times is one animal, and 0.5 stays."""
    rng = np.random.default_rng(1)
    known = []
    for q in range(40):
        known.append(Pair(None, int(rng.integers(4, 16)), True, q, animal=f"ind-{q % 10}"))
        known += [Pair(None, int(rng.integers(0, 8)), False, q, animal=f"ind-{q % 10}")] * 3

    def unseen(animals: int) -> list[Pair]:
        return [
            Pair(None, int(rng.integers(0, 8)), False, q, unseen=True, animal=f"new-{q % animals}")
            for q in range(40, 52)
            for _ in range(4)
        ]

    one = fit_calibration(known + unseen(1), Calibration.default(0.62), source="t")
    assert not one.fitted["threshold_chosen_on_map5"] and one.threshold == 0.5
    assert (one.fitted["known_animals"], one.fitted["unseen_animals"]) == (10, 1)
    five = fit_calibration(known + unseen(5), Calibration.default(0.62), source="t")
    assert five.fitted["threshold_chosen_on_map5"] and five.fitted["unseen_animals"] == 5


@pytest.mark.slow
def test_a_verifying_model_fits_its_threshold_through_the_fusion(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    """The fusion's answers, placed at the fitted threshold, are those ``/identify`` gives each
    sampled photo asked without itself and without its individual (local features included)."""
    from sqlalchemy import select

    from service.db.tables import Image, Model, transaction
    from service.models.openset import FUSION
    from service.models.registry import register_model
    from service.models.switch import activate_model
    from service.store.photos import PhotoStore
    from tests.service.matching.test_local_features import _sessions, _textured_catalogue

    factory = _sessions(settings)
    registered = register_model(settings, factory, toy_model)
    with transaction(factory) as session:
        session.get_one(Model, registered.id).verification = "rerank"
    activate_model(settings, factory, registered.id)
    with factory() as session:
        model = session.get_one(Model, registered.id)
    _textured_catalogue(settings, tmp_path / "catalogue", model)
    identifier = Identifier.load(settings, factory, model)
    # Every gallery photo (10 animals x 3): enough right pairs to fit the fusion's curves.
    fit = fit_on_gallery(identifier, p_new=0.2, max_queries=30, per_individual=3)
    assert fit.mode == FUSION and fit.value in THRESHOLDS
    assert (fit.known_animals, fit.unseen_animals) == (10, 10)
    assert fit.known_photos == fit.unseen_photos == 30

    # The fusion's calibration was fitted on the same queries' pairs first (issue 26, item 2).
    assert fit.calibration is not None and fit.calibration.fitted["source"] == "gallery"
    assert fit.calibration.threshold == fit.value
    identifier.model = replace(identifier.model, calibration=fit.calibration)
    entries = identifier.gallery.entries
    words = entries.vocab["labels"].words
    labels = [str(words[c]) for c in entries.codes["labels"]]
    picked = sample_gallery(labels, seed=0, max_queries=30, per_individual=3)
    image_ids = [int(entries.image_ids[p]) for p in picked]
    with factory() as session:
        found = session.execute(select(Image.id, Image.file_path).where(Image.id.in_(image_ids)))
        paths = {int(i): str(f) for i, f in found}
    photos = PhotoStore.open(settings)
    known, unseen = [], []
    for p, image_id in zip(picked, image_ids, strict=True):
        data = photos.read(paths[image_id])
        for filters, out, truth in (
            (Filters(exclude_image=image_id), known, labels[p]),
            (Filters(exclude_individual=labels[p]), unseen, NEW_INDIVIDUAL),
        ):
            answer = identifier.identify(data, filters=filters, record=False)
            out.append(([c.individual_id for c in answer.candidates], truth))
    k_map = map_at_5([a for a, _ in known], [t for _, t in known])
    u_map = map_at_5([a for a, _ in unseen], [t for _, t in unseen])
    assert fit.map5_known == pytest.approx(k_map)
    assert fit.map5_unseen == pytest.approx(u_map)
    assert fit.expected_map5 == pytest.approx(0.8 * k_map + 0.2 * u_map)
    # The starting point (the calibration's 0.5) is no better than the choice.
    assert fit.expected_map5 >= dict(fit.grid)[0.5]

    # A dozen photos give fewer right pairs than ten for each of a curve's three parameters: the
    # calibration stays, and only the threshold is fitted.
    few = fit_on_gallery(identifier, p_new=0.2, max_queries=12, per_individual=2)
    assert few.mode == FUSION and few.calibration is None


def test_the_share_of_new_animals_comes_from_enough_decisions(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    from service.db.tables import Decision, Identification, Image, transaction
    from service.errors import Invalid
    from service.models.openset import MIN_DECISIONS, expected_new_share

    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=2, shots=(0,))

    def decide(decisions: list[str]) -> None:
        with transaction(cat.sessions) as session:
            image_id = session.query(Image.id).limit(1).scalar()
            for decision in decisions:
                ident = Identification(
                    query_image_id=image_id,
                    model_id=cat.model_id,
                    filters={},
                    k=5,
                    cutoff=0.6,
                    ranking="vote",
                    gallery_size=2,
                )
                session.add(ident)
                session.flush()
                session.add(Decision(identification_id=ident.id, decision=decision, curator="c"))

    decide(["new_individual"] * 5 + ["confirm"] * 10 + ["reject"] * 20)
    with cat.sessions() as session:
        share, source = expected_new_share(session, 0.2)
        assert share == 0.2 and source == "default (fewer than 30 decisions: 15)"
        assert expected_new_share(session, 0.2, 0.5) == (0.5, "given")
        with pytest.raises(Invalid, match=r"in \[0, 1\]"):
            expected_new_share(session, 0.2, 1.5)
    decide(["new_individual"] * 5 + ["confirm"] * (MIN_DECISIONS - 20))
    with cat.sessions() as session:
        share, source = expected_new_share(session, 0.2)
    assert share == pytest.approx(10 / 30) and source == "curators' decisions (10 new of 30)"


def _env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHALEID_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", settings.sqlalchemy_url)


@pytest.mark.slow
def test_calibrate_without_a_csv_fits_on_the_gallery_and_get_model_shows_it(
    settings: Settings,
    tmp_path: Path,
    toy_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json

    from service.cli import main
    from service.db.tables import Model
    from tests.conftest import run_server

    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=12, shots=(0, 1, 2))
    with cat.sessions() as session:
        session.get_one(Model, cat.model_id).cutoff = 0.02  # new first for everything
        session.commit()
    _env(settings, monkeypatch)
    assert main(["models", "calibrate", str(cat.model_id), "--p-new", "0.3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "cutoff" and printed["start"] == 0.02
    assert printed["p_new"] == 0.3 and printed["p_new_source"] == "given"
    assert printed["trigger"] == "calibrate" and printed["expected_map5"] == 1.0
    assert printed["queries"] == {
        "known_photos": 36,
        "known_animals": 12,
        "unseen_photos": 36,
        "unseen_animals": 12,
    }
    with cat.sessions() as session:
        model = session.get_one(Model, cat.model_id)
        assert model.cutoff == printed["value"] > 0.02 and model.open_set == printed
        assert model.calibration is None  # the head alone: nothing else changed
    assert main(["models", "calibrate", str(cat.model_id)]) == 0  # the default share
    again = json.loads(capsys.readouterr().out)
    assert again["p_new"] == 0.2 and again["p_new_source"].startswith("default")
    assert main(["models", "calibrate", str(cat.model_id), "--p-new", "2"]) == 2
    assert "in [0, 1]" in caplog.text
    assert main(["models", "calibrate", "999"]) == 2

    server = run_server(settings)
    live = next(server)
    try:
        with live.client("admin") as admin, live.client() as integration:
            shown = admin.get(f"/models/{cat.model_id}")
            assert shown.status_code == 200
            assert shown.json()["open_set"] == again and shown.json()["cutoff"] == again["value"]
            assert admin.get("/models/999").status_code == 404
            assert integration.get(f"/models/{cat.model_id}").status_code == 403
    finally:
        next(server, None)


@pytest.mark.slow
def test_reindex_and_activation_fit_on_the_gallery_and_the_shadow_uses_it(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    from service.contract import PAPER_HEAD
    from service.db.tables import Job, Model
    from service.models.reindex import Embedders
    from service.models.switch import HeadChoice, activate
    from tests.service.models.test_switch import ready_model
    from tests.toy import build_toy_model

    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=12, shots=(0, 1, 2))
    with cat.sessions() as session:
        # Activated before its gallery was imported: nothing to fit on then.
        assert session.get_one(Model, cat.model_id).open_set is None
    new_id = ready_model(cat, build_toy_model(tmp_path / "v2.onnx", seed=7))
    with cat.sessions() as session:
        model = session.get_one(Model, new_id)
        job = session.query(Job).order_by(Job.id.desc()).first()
        assert job is not None and job.result is not None
        fitted = job.result["open_set"]
        assert model.open_set == fitted and fitted["trigger"] == "reindex"
        assert model.cutoff == fitted["value"] and fitted["expected_map5"] == 1.0
        shadow_model_head = job.result["shadow"]["candidate"]["heads"]["model"]
        assert shadow_model_head["cutoff"] == round(fitted["value"], 4)
        model.cutoff = 0.02  # new_individual first for all: activation fits it again
        session.commit()
    switch = activate(settings, cat.sessions, Embedders(settings, cat.sessions), new_id, force=True)
    with cat.sessions() as session:
        model = session.get_one(Model, new_id)
        assert model.open_set is not None and model.open_set["trigger"] == "activate"
        assert model.cutoff == model.open_set["value"] == switch.head.cutoff > 0.02
        assert model.open_set["start"] == 0.02 and model.open_set["expected_map5"] == 1.0
    # A head chosen on the confirmations keeps its cutoff: the paper's here.
    switch = activate(
        settings,
        cat.sessions,
        Embedders(settings, cat.sessions),
        cat.model_id,
        head=HeadChoice.PAPER,
        force=True,
    )
    with cat.sessions() as session:
        assert session.get_one(Model, cat.model_id).cutoff == PAPER_HEAD.cutoff
        assert session.get_one(Model, cat.model_id).open_set is None
    # The re-indexed model back with the paper's head: its fitted cutoff is said to be replaced.
    activate(
        settings,
        cat.sessions,
        Embedders(settings, cat.sessions),
        new_id,
        head=HeadChoice.PAPER,
        force=True,
    )
    with cat.sessions() as session:
        model = session.get_one(Model, new_id)
        assert model.cutoff == PAPER_HEAD.cutoff and model.open_set is not None
        assert model.open_set["superseded_by"] == "head paper"


def test_a_calibration_keeps_the_fitted_threshold_unless_it_chooses_one(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    from service.db.tables import Model
    from service.models.calibration import store_calibration

    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=2, shots=(0,))
    fitted_on_gallery = {"mode": "threshold", "value": 0.35}
    with cat.sessions() as session:
        model = session.get_one(Model, cat.model_id)
        model.calibration = replace(Calibration.default(0.62), threshold=0.35).as_dict()
        model.open_set = fitted_on_gallery
        session.commit()
    known_only = [Pair(None, 12, True, q, animal=f"a{q}") for q in range(30)]
    known_only += [Pair(None, n, False, q, animal=f"a{q}") for q in range(30) for n in (1, 3)]
    kept = store_calibration(cat.sessions, cat.model_id, known_only, source="few")
    assert kept.threshold == 0.35 and not kept.fitted["threshold_chosen_on_map5"]
    with cat.sessions() as session:
        assert session.get_one(Model, cat.model_id).open_set == fitted_on_gallery
    unseen = [Pair(None, n, False, q, True, f"new{q}") for q in range(30, 40) for n in (2, 4)]
    chosen = store_calibration(cat.sessions, cat.model_id, known_only + unseen, source="csv")
    assert chosen.fitted["threshold_chosen_on_map5"]
    with cat.sessions() as session:
        model = session.get_one(Model, cat.model_id)
        assert model.open_set == {**fitted_on_gallery, "superseded_by": "csv"}
        assert model.calibration is not None
        assert model.calibration["threshold"] == chosen.threshold


def test_a_known_query_is_asked_without_its_whole_encounter(
    settings: Settings, tmp_path: Path, toy_model: Path
) -> None:
    """Individuals 0-5 were met twice (shots 0 and 1 together, shot 2 later); 6 and 7 once. A
    photo asked without its encounter is a known query only where its individual was met
    again: 18 photos of 6 animals, not 24 (as without the photo alone)."""
    import csv

    from service.catalogue.imports import CatalogueImport
    from service.db.tables import Model, make_engine, make_sessionmaker
    from service.models.registry import register_model
    from service.models.switch import activate_model
    from service.onnx.embedder import Embedder
    from tests.toy import write_catalogue

    factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
    model = register_model(settings, factory, toy_model)
    activate_model(settings, factory, model.id)
    folder = tmp_path / "cat"
    path = write_catalogue(folder, range(8), (0, 1, 2))
    rows = list(csv.DictReader(path.open()))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "encounter"])
        writer.writeheader()
        for row in rows:
            ind, shot = row["image"].removesuffix(".png").split("_")
            again = int(ind[3:]) < 6 and shot == "shot2"
            writer.writerow({**row, "encounter": f"{ind}-{'b' if again else 'a'}"})
    embedder = Embedder.for_model(settings, model.file_path)
    report = CatalogueImport(settings, factory, embedder, model.id).run(path, folder / "images")
    assert not report.errors and report.imported == 24
    with factory() as session:
        row = session.get_one(Model, model.id)
    fit = fit_on_gallery(Identifier.load(settings, factory, row), p_new=0.2)
    assert (fit.known_photos, fit.known_animals) == (18, 6)
    assert (fit.unseen_photos, fit.unseen_animals) == (24, 8)
    assert fit.map5_known == pytest.approx(1.0) and fit.map5_unseen == pytest.approx(1.0)


def test_an_unasked_fit_that_fails_leaves_the_model_as_it_was(
    settings: Settings, tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.db.tables import Model
    from service.models import openset

    cat = load_catalogue(settings, tmp_path / "cat", toy_model, individuals=6, shots=(0, 1))
    with cat.sessions() as session:
        cutoff = session.get_one(Model, cat.model_id).cutoff

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(openset, "fit_on_gallery", broken)
    out = openset.refit(settings, cat.sessions, cat.model_id, trigger="activate")
    assert out == {"failed": "RuntimeError: disk gone", "trigger": "activate"}
    with cat.sessions() as session:
        model = session.get_one(Model, cat.model_id)
        assert model.cutoff == cutoff and model.open_set is None
    monkeypatch.undo()
    fitted = openset.refit(settings, cat.sessions, cat.model_id, trigger="activate")
    assert fitted["trigger"] == "activate" and fitted["queries"]["known_animals"] == 6
