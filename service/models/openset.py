"""The open-set decision fitted on the gallery being served (issue 26, item 1): where
``new_individual`` goes in an answer, chosen with no labelled query.

Every catalogue is labelled already: its gallery. A seeded sample of gallery photos,
stratified by individual (at most ``per_individual`` photos of each, at most ``max_queries`` in
all), is asked twice through the model's own answering path (the kNN head, or the fusion when
the model verifies), nothing recorded:

- as a *known* query, against the gallery without the photo's encounter (a photo without an
  encounter: without itself). A photo whose individual has no other photo there is no known
  query;
- as an *unseen* query, against the gallery without its whole individual: its right answer is
  ``new_individual``.

The order of the candidates does not depend on the decision, only where ``new_individual``
goes: so each query is answered once, and placed at every value of the grid
(``knn.place_new_individual`` for the head's cutoff, ``verify.rerank`` for the fusion's
threshold). The value kept maximises the expected MAP@5 (``knn.map_at_5``)::

    (1 - p_new) * MAP@5(known) + p_new * MAP@5(unseen)

where ``p_new`` is the share of new animals the catalogue expects (``expected_new_share``: the
curators' decisions once there are ``MIN_DECISIONS``, else ``settings.open_set_p_new``: a
fifth, as in the query sets issue 26 measured, where about a fifth of the query animals were
absent from the gallery). Ties go to the value nearest the model's own (the trainer's cutoff,
or the calibration's threshold): that is the starting point, no more. The fit needs at least
``MIN_ANIMALS`` known and as many unseen *animals* (not photos): fewer, and one animal's photos
would decide it.

A verifying model (a fusion) is fitted in two steps (issue 26, item 2: WildFusion's calibration
on pairs): first its calibration, each matcher's evidence to a match probability and their
combination (``verify.fit_calibration``), on the candidate pairs the same queries produce
(``gallery_pairs``: every candidate each query's fusion scored, right where it is the query
photo's individual: unseen queries give only wrong ones); then the threshold as above, on the
queries rescored with it. ``aggregation`` says how an individual's photos count
(``contract.AGGREGATIONS``); ``auto`` fits each and keeps the one of the best expected MAP@5
(ties: ``max``, today's). The calibration is stored with source ``gallery`` and its figures.
An unasked fit (activation, re-index) leaves a calibration fitted on labelled queries or
confirmations as it is (only its threshold is fitted); ``whaleid models calibrate ID`` refits it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.contract import AGGREGATIONS, Calibration
from service.db.tables import Decision, Model, transaction
from service.errors import Invalid, NotFound, TooFewAnimals, TooFewPairs
from service.gallery.sync import Filters, load_vectors
from service.knn import (
    CUTOFF_GRID,
    MIN_ANIMALS,
    NEW,
    NEW_INDIVIDUAL,
    head_order,
    map_at_5,
    place_new_individual,
)
from service.matching.identify import Identifier
from service.matching.matcher import Need, Query
from service.matching.verify import (
    THRESHOLDS,
    Evidence,
    Pair,
    fit_calibration,
    fused_probability,
    rerank,
)
from service.settings import Settings

log = logging.getLogger(__name__)

# The curators' decisions (confirm or new individual) from which their share of new animals
# replaces the default.
MIN_DECISIONS = 30

AUTO = "auto"  # the aggregation of the best expected MAP@5 on the gallery
GALLERY = "gallery"  # the source of a calibration fitted on the gallery's pairs

HEAD = "cutoff"  # the kNN head alone: its cutoff is fitted
FUSION = "threshold"  # a verifying model: the fusion's new_individual threshold is fitted


@dataclass(frozen=True)
class Asked:
    """One sampled gallery photo asked as a known or an unseen query: its truth (its
    individual, or ``new_individual``), its animal, and its answer at any decision value."""

    image_id: int
    animal: str
    unseen: bool
    answer_at: Callable[[float], list[str]]
    # A fusion's: every candidate it scored (the calibration's pairs).
    scored: tuple[Evidence, ...] = ()

    @property
    def truth(self) -> str:
        return NEW_INDIVIDUAL if self.unseen else self.animal


@dataclass(frozen=True)
class OpenSetFit:
    """The fitted decision and its figures (``figures`` is what is stored and shown)."""

    mode: str  # HEAD or FUSION
    value: float  # the cutoff, or the threshold
    start: float  # the model's value before
    p_new: float
    expected_map5: float
    map5_known: float
    map5_unseen: float
    known_new_first: float  # share of known queries answered new_individual first
    known_photos: int
    known_animals: int
    unseen_photos: int
    unseen_animals: int
    p_new_source: str = "given"
    seed: int = 0
    grid: tuple[tuple[float, float], ...] = ()  # (value, expected MAP@5)
    # A fusion's calibration fitted on the gallery's pairs (None: the model's own kept).
    calibration: Calibration | None = None

    @property
    def figures(self) -> dict[str, Any]:
        more: dict[str, Any] = {}
        if self.calibration is not None:
            c = self.calibration
            more["calibration"] = {
                "source": c.fitted.get("source"),
                "pairs": c.fitted.get("pairs"),
                "matches": c.fitted.get("matches"),
                "aggregation": c.aggregation,
                "tried": c.fitted.get("tried"),
            }
        return {
            **more,
            "mode": self.mode,
            "value": self.value,
            "start": self.start,
            "p_new": self.p_new,
            "p_new_source": self.p_new_source,
            "expected_map5": round(self.expected_map5, 6),
            "map5_known": round(self.map5_known, 6),
            "map5_unseen": round(self.map5_unseen, 6),
            "known_new_first": round(self.known_new_first, 6),
            "queries": {
                "known_photos": self.known_photos,
                "known_animals": self.known_animals,
                "unseen_photos": self.unseen_photos,
                "unseen_animals": self.unseen_animals,
            },
            "seed": self.seed,
        }


def check_animals(known: int, unseen: int, *, what: str) -> None:
    """``TooFewAnimals`` unless there are ``MIN_ANIMALS`` known and unseen animals."""
    if known < MIN_ANIMALS or unseen < MIN_ANIMALS:
        raise TooFewAnimals(
            f"{what} hold {known} known and {unseen} unseen animals: choosing where "
            f"new_individual goes needs at least {MIN_ANIMALS} of each (animals, not photos); "
            "add photos of more individuals to the gallery, or keep the model's own value"
        )


def fit_decision(
    asked: Sequence[Asked],
    values: Sequence[float],
    *,
    p_new: float,
    start: float,
    mode: str,
) -> OpenSetFit:
    """The value of ``values`` that maximises the expected MAP@5 of ``asked`` (ties: the one
    nearest ``start``), with its figures. Needs ``MIN_ANIMALS`` known and unseen animals."""
    if not 0.0 <= p_new <= 1.0:
        raise ValueError(f"the share of new animals is in [0, 1], not {p_new}")
    known = [a for a in asked if not a.unseen]
    unseen = [a for a in asked if a.unseen]
    known_animals = len({a.animal for a in known})
    unseen_animals = len({a.animal for a in unseen})
    check_animals(known_animals, unseen_animals, what="the gallery's sampled queries")
    scored = []
    for value in values:
        k_answers = [a.answer_at(value) for a in known]
        u_answers = [a.answer_at(value) for a in unseen]
        k_map = map_at_5(k_answers, [a.truth for a in known])
        u_map = map_at_5(u_answers, [a.truth for a in unseen])
        new_first = sum(1 for x in k_answers if x and x[0] == NEW_INDIVIDUAL) / len(known)
        expected = (1.0 - p_new) * k_map + p_new * u_map
        scored.append((float(value), expected, k_map, u_map, new_first))
    best = max(scored, key=lambda s: (round(s[1], 9), -abs(s[0] - start)))
    return OpenSetFit(
        mode=mode,
        value=best[0],
        start=start,
        p_new=p_new,
        expected_map5=best[1],
        map5_known=best[2],
        map5_unseen=best[3],
        known_new_first=best[4],
        known_photos=len(known),
        known_animals=known_animals,
        unseen_photos=len(unseen),
        unseen_animals=unseen_animals,
        grid=tuple((s[0], s[1]) for s in scored),
    )


def sample_gallery(
    labels: Sequence[str], *, seed: int, max_queries: int, per_individual: int
) -> list[int]:
    """Positions of the sampled photos among ``labels`` (one per gallery photo): at most
    ``per_individual`` of each individual, chosen at random; then, while over ``max_queries``,
    individuals in a seeded order give their first, then their second... (stratified)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    names = sorted(by_label)
    chosen = {
        name: [int(i) for i in rng.permutation(by_label[name])[:per_individual]] for name in names
    }
    turn = [names[int(i)] for i in rng.permutation(len(names))]
    out: list[int] = []
    for depth in range(per_individual):
        for name in turn:
            if depth < len(chosen[name]) and len(out) < max_queries:
                out.append(chosen[name][depth])
    return sorted(out)


def mode_of(identifier: Identifier) -> str:
    """What the fit chooses for this model: the head's cutoff, or the fusion's threshold."""
    return FUSION if identifier.model.fusion.calibrated else HEAD


def ask_gallery(
    identifier: Identifier,
    *,
    seed: int = 0,
    max_queries: int | None = None,
    per_individual: int | None = None,
) -> list[Asked]:
    """The sampled gallery photos, each asked as a known and as an unseen query through the
    model's own answering path (``Identifier``'s gallery search, then its fusion)."""
    gallery, model = identifier.gallery, identifier.model
    entries = gallery.entries
    words = entries.vocab["labels"].words
    labels = [str(words[c]) for c in entries.codes["labels"]]
    encounter_words = entries.vocab["encounters"].words
    picked = sample_gallery(
        labels,
        seed=seed,
        max_queries=max_queries or identifier.settings.open_set_queries,
        per_individual=per_individual or identifier.settings.open_set_per_individual,
    )
    with identifier.factory() as session:
        vectors = load_vectors(session, [int(entries.ids[p]) for p in picked], gallery.dim)
    fusion = model.fusion
    features = None
    if Need.LOCAL_FEATURES in fusion.needs:
        features = identifier.features.get([int(entries.image_ids[p]) for p in picked])
    asked: list[Asked] = []
    for row, p in enumerate(picked):
        image_id, animal = int(entries.image_ids[p]), labels[p]
        if features is not None and image_id not in features:
            log.warning("open-set fit: photo %s has no local features; not asked", image_id)
            continue
        encounter = encounter_words[entries.codes["encounters"][p]]
        known = (
            Filters(exclude_encounter=str(encounter))
            if encounter is not None
            else Filters(exclude_image=image_id)
        )
        unseen = Filters(exclude_individual=animal)
        for filters, is_unseen in ((known, False), (unseen, True)):
            vector = vectors[row]
            neighbours, _ = gallery.search(vector, model.head.k, filters)
            if not is_unseen and animal not in {
                *(n.label for n in neighbours),
                *gallery.nearest_of(vector, [animal], filters),
            }:
                continue  # no other photo of its individual: not a known query
            beyond = gallery.search_beyond(vector, filters, neighbours)
            if fusion.calibrated:
                query = Query(
                    vector,
                    None if features is None else features[image_id],
                    neighbours,
                    beyond,
                    filters,
                    model.head,
                    model.scoring,
                )
                scored = tuple(fusion.answer(query, identifier).scored)
                asked.append(
                    Asked(
                        image_id, animal, is_unseen, _fusion_answers(scored, model.scoring), scored
                    )
                )
            else:
                at = _head_answers(
                    head_order(neighbours, ranking=model.head.ranking, beyond=beyond)
                )
                asked.append(Asked(image_id, animal, is_unseen, at))
    return asked


def gallery_pairs(asked: Sequence[Asked]) -> list[Pair]:
    """The calibration's pairs of a fusion's gallery queries: every candidate each query
    scored (not the unscored ones named to fill an answer), right where it is the query photo's
    individual (an unseen query's candidates are all wrong)."""
    pairs = []
    for i, a in enumerate(asked):
        for c in a.scored:
            if not c.photos and c.distance is None:
                continue
            right = not a.unseen and c.label == a.animal
            pairs.append(Pair(c.distance, c.inliers, right, i, a.unseen, a.animal, c.photo_inliers))
    return pairs


def rescored(asked: Sequence[Asked], calibration: Calibration) -> list[Asked]:
    """A fusion's gallery queries answered with ``calibration`` (their candidates as they
    were: the shortlist and the evidence do not depend on it)."""
    out = []
    for a in asked:
        scored = tuple(
            replace(c, score=fused_probability(calibration, c))
            if c.photos or c.distance is not None
            else c
            for c in a.scored
        )
        out.append(replace(a, answer_at=_fusion_answers(scored, calibration), scored=scored))
    return out


def _head_answers(ordered: Sequence[Any]) -> Callable[[float], list[str]]:
    def answer(cutoff: float) -> list[str]:
        placed = place_new_individual(ordered, lambda c: c.distance, cutoff, NEW)
        return [c.label for c in placed]

    return answer


def _fusion_answers(
    scored: Sequence[Evidence], calibration: Calibration
) -> Callable[[float], list[str]]:
    new = Evidence(NEW_INDIVIDUAL, None, ())

    def answer(threshold: float) -> list[str]:
        placed = rerank(scored, replace(calibration, threshold=threshold), new)
        return [c.label for c in placed]

    return answer


# The parameters each aggregation's curves fit (the fused logistic: distance, inliers and a
# bias; the mix: distance, best, second best, photos with inliers and a bias), and the right
# pairs the gallery must give for each of them: ten events a parameter, the logistic
# regression's rule of thumb.
PARAMETERS = {"max": 3, "best-two": 3, "mix": 5}
RIGHT_PER_PARAMETER = 10


def fit_fusion(
    asked: Sequence[Asked],
    base: Calibration,
    *,
    p_new: float,
    aggregation: str = AUTO,
) -> OpenSetFit:
    """A fusion's calibration fitted on the pairs of ``asked`` (``gallery_pairs``), then its
    threshold (``fit_decision``) on the queries rescored with it; ``base``: the model's
    calibration (its curves where the pairs cannot fit one, its threshold the starting point).
    ``aggregation``: one of ``contract.AGGREGATIONS``, or ``auto``: each, the best expected
    MAP@5 kept (ties: the first, ``max``). Without enough pairs (``TooFewPairs``) the model's
    calibration stays and only the threshold is fitted."""
    if aggregation != AUTO and aggregation not in AGGREGATIONS:
        raise Invalid(f"aggregation {aggregation!r}: {AUTO} or {', '.join(AGGREGATIONS)}")
    start = base.threshold
    values = sorted({*THRESHOLDS, start})
    pairs = gallery_pairs(asked)
    right = sum(p.match for p in pairs)
    # Each aggregation's curves are fitted on these pairs and judged on the same queries, so a
    # flexible one wins on a small gallery by fitting its noise: only those with
    # RIGHT_PER_PARAMETER right pairs for each of their parameters are tried.
    names = [
        name
        for name in (AGGREGATIONS if aggregation == AUTO else (aggregation,))
        if right >= RIGHT_PER_PARAMETER * PARAMETERS[name]
    ]
    if not names:
        log.info(
            "open-set fit: the calibration stays (%d right pairs on the gallery: fitting %s needs "
            "%d for each of its parameters)",
            right,
            aggregation,
            RIGHT_PER_PARAMETER,
        )
        return fit_decision(asked, values, p_new=p_new, start=start, mode=FUSION)
    tried: dict[str, OpenSetFit] = {}
    for name in names:
        try:
            calibration = fit_calibration(pairs, base, source=GALLERY, aggregation=name)
        except TooFewPairs as e:
            log.info("open-set fit: the calibration stays (%s)", e)
            return fit_decision(asked, values, p_new=p_new, start=start, mode=FUSION)
        fit = fit_decision(
            rescored(asked, calibration), values, p_new=p_new, start=start, mode=FUSION
        )
        tried[name] = replace(fit, calibration=calibration)
    # Strictly better to leave max (today's): a tie keeps the earlier.
    best = max(tried.values(), key=lambda f: round(f.expected_map5, 9))
    assert best.calibration is not None
    figures = {
        **best.calibration.fitted,
        "threshold_chosen_on_map5": False,
        "threshold": "fitted on the gallery's queries (models.open_set)",
        "expected_map5": round(best.expected_map5, 6),
        "tried": {name: round(f.expected_map5, 6) for name, f in tried.items()},
    }
    calibration = replace(best.calibration, threshold=best.value, fitted=figures)
    return replace(best, calibration=calibration)


def fit_on_gallery(
    identifier: Identifier,
    *,
    p_new: float,
    p_new_source: str = "given",
    seed: int = 0,
    max_queries: int | None = None,
    per_individual: int | None = None,
    calibrate: bool = True,
    aggregation: str = AUTO,
) -> OpenSetFit:
    """The open-set decision of ``identifier``'s model fitted on its own gallery (see the
    module's text), at most ``max_queries`` sampled photos, ``per_individual`` of one individual
    (default: the settings ``open_set_queries``, ``open_set_per_individual``). A fusion's
    calibration is fitted first (``fit_fusion``) unless not ``calibrate``. Nothing is stored
    here."""
    asked = ask_gallery(
        identifier, seed=seed, max_queries=max_queries, per_individual=per_individual
    )
    model = identifier.model
    if mode_of(identifier) == FUSION and calibrate:
        base = replace(Calibration.default(model.head.cutoff), threshold=model.scoring.threshold)
        check_animals(
            len({a.animal for a in asked if not a.unseen}),
            len({a.animal for a in asked if a.unseen}),
            what="the gallery's sampled queries",
        )
        fit = fit_fusion(asked, base, p_new=p_new, aggregation=aggregation)
        start, mode = fit.start, FUSION
    elif mode_of(identifier) == FUSION:
        start, values = model.scoring.threshold, sorted({*THRESHOLDS, model.scoring.threshold})
        mode = FUSION
        fit = fit_decision(asked, values, p_new=p_new, start=start, mode=mode)
    else:
        start, values = model.head.cutoff, sorted({*CUTOFF_GRID, round(model.head.cutoff, 4)})
        mode = HEAD
        fit = fit_decision(asked, values, p_new=p_new, start=start, mode=mode)
    fit = replace(fit, p_new_source=p_new_source, seed=seed)
    log.info(
        "open-set fit of model %s on its gallery: %s %.4f (was %.4f), expected MAP@5 %.4f at "
        "p_new %.2f, %d known queries (%d animals), %d unseen (%d animals), %.0f %% of known "
        "answered new_individual first",
        model.id,
        mode,
        fit.value,
        start,
        fit.expected_map5,
        p_new,
        fit.known_photos,
        fit.known_animals,
        fit.unseen_photos,
        fit.unseen_animals,
        100 * fit.known_new_first,
    )
    return fit


def expected_new_share(
    session: Session, default: float, given: float | None = None
) -> tuple[float, str]:
    """The share of new animals to expect, and where it comes from: ``given`` (the command
    line's ``--p-new``) if any; else the curators' current decisions (new individual against
    confirm) once there are ``MIN_DECISIONS``; else ``default`` (``WHALEID_OPEN_SET_P_NEW``)."""
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise Invalid(f"the share of new animals is in [0, 1], not {given}")
        return given, "given"
    rows = dict(
        session.execute(
            select(Decision.decision, func.count())
            .where(
                Decision.superseded_by_id.is_(None),
                Decision.decision.in_(["confirm", "new_individual"]),
            )
            .group_by(Decision.decision)
        ).all()
    )
    new, confirmed = int(rows.get("new_individual", 0)), int(rows.get("confirm", 0))
    if new + confirmed >= MIN_DECISIONS:
        return new / (new + confirmed), f"curators' decisions ({new} new of {new + confirmed})"
    return default, f"default (fewer than {MIN_DECISIONS} decisions: {new + confirmed})"


def store_open_set(
    factory: sessionmaker[Session], model_id: int, fit: OpenSetFit, *, trigger: str
) -> dict[str, Any]:
    """Keep ``fit`` with the model: its value where the model's decision lives (the head's
    ``cutoff``, or the calibration's ``threshold``: every replica answers with it from its next
    request), its figures in ``models.open_set`` with when and why (``trigger``) it ran."""
    figures = {
        **fit.figures,
        "trigger": trigger,
        "fitted_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    with transaction(factory) as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
        if fit.mode == HEAD:
            model.cutoff = fit.value
        elif fit.calibration is not None:
            model.calibration = replace(fit.calibration, threshold=fit.value).as_dict()
        else:
            calibration = Calibration.from_dict(model.calibration, float(model.cutoff))
            model.calibration = replace(calibration, threshold=fit.value).as_dict()
        model.open_set = figures
    return figures


def fit_model(
    settings: Settings,
    factory: sessionmaker[Session],
    model_id: int,
    *,
    trigger: str,
    p_new: float | None = None,
    identifier: Identifier | None = None,
    aggregation: str = AUTO,
) -> dict[str, Any]:
    """Fit the open-set decision of ``model_id`` on its gallery and keep it (``store_open_set``);
    returns what was stored. ``p_new``: the share of new animals to expect (default:
    ``expected_new_share``). A fusion's calibration is fitted too, except, unasked (any
    ``trigger`` but ``calibrate``), where labelled queries or confirmations fitted it."""
    with factory() as session:
        model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
        share, source = expected_new_share(session, settings.open_set_p_new, p_new)
        fitted_on = ((model.calibration or {}).get("fitted") or {}).get("source")
        session.expunge(model)
    calibrate = trigger == "calibrate" or fitted_on in (None, GALLERY)
    if identifier is None:
        identifier = Identifier.load(settings, factory, model)
    fit = fit_on_gallery(
        identifier,
        p_new=share,
        p_new_source=source,
        calibrate=calibrate,
        aggregation=aggregation,
    )
    return store_open_set(factory, model_id, fit, trigger=trigger)


def refit(
    settings: Settings,
    factory: sessionmaker[Session],
    model_id: int,
    *,
    trigger: str,
    identifier: Identifier | None = None,
) -> dict[str, Any]:
    """``fit_model`` where it runs unasked (activation, the end of a re-index): the figures
    stored, or, where the gallery holds too few animals, ``{"skipped": why}`` (``{"failed":
    why}`` where the fit failed, logged) and the model keeps its own value (nothing is
    stored)."""
    try:
        return fit_model(settings, factory, model_id, trigger=trigger, identifier=identifier)
    except TooFewAnimals as e:
        log.info("model %s keeps its own open-set decision (%s): %s", model_id, trigger, e)
        return {"skipped": str(e), "trigger": trigger}
    except Exception as e:
        # The switch or the re-index it follows is done and stays done: the model keeps its
        # own value, and the failure is logged (whaleid models calibrate ID tries again).
        log.exception(
            "model %s: the open-set fit (%s) failed; its own value stays", model_id, trigger
        )
        return {"failed": f"{type(e).__name__}: {e}", "trigger": trigger}
