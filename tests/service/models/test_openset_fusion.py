"""A verifying model's calibration fitted on its gallery's pairs (issue 26, item 2): ``whaleid
models calibrate ID`` with no CSV fits the fusion's calibration, then its threshold, stores it
with source ``gallery``, and the answers move the expected way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.contract import Calibration
from service.db.tables import Model, transaction
from service.knn import NEW_INDIVIDUAL
from service.matching.identify import Identifier
from service.settings import Settings
from tests.service.matching.test_local_features import (
    KNOWN,
    QUERY_SHOTS,
    UNSEEN,
    _map5,
    _sessions,
    _textured_catalogue,
)
from tests.toy import encode, textured_photo

# Every candidate far below an even chance, whatever its evidence: new_individual first.
TIMID = Calibration(global_=(-12.0, 0.0), local=(-12.0, 0.1), fused=(-12.0, 0.0, 0.1))


def _known_new_first(identifier: Identifier) -> float:
    from service.gallery.sync import Filters

    firsts = []
    for ind in KNOWN:
        for shot in QUERY_SHOTS:
            answer = identifier.identify(
                encode(textured_photo(ind, shot)), filters=Filters(), record=False
            )
            firsts.append(answer.candidates[0].individual_id == NEW_INDIVIDUAL)
    return float(np.mean(firsts))


@pytest.mark.slow
def test_calibrate_fits_a_verifying_models_calibration_on_its_gallery(
    settings: Settings,
    tmp_path: Path,
    toy_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.models.registry import register_model
    from service.models.switch import activate_model

    factory = _sessions(settings)
    registered = register_model(settings, factory, toy_model)
    with transaction(factory) as session:
        session.get_one(Model, registered.id).verification = "rerank"
    activate_model(settings, factory, registered.id)
    with factory() as session:
        model = session.get_one(Model, registered.id)
    _textured_catalogue(settings, tmp_path / "catalogue", model)
    with transaction(factory) as session:
        # A calibration curators fitted, timid: every answer new_individual first.
        stored = TIMID.as_dict()
        stored["fitted"] = {"source": "curators' confirmations"}
        session.get_one(Model, registered.id).calibration = stored
    with factory() as session:
        model = session.get_one(Model, registered.id)
        session.expunge(model)
    before = Identifier.load(settings, factory, model)
    known_before, unseen_before = _map5(before)
    assert _known_new_first(before) == 1.0 and unseen_before == 1.0

    # Unasked (as at activation or re-index), a calibration fitted on confirmations stays:
    # only the threshold is fitted.
    from service.models.openset import refit

    refit(settings, factory, registered.id, trigger="activate")
    with factory() as session:
        kept = session.get_one(Model, registered.id).calibration
    assert kept is not None and kept["fitted"] == {"source": "curators' confirmations"}
    assert kept["local"] == list(TIMID.local)

    monkeypatch.setenv("WHALEID_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", settings.sqlalchemy_url)
    assert main(["models", "calibrate", str(registered.id), "--aggregation", "max"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "threshold" and printed["trigger"] == "calibrate"
    shown = printed["calibration"]
    assert shown["source"] == "gallery" and shown["aggregation"] == "max"
    assert shown["pairs"] > shown["matches"] >= 10
    assert list(shown["tried"]) == ["max"]
    with factory() as session:
        row = session.get_one(Model, registered.id)
        fitted = Calibration.from_dict(row.calibration, float(row.cutoff))
        assert row.open_set == printed
        session.expunge(row)
    assert fitted.fitted["source"] == "gallery" and fitted.threshold == printed["value"]
    assert fitted.fitted["pairs"] == shown["pairs"]
    # Inliers are evidence of the right animal now; more of them, more likely.
    assert fitted.fused_weights[2] > 0 and fitted.local[1] > 0
    after = Identifier.load(settings, factory, row)
    known_after, unseen_after = _map5(after)
    assert known_after > known_before + 0.2
    assert _known_new_first(after) < 0.5
    assert unseen_after >= 0.5 * unseen_before  # unseen animals still mostly answered new
    assert len(UNSEEN) == 4


def test_aggregation_is_for_the_gallery_fit_only(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WHALEID_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", settings.sqlalchemy_url)
    assert main(["models", "calibrate", "1", "--confirmations", "--aggregation", "mix"]) == 2
    assert "for the fit on the gallery" in caplog.text
