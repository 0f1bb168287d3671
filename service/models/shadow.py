"""Shadow evaluation: the active and a new model scored on the curators' confirmed
identifications, before the new one may answer.

Each confirmed query photo is searched against its model's gallery without its own photo. A
``confirm`` decision's truth is the photo's individual now (merges followed); a
``new_individual`` decision counts as unseen (the right answer is ``new_individual``). Both models
are scored on the same queries, with the model's own head, the paper's head (k 50, cutoff 0.62,
vote) and the best head of the k x cutoff x ranking grid (``service.knn``), because a cutoff
calibrated on one catalogue does not transfer to another.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.contract import PAPER_HEAD, RANKINGS, Head, ModelStatus, Verification
from service.db.tables import Decision, Identification, Image, Model
from service.errors import PhotoError
from service.gallery.sync import Filters, gallery_rows, load_vectors
from service.knn import (
    CUTOFF_GRID,
    K_GRID,
    NEW_INDIVIDUAL,
    TOP,
    Neighbour,
    average_precision_at_5,
    best_cell,
    fill,
    rank_candidates,
    ranks_at_cutoffs,
)
from service.matching.identify import Identifier
from service.matching.registry import kind_of, verifies
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)


def confirmed_queries(session: Session) -> dict[int, str]:
    """Query image id -> the decision it stands under (``confirm`` or ``new_individual``), for
    identifications whose current decision is one of those."""
    rows = session.execute(
        select(Identification.query_image_id, Decision.decision)
        .join(Decision, Decision.identification_id == Identification.id)
        .where(
            Decision.superseded_by_id.is_(None),
            Decision.decision.in_(["confirm", "new_individual"]),
        )
        .order_by(Decision.id)
    )
    return {int(image_id): str(decision) for image_id, decision in rows}


@dataclass
class ModelSearch:
    """Each query's neighbours in one model's gallery (its own photo left out)."""

    truths: dict[int, str]
    neighbours: dict[int, list[Neighbour]]


def search_model(
    session: Session, model: Model, queries: dict[int, str], depth: int
) -> ModelSearch:
    rows = gallery_rows(session, model.id)
    if not rows:
        return ModelSearch({}, {})
    ids = [r[0] for r in rows]
    vectors = load_vectors(session, ids, model.embedding_dim)
    image_ids = np.array([r[1] for r in rows], dtype=np.int64)
    labels = [str(r[2]) for r in rows]
    position = {int(image_id): i for i, image_id in enumerate(image_ids)}
    asked = [i for i in queries if i in position]
    truths = {
        i: NEW_INDIVIDUAL if queries[i] == "new_individual" else labels[position[i]] for i in asked
    }
    if not asked:
        return ModelSearch({}, {})
    index = faiss.IndexFlatIP(model.embedding_dim)
    index.add(vectors)
    k = min(depth + 1, len(rows))
    sims, found = index.search(vectors[[position[i] for i in asked]], k)
    neighbours = {}
    for query, row_sims, row_found in zip(asked, sims, found, strict=True):
        neighbours[query] = [
            Neighbour(labels[j], float(1.0 - s), int(image_ids[j]))
            for s, j in zip(row_sims, row_found, strict=True)
            if j >= 0 and int(image_ids[j]) != query
        ][:depth]
    return ModelSearch(truths, neighbours)


def grid(
    neighbours: Sequence[Sequence[Neighbour]],
    truths: Sequence[str],
    k_grid: Sequence[int],
    cutoff_grid: Sequence[float],
) -> list[dict[str, Any]]:
    """MAP@5 (overall, known, unseen) of every (ranking, k, cutoff), ranked as ``/identify``
    ranks (``neighbours`` hold more than the largest k, for the top-up). For one ranking and k the
    order of the candidates does not depend on the cutoff, which only places
    ``new_individual``, so each query is ranked once per (ranking, k)."""
    cuts = np.asarray(cutoff_grid, dtype=np.float64)
    unseen = np.array([t == NEW_INDIVIDUAL for t in truths], dtype=bool)
    cells = []
    for ranking, k in itertools.product(RANKINGS, k_grid):
        ap = np.zeros((len(truths), len(cuts)))
        for q, (found, truth) in enumerate(zip(neighbours, truths, strict=True)):
            ordered = [
                c
                for c in rank_candidates(found[:k], cutoff=3.0, ranking=ranking, top=1 << 30)
                if not c.is_new
            ]
            # As /identify does: too few individuals among the k are topped up from beyond.
            ordered += fill(found[k:], {c.label for c in ordered}, TOP - 1 - len(ordered))
            dists = np.array([c.distance for c in ordered], dtype=np.float64)
            if truth == NEW_INDIVIDUAL:
                rank = ranks_at_cutoffs(dists, None, cuts)
            else:
                p = next((i for i, c in enumerate(ordered) if c.label == truth), None)
                if p is None:
                    continue
                rank = ranks_at_cutoffs(dists, p, cuts)
            ap[q] = np.where(rank <= 5, 1.0 / rank, 0.0)
        for j, cutoff in enumerate(cuts):
            column = ap[:, j]
            cells.append(
                {
                    "ranking": ranking,
                    "k": int(k),
                    "cutoff": round(float(cutoff), 4),
                    "map5": float(column.mean()) if len(column) else 0.0,
                    "map5_known": float(column[~unseen].mean()) if (~unseen).any() else None,
                    "map5_unseen": float(column[unseen].mean()) if unseen.any() else None,
                }
            )
    return cells


def _cell(cells: list[dict[str, Any]], k: int, cutoff: float, ranking: str) -> dict[str, Any]:
    return next(
        c
        for c in cells
        if c["k"] == k and c["ranking"] == ranking and abs(c["cutoff"] - cutoff) < 1e-9
    )


def verified_scores(
    settings: Settings, factory: sessionmaker[Session], model: Model, truths: dict[int, str]
) -> dict[str, Any]:
    """MAP@5 of ``model`` through ``/identify``'s own path (each photo asked without itself,
    nothing recorded), with verification off (where its kind allows) and with its own, on at
    most ``shadow_verify_queries`` of the confirmed photos."""
    asked = sorted(truths)[: settings.shadow_verify_queries]
    identifier = Identifier.load(settings, factory, model)
    photos = PhotoStore.open(settings)
    with factory() as session:
        found = session.execute(
            select(Image.id, Image.file_path).where(Image.id.in_(asked), Image.pruned_at.is_(None))
        )
        paths = {int(i): str(p) for i, p in found}
    allowed = kind_of(model.kind).verifications
    modes = [str(model.verification)]
    if allowed is None or Verification.NONE in allowed:
        modes.insert(0, Verification.NONE)
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(modes):
        identifier.model = replace(identifier.model, verification=mode)
        known: list[float] = []
        unseen: list[float] = []
        for image_id in asked:
            if image_id not in paths:
                continue
            try:
                answer = identifier.identify(
                    photos.read(paths[image_id]),
                    filters=Filters(exclude_image=image_id),
                    record=False,
                )
            except (OSError, PhotoError) as e:
                log.warning("shadow: photo %s cannot be asked: %s", image_id, e)
                continue
            labels = [c.individual_id for c in answer.candidates]
            truth = truths[image_id]
            ap = average_precision_at_5(labels, truth)
            (unseen if truth == NEW_INDIVIDUAL else known).append(ap)
        both = known + unseen
        out[str(mode)] = {
            "queries": len(both),
            "map5": float(np.mean(both)) if both else 0.0,
            "map5_known": float(np.mean(known)) if known else None,
            "map5_unseen": float(np.mean(unseen)) if unseen else None,
        }
    return out


def score_model(
    model: Model,
    search: ModelSearch,
    queries: Sequence[int],
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """MAP@5 of ``model`` on ``queries`` with its own head, the paper's and the best. With
    ``verified`` (``verified_scores``), a model that verifies is judged by its verified answers:
    its own head's figures are those (the head grid scores the embedding alone), and the local
    matcher, which has no embedding to grid, has no other head."""
    k_grid = sorted({*K_GRID, model.k, PAPER_HEAD.k})
    cutoff_grid = sorted({*CUTOFF_GRID, round(model.cutoff, 4), PAPER_HEAD.cutoff})
    cells = grid(
        [search.neighbours[q] for q in queries],
        [search.truths[q] for q in queries],
        k_grid,
        cutoff_grid,
    )
    heads: dict[str, Any] = {
        "model": _cell(cells, model.k, round(model.cutoff, 4), model.ranking),
        "paper": _cell(cells, PAPER_HEAD.k, PAPER_HEAD.cutoff, PAPER_HEAD.ranking),
        "best": best_cell(cells) if queries else None,
    }
    scored: dict[str, Any] = {"model_id": model.id, "name": model.name, "version": model.version}
    if verified is not None:
        scored["verification"] = verified
        if verifies(model):
            mode = str(model.verification)
            own = {**heads["model"], **verified[mode], "verification": mode}
            heads["model"] = own
            if not kind_of(model.kind).grid:
                heads["paper"] = heads["best"] = own
    scored["heads"] = heads
    return scored


@dataclass(frozen=True)
class ShadowReport:
    """The stored report, with the questions the activation gate asks of it."""

    data: dict[str, Any]

    @property
    def baseline_model_id(self) -> int | None:
        value = self.data.get("baseline_model_id")
        return int(value) if value is not None else None

    @property
    def evaluated(self) -> int:
        return int(self.data["evaluated"])

    @property
    def min_confirmations(self) -> int:
        return int(self.data["min_confirmations"])

    @property
    def sufficient(self) -> bool:
        return bool(self.data["sufficient"])

    def baseline_map5(self) -> float:
        return float(self.data["baseline"]["heads"]["model"]["map5"])

    def candidate_map5(self, head: str) -> float:
        return float(self.data["candidate"]["heads"][str(head)]["map5"])

    def best_head(self) -> Head | None:
        best = self.data["candidate"]["heads"]["best"]
        return None if best is None else Head.from_dict(best)


def _verified(
    settings: Settings,
    factory: sessionmaker[Session],
    model: Model,
    search: ModelSearch,
    common: Sequence[int],
) -> dict[str, Any] | None:
    """``verified_scores`` for a model that verifies (an ONNX model set to ``rerank`` is scored
    both ways, so the report says whether verification helps on this catalogue); none for a
    model that does not, without confirmations, or when switched off (``shadow_verify_queries``
    0). A model set to ``none`` is not scored with verification: that would extract the
    features of the whole gallery."""
    if not common or settings.shadow_verify_queries == 0 or not verifies(model):
        return None
    return verified_scores(settings, factory, model, {q: search.truths[q] for q in common})


def evaluate_shadow(
    settings: Settings, factory: sessionmaker[Session], candidate_id: int
) -> ShadowReport:
    """Score the model active now and ``candidate_id`` on the same confirmed queries."""
    with factory() as session:
        candidate = session.get_one(Model, candidate_id)
        baseline = session.scalar(select(Model).where(Model.status == ModelStatus.ACTIVE))
        queries = confirmed_queries(session)
        depth = max(*K_GRID, candidate.k, baseline.k if baseline else 0, PAPER_HEAD.k) + 2 * TOP
        searches = {candidate.id: search_model(session, candidate, queries, depth)}
        if baseline is not None and baseline.id != candidate.id:
            searches[baseline.id] = search_model(session, baseline, queries, depth)
    common = sorted(set.intersection(*(set(s.truths) for s in searches.values())))
    report: dict[str, Any] = {
        "candidate_model_id": candidate.id,
        "baseline_model_id": baseline.id if baseline else None,
        "confirmations": len(queries),
        "evaluated": len(common),
        "known": sum(1 for q in common if queries[q] == "confirm"),
        "unseen": sum(1 for q in common if queries[q] == "new_individual"),
        "min_confirmations": settings.shadow_min_confirmations,
        "sufficient": len(common) >= settings.shadow_min_confirmations,
        "candidate": score_model(
            candidate,
            searches[candidate.id],
            common,
            _verified(settings, factory, candidate, searches[candidate.id], common),
        ),
        "baseline": (
            score_model(
                baseline,
                searches[baseline.id],
                common,
                _verified(settings, factory, baseline, searches[baseline.id], common),
            )
            if baseline is not None
            else None
        ),
        "computed_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    log.info(
        "shadow evaluation of model %s against %s on %d confirmations: %.4f vs %s",
        candidate.id,
        report["baseline_model_id"],
        len(common),
        report["candidate"]["heads"]["model"]["map5"],
        report["baseline"]["heads"]["model"]["map5"] if report["baseline"] else None,
    )
    return ShadowReport(report)
