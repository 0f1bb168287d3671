"""A model's calibration of verification evidence (``contract.Calibration``): fitted on labelled
queries or on the curators' confirmations, stored with the model, and its verification setting.

Each labelled candidate is one ``verify.Pair``: its embedding distance and inliers, and whether
it was the right animal. On a labelled CSV, every query is identified with verification (nothing
recorded) and each of its named candidates is a pair. On confirmations, the recorded candidates
of identifications answered with verification are the pairs, the decision their truth.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from tqdm import tqdm

from service.catalogue.csv_file import read_catalogue
from service.contract import Calibration, Verification
from service.db.tables import Decision, Identification, Individual, Model, transaction
from service.errors import Invalid, NotFound, PhotoError, TooFewPairs
from service.gallery.sync import Filters
from service.knn import NEW_INDIVIDUAL
from service.matching.identify import Identifier
from service.matching.registry import check_verification
from service.matching.verify import Pair, fit_calibration

log = logging.getLogger(__name__)


def set_verification(factory: sessionmaker[Session], model_id: int, mode: str) -> Model:
    """Set a model's verification (a name of ``matching.registry``'s modes: ``none``,
    ``rerank``); every replica answers with it at its next request. The local-features matcher
    always verifies."""
    check_verification(None, mode)  # a mode that exists, before the model is looked up
    with transaction(factory) as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
        model.verification = check_verification(model.kind, mode)
        return model


def pairs_from_queries(identifier: Identifier, queries_csv: Path, images_dir: Path) -> list[Pair]:
    """Identify each labelled query with verification (nothing recorded) and label every
    verified candidate: right if it is the query's individual."""
    identifier.model = identifier.model.verifying(Verification.RERANK)
    pairs: list[Pair] = []
    known = identifier.gallery.entries.labels
    rows = list(read_catalogue(queries_csv, new_individual_allowed=True))
    for row in tqdm(rows, desc="calibrate", unit="photo"):
        if isinstance(row, tuple):
            log.warning("line %d: %s", *row)
            continue
        try:
            answer = identifier.identify(
                (images_dir / row.image).read_bytes(), filters=Filters(), record=False
            )
        except (OSError, PhotoError) as e:
            log.warning("line %d: image %r: %s", row.line, row.image, e)
            continue
        unseen = row.individual_id not in known
        # A row labelled new_individual names no animal: it counts as one of its own.
        animal = None if row.individual_id == NEW_INDIVIDUAL else row.individual_id
        # Every verified candidate, not only the five answered: which candidates are verified
        # does not depend on the calibration, so the fit sees them as they will be scored.
        for c in answer.verified:
            right = c.label == row.individual_id
            pairs.append(
                Pair(c.distance, c.inliers, right, row.line, unseen, animal, c.photo_inliers)
            )
    return pairs


def pairs_from_confirmations(session: Session, model_id: int) -> list[Pair]:
    """The recorded candidates (with inliers) of ``model_id``'s identifications that a curator
    confirmed or called new, each labelled by the decision."""
    rows = session.execute(
        select(Identification, Decision.decision, Individual.catalogue_id)
        .join(Decision, Decision.identification_id == Identification.id)
        .outerjoin(Individual, Individual.id == Decision.individual_id)
        .where(
            Identification.model_id == model_id,
            Decision.superseded_by_id.is_(None),
            Decision.decision.in_(["confirm", "new_individual"]),
        )
        .options(selectinload(Identification.candidates))
    )
    pairs = []
    for ident, decision, truth in rows:
        for c in ident.candidates:
            if c.label == NEW_INDIVIDUAL or c.inliers is None:
                continue
            right = decision == "confirm" and c.label == truth
            unseen = decision == "new_individual"
            # The animal: the individual confirmed, or the one the new_individual decision made.
            pairs.append(Pair(c.distance, c.inliers, right, ident.id, unseen, truth))
    return pairs


def store_calibration(
    factory: sessionmaker[Session], model_id: int, pairs: list[Pair], *, source: str
) -> Calibration:
    """Fit the calibration on ``pairs`` and keep it with the model (every replica scores with
    it at its next request)."""
    with factory() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
        # The threshold stays where it is (fitted on the gallery, say) unless these pairs hold
        # enough animals to choose it.
        threshold = Calibration.from_dict(model.calibration, float(model.cutoff)).threshold
        base = replace(Calibration.default(float(model.cutoff)), threshold=threshold)
    try:
        fitted = fit_calibration(pairs, base, source=source)
    except TooFewPairs as e:
        raise Invalid(str(e)) from e
    with transaction(factory) as session:
        model = session.get_one(Model, model_id)
        model.calibration = fitted.as_dict()
        if (
            model.open_set
            and model.open_set.get("mode") == "threshold"
            and fitted.fitted.get("threshold_chosen_on_map5")
        ):
            # The threshold fitted on the gallery no longer answers: say what replaced it.
            model.open_set = {**model.open_set, "superseded_by": source}
    log.info(
        "model %s calibrated on %d candidates (%d right) from %s",
        model_id,
        fitted.fitted.get("pairs"),
        fitted.fitted.get("matches"),
        source,
    )
    return fitted
