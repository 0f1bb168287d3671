"""Choose k, the cutoff and the ranking of a model for a catalogue: the grid search of §3.8-3.9
on labelled queries against a gallery (the catalogue, or half of each individual's photos)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from service.contract import Ranking
from service.knn import CUTOFF_GRID, K_GRID, NEW_INDIVIDUAL
from training.data import read_entries
from training.evaluate import embed_photos, grid_search, nearest
from training.robustness import open_model, split_by_photo

log = logging.getLogger(__name__)


def run_calibration(
    model_path: Path,
    catalogue_csv: Path,
    images: Path,
    *,
    queries_csv: Path | None = None,
    rankings: tuple[Ranking, ...] = tuple(Ranking),
    out: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Log the model's own head and the best cell of the grid; optionally write the grid."""
    embed, spec, head = open_model(model_path)
    entries = read_entries(catalogue_csv)
    if queries_csv is None:
        gallery, queries = split_by_photo(entries, seed)
    else:
        gallery, queries = entries, read_entries(queries_csv)
    known = {e.individual_id for e in gallery}
    truths = [e.individual_id if e.individual_id in known else NEW_INDIVIDUAL for e in queries]
    vectors = embed_photos(embed, [(images / e.image).read_bytes() for e in gallery], spec)
    queried = embed_photos(embed, [(images / e.image).read_bytes() for e in queries], spec)
    neighbours = nearest(queried, vectors, [e.individual_id for e in gallery], max(K_GRID))
    grid = grid_search(
        neighbours,
        truths,
        k_grid=sorted({*K_GRID, head.k}),
        cutoff_grid=sorted({*CUTOFF_GRID, head.cutoff}),
        rankings=tuple(dict.fromkeys((head.ranking, *rankings))),
    )
    own = next(
        c
        for c in grid.cells
        if (c["k"], c["cutoff"], c["ranking"]) == (head.k, head.cutoff, head.ranking)
    )
    best = grid.best
    for name, cell in (("model's head", own), ("best", best)):
        log.info(
            "%-12s k=%d cutoff=%.2f %-7s MAP@5 %.4f (known %s, unseen %s; %d queries)",
            name,
            cell["k"],
            cell["cutoff"],
            cell["ranking"],
            cell["map5"],
            "-" if cell["map5_known"] is None else f"{cell['map5_known']:.4f}",
            "-" if cell["map5_unseen"] is None else f"{cell['map5_unseen']:.4f}",
            cell["queries"],
        )
    report = {"model": str(model_path), "models_head": own, **grid.as_dict()}
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return report
