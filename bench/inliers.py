"""Does geometric verification separate the right animal from the wrong ones? (issue 26 item 4)

For each set, the quality bench's split (``bench.quality_split.split``, the same seed and query
cap as ``bench/quality.py``), the service's RootSIFT features of every gallery and query photo
(``matching.features.RootSift`` with the default settings), the service's LNBNN shortlist
(``matching.local.LocalMatcher.candidates``: the settings' ``rerank_individuals`` individuals,
each on its ``rerank_photos`` most voted photos) and the service's pair verification
(``matching.verify.best_photos``). For every known query it compares the right animal's evidence
(its best photo; verified on its most voted photos even when the shortlist missed it) with the
best wrong individual's of the shortlist, and reports the medians, the 90th percentiles and how
often the right animal has more.

Each scoring (``--scorings``) is one way ``best_photos`` counts a pair's evidence:

- ``count``: the distinct inliers (the service before issue 26);
- ``weighted``: each inlier weighted by its query keypoint's distinctiveness
  (``matching.local.distinctiveness``), summed.

    PYTHONPATH=$PWD nice .venv/bin/python bench/inliers.py --max-queries 150 \\
        --scratch /work/scratch/keypoints-inliers --out /work/scratch/keypoints-inliers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import setup_logging, shared_data  # noqa: E402
from bench.quality_data import REAL_SETS, DataSet, Photo  # noqa: E402
from bench.quality_split import SEED, Split, split  # noqa: E402
from service.gallery.sync import Filters, GalleryEntries  # noqa: E402
from service.imaging import decode_photo  # noqa: E402
from service.matching.features import Features, RootSift  # noqa: E402
from service.matching.local import (  # noqa: E402
    _SHIFT as SHIFT,
)
from service.matching.local import (
    DescriptorIndex,
    K,
    LocalMatcher,
    _labels_by_image,
    distinctiveness,
)
from service.matching.verify import Evidence, match_pair  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.inliers")

SCORINGS = (
    "count",
    "w-share",
    "w-gap",
    "w-gap-share",
    "w-sqrt-share",
    "w-vote-share",
    "w-gap-vote-share",
    "w-share-round",
    "w-vote-share-round",
)


def extract(
    data: DataSet, photos: Sequence[Photo], cache: Path, settings: Settings
) -> list[Features]:
    """The service's features of each photo (decoded as a stored photo is), cached by path."""
    extractor = RootSift(settings.features_max_side, settings.features_count)
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for p in photos:
        path = cache / (p.image.replace("/", "__") + f".{extractor.name}.npz")
        if path.exists():
            with np.load(path) as z:
                out.append(
                    Features(z["points"], z["descriptors"], int(z["size"][0]), int(z["size"][1]))
                )
            continue
        photo = decode_photo(
            (data.images / p.image).read_bytes(), max_pixels=settings.max_image_pixels
        )
        f = extractor.extract(photo.image)
        np.savez(
            path, points=f.points, descriptors=f.descriptors, size=np.array([f.width, f.height])
        )
        out.append(f)
    return out


class _Matcher(LocalMatcher):
    """The service's matcher over features given here (no database): ``sync`` is replaced by
    adding the gallery's features to the descriptor index directly."""

    def __init__(self, found: dict[int, Features]) -> None:
        self.descriptors = DescriptorIndex()
        self.descriptors.add(found)
        import threading

        self._lock = threading.Lock()


def variant(kind: str, distances: np.ndarray, ids: np.ndarray, label_of: dict[int, str]) -> Any:
    """Distinctiveness weights tried and not kept (the service's is ``vote-share``):
    ``gap`` 1 - d1 / d(K+1) (how much nearer the nearest is than the normaliser), ``share`` 1 /
    the individuals among the K nearest, and their products and roots."""
    count = len(distances)
    normaliser = np.maximum(distances[:, -1], 1e-9)
    gap = np.clip(1.0 - distances[:, 0] / normaliser, 0.0, 1.0).astype(np.float32)
    images = ids[:, :-1] >> SHIFT
    share = np.ones(count, np.float32)
    for row in range(count):
        labels = {label_of.get(int(i)) for i in images[row].tolist()} - {None}
        share[row] = 1.0 / max(len(labels), 1)
    if kind == "gap-vote-share":
        return gap * distinctiveness(distances, ids, label_of, count)
    return {
        "gap": gap,
        "share": share,
        "gap-share": gap * share,
        "sqrt-share": np.sqrt(share),
    }[kind]


def weights_of(
    kind: str, matcher: _Matcher, query: Features, entries: GalleryEntries, filters: Filters
) -> Any:
    if kind == "vote-share":  # the service's
        return matcher.weights(query, entries, filters)
    distances, ids = matcher.descriptors.search(query, K + 1)
    label_of = _labels_by_image(entries, filters)
    return variant(kind, distances, ids, label_of)


def entries_of(gallery: Sequence[Photo]) -> GalleryEntries:
    rows = [
        (i, i, p.individual_id, p.species, None, None, p.encounter)
        for i, p in enumerate(gallery, start=1)
    ]
    return GalleryEntries.from_rows(rows)


def summary(right: list[float], wrong: list[float]) -> dict[str, Any]:
    r, w = np.array(right, float), np.array(wrong, float)
    return {
        "known": len(r),
        "right_median": float(np.median(r)) if len(r) else None,
        "right_p90": float(np.percentile(r, 90)) if len(r) else None,
        "wrong_median": float(np.median(w)) if len(w) else None,
        "wrong_p90": float(np.percentile(w, 90)) if len(w) else None,
        "right_more": int((r > w).sum()),
        "right_zero": int((r == 0).sum()),
    }


def measure(
    data: DataSet, s: Split, cache: Path, settings: Settings, scorings: Sequence[str]
) -> dict[str, Any]:
    gallery_features = extract(data, s.gallery, cache, settings)
    found = dict(enumerate(gallery_features, start=1))
    known = [q for q in s.queries if q.individual_id not in s.unseen]
    query_features = extract(data, known, cache, settings)
    entries = entries_of(s.gallery)
    matcher = _Matcher(found)

    top, photos = settings.rerank_individuals, settings.rerank_photos
    right: dict[str, list[float]] = {k: [] for k in scorings}
    wrong: dict[str, list[float]] = {k: [] for k in scorings}
    shortlisted = 0
    for q, qf in zip(known, query_features, strict=True):
        filters = Filters(species=q.species) if data.species_filter else Filters()
        everyone = matcher.candidates(qf, entries, filters, top=10**6, photos=photos)
        shortlist = everyone[:top]
        mine = [c for c in shortlist if c.label == q.individual_id]
        shortlisted += bool(mine)
        if not mine:
            mine = [c for c in everyone if c.label == q.individual_id] or [
                Evidence(q.individual_id, None, ())
            ]
        others = [c for c in shortlist if c.label != q.individual_id]
        # Each pair matched once (``verify.match_pair``); each scoring counts its evidence as
        # ``verify.best_photos`` does with its weights (the best photo's).
        weights = {
            kind: weights_of(kind, matcher, qf, entries, filters)
            for kind in {s[2:].removesuffix("-round") for s in scorings if s.startswith("w-")}
        }
        matches = [
            [match_pair(qf, found[i]) for i in c.photos if i in found] for c in [*mine, *others]
        ]
        for scoring in scorings:
            kind = scoring[2:].removesuffix("-round")
            value = [
                max(
                    (
                        float(m.inliers) if kind not in weights else m.weighted(qf, weights[kind])
                        for m in pairs
                    ),
                    default=0.0,
                )
                for pairs in matches
            ]
            if scoring.endswith("-round"):
                value = [float(round(v)) for v in value]
            r, w = value[0], max(value[1:], default=0.0)
            right[scoring].append(r)
            wrong[scoring].append(w)
    out: dict[str, Any] = {
        "gallery_photos": len(s.gallery),
        "known_queries": len(known),
        "right_shortlisted": shortlisted,
    }
    for scoring in scorings:
        out[scoring] = summary(right[scoring], wrong[scoring])
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| set | scoring | known | right shortlisted | right median (p90) "
        "| best wrong median (p90) | right > wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        for scoring in SCORINGS:
            if scoring not in r:
                continue
            m = r[scoring]
            lines.append(
                f"| {key} | {scoring} | {m['known']} | {r['right_shortlisted']} | "
                f"{m['right_median']:.1f} ({m['right_p90']:.1f}) | "
                f"{m['wrong_median']:.1f} ({m['wrong_p90']:.1f}) | "
                f"{m['right_more']}/{m['known']} = {m['right_more'] / max(m['known'], 1):.0%} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--sets", default=",".join(REAL_SETS))
    parser.add_argument("--scorings", default=",".join(SCORINGS))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-queries", type=int, default=150)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    settings = Settings()
    scorings = [s for s in args.scorings.split(",") if s]
    results: dict[str, Any] = {}
    for key in [k for k in args.sets.split(",") if k]:
        data = REAL_SETS[key](args.data / key, args.scratch)
        s = split(data, args.seed, args.max_queries)
        results[key] = measure(data, s, args.scratch / "features" / key, settings, scorings)
        log.info("%s: %s", key, json.dumps(results[key]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    log.info("\n%s", table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
