"""Each per-individual aggregation of the fusion (``contract.AGGREGATIONS``), fitted on the
gallery's pairs, measured on one labelled query set in one pass (issue 26, item 2).

A fusion's shortlist and evidence do not depend on its calibration: so the gallery's own
queries (``models.openset.ask_gallery``) and the labelled queries are each answered once, and
every calibration (today's stored one, each aggregation fitted on the gallery with its
threshold) re-ranks the same evidence. The figures are those ``whaleid evaluate`` gives with
that calibration stored (MAP@5 overall, known, unseen; top-1 and top-5 of known queries; known
queries answered ``new_individual`` first), beside the expected MAP@5 the gallery fit predicted.

Run it on a data directory that ``bench/quality.py`` prepared (a ``fused-fitted`` mode's: the
model verifying, its gallery imported)::

    WHALEID_DATA_DIR=/work/scratch/q/orl_faces/fused-fitted/data PYTHONPATH=$PWD \\
        .venv/bin/python bench/fusion_aggregations.py --model 1 \\
        --queries /work/scratch/q/orl_faces/fused-fitted/queries.csv \\
        --images /work/scratch/q/orl_faces_png --out /work/scratch/fusion-agg-orl.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.catalogue.csv_file import read_catalogue  # noqa: E402
from service.cli.common import sessions_of  # noqa: E402
from service.contract import AGGREGATIONS, Calibration  # noqa: E402
from service.db.tables import Model  # noqa: E402
from service.gallery.sync import Filters  # noqa: E402
from service.knn import NEW_INDIVIDUAL, average_precision_at_5  # noqa: E402
from service.matching.identify import Identifier  # noqa: E402
from service.matching.verify import Evidence, fused_probability, rerank  # noqa: E402
from service.models.openset import ask_gallery, fit_fusion, fit_on_gallery  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.fusion_aggregations")


def answer(scored: list[Evidence], calibration: Calibration) -> list[str]:
    rescored = [
        replace(c, score=fused_probability(calibration, c))
        if c.photos or c.distance is not None
        else c
        for c in scored
    ]
    return [c.label for c in rerank(rescored, calibration, Evidence(NEW_INDIVIDUAL, None, ()))]


def figures(answers: list[tuple[list[str], str, bool]]) -> dict[str, float]:
    known = [(a, t) for a, t, u in answers if not u]
    unseen = [(a, t) for a, t, u in answers if u]
    ap = [average_precision_at_5(a, t) for a, t, _ in answers]
    return {
        "map5": sum(ap) / len(ap),
        "map5_known": sum(average_precision_at_5(a, t) for a, t in known) / max(len(known), 1),
        "map5_unseen": sum(average_precision_at_5(a, t) for a, t in unseen) / max(len(unseen), 1),
        "top1_known": sum(1 for a, t in known if t in a[:1]) / max(len(known), 1),
        "top5_known": sum(1 for a, t in known if t in a[:5]) / max(len(known), 1),
        "known_new_first": sum(1 for a, _ in known if a and a[0] == NEW_INDIVIDUAL)
        / max(len(known), 1),
        "known": len(known),
        "unseen": len(unseen),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=int, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--p-new", type=float, default=0.2)
    parser.add_argument(
        "--species-filter",
        action="store_true",
        help="each query against its species' photos only (as `whaleid evaluate` does)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings()
    factory = sessions_of(settings)
    with factory() as session:
        model = session.get_one(Model, args.model)
        session.expunge(model)
    identifier = Identifier.load(settings, factory, model)
    assert identifier.model.fusion.calibrated, "the model must verify (models verify --mode)"
    asked = ask_gallery(identifier)
    base = replace(
        Calibration.default(identifier.model.head.cutoff),
        threshold=identifier.model.scoring.threshold,
    )
    calibrations = {"stored": identifier.model.scoring}
    expected: dict[str, float] = {}
    for name in AGGREGATIONS:
        fit = fit_fusion(asked, base, p_new=args.p_new, aggregation=name)
        assert fit.calibration is not None
        calibrations[name] = fit.calibration
        expected[name] = fit.expected_map5
    log.info("gallery fit: expected MAP@5 %s", expected)
    known_labels = identifier.gallery.entries.labels
    # The embedding's part: the kNN head alone, at the model's cutoff and fitted on the gallery.
    head = Identifier.load(settings, factory, model)
    head.model = head.model.verifying("none")
    head_fitted = Identifier.load(settings, factory, model)
    head_fitted.model = head.model
    cutoff = fit_on_gallery(head, p_new=args.p_new).value
    head_fitted.model = replace(head.model, head=replace(head.model.head, cutoff=cutoff))
    heads: dict[str, list[tuple[list[str], str, bool]]] = {"head": [], "head-fitted": []}
    scored: list[tuple[list[Evidence], str, bool]] = []
    for row in read_catalogue(args.queries, new_individual_allowed=True):
        if isinstance(row, tuple):
            continue
        data = (args.images / row.image).read_bytes()
        filters = Filters(species=row.species or None) if args.species_filter else Filters()
        found = identifier.identify(data, filters=filters, record=False)
        unseen = row.individual_id == NEW_INDIVIDUAL or row.individual_id not in known_labels
        truth = NEW_INDIVIDUAL if unseen else row.individual_id
        scored.append((found.verified, truth, unseen))
        for name, which in (("head", head), ("head-fitted", head_fitted)):
            alone = which.identify(data, filters=filters, record=False)
            heads[name].append(([c.individual_id for c in alone.candidates], truth, unseen))
    out: dict[str, dict[str, object]] = {
        "head": {**figures(heads["head"]), "cutoff": head.model.head.cutoff},
        "head-fitted": {**figures(heads["head-fitted"]), "cutoff": cutoff},
    }
    for name, calibration in calibrations.items():
        answers = [(answer(s, calibration), t, u) for s, t, u in scored]
        out[name] = {
            **figures(answers),
            "expected_map5": expected.get(name),
            "threshold": calibration.threshold,
            "aggregation": calibration.aggregation,
        }
        log.info("%s: %s", name, out[name])
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
