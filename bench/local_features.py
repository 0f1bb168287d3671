"""Local features: what verification adds to ``/identify`` and what the local-features matcher
costs at 10k gallery photos, on this machine's CPUs. Writes the "Local features" section of
docs/performance.md.

1. **Re-ranking**: one ``Identifier`` (the toy ONNX model over a SQLite catalogue of textured
   640 px photos, 60 individuals x 4 photos) answers the same queries with verification off and
   on, alternating query by query in one process; the figure is the p50 of each and of their
   difference (``rerank_individuals`` 10 of the kNN head and 10 of the LNBNN vote,
   ``rerank_photos`` 3 photos each).
2. **Local matcher at scale**: the descriptor index of 10,000 gallery photos (up to 400 RootSIFT
   descriptors each: 500 textured photos extracted for real, each repeated 20 times with its
   descriptors jittered and its own image id, so the index holds 2.4M distinct vectors), then the
   LNBNN vote and the verification of the best 10 individuals per query; memory of the index and
   bytes stored per photo.
3. **Verification targets** (issue 27), as ratios within this run, each old path reproduced
   here and timed query by query beside the new one: the query's features (today: from the
   photo as kept, waited for; now: from the decoded photo), the matching of one query against a
   shortlist of 20 individuals x 3 photos (today: pair by pair; now: one batched step), and
   ``/identify`` with ``rerank`` against decode + preprocess + embed + the query's features, on
   real photos (``--set``) or textured ones, under ``--model`` (the demo model by default).

    .venv/bin/python bench/local_features.py [--out docs/performance.md] [--photos 10000]
        [--model runs/finetuned/model.onnx] [--set holstein_cow_faces_holstein2025]
        [--only-targets]
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    DEMO_MODEL,
    git_commit,
    load_average,
    marks,
    pct,
    replace_section,
    setup_logging,
)
from service.catalogue.imports import CatalogueImport  # noqa: E402
from service.contract import Calibration, Verification  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.tables import Model, make_engine, make_sessionmaker, transaction  # noqa: E402
from service.gallery.sync import Filters, GalleryEntries  # noqa: E402
from service.imaging import kept_size, to_model_input  # noqa: E402
from service.matching.features import Features, RootSift, extractor_for  # noqa: E402
from service.matching.identify import Identifier, _hash_and_check  # noqa: E402
from service.matching.local import LocalMatcher  # noqa: E402
from service.matching.runtime import Runtime  # noqa: E402
from service.matching.verify import Evidence, best_photos, match_pair, verify  # noqa: E402
from service.models.registry import register_model  # noqa: E402
from service.models.switch import activate_model  # noqa: E402
from service.onnx.embedder import Embedder  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.toy import build_toy_model, encode, textured_photo  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

log = logging.getLogger("bench.local_features")
MARK_BEGIN, MARK_END = marks("local-features")
SIZE = 640


def rerank_latency(queries: int) -> dict[str, float]:
    """p50 of /identify's work (decode to answer, nothing recorded), verification off and on."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = Settings(data_dir=folder / "data", _env_file=None)
        settings.ensure_dirs()
        migrate.upgrade(settings.sqlalchemy_url)
        factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
        model = register_model(settings, factory, build_toy_model(folder / "toy.onnx"))
        with transaction(factory) as session:
            session.get_one(Model, model.id).verification = "rerank"
        activate_model(settings, factory, model.id)
        images = folder / "catalogue" / "images"
        images.mkdir(parents=True)
        csv = folder / "catalogue" / "catalogue.csv"
        rows = ["image,species,individual_id"]
        for ind in tqdm(range(60), desc="catalogue", unit="individual"):
            for shot in range(4):
                name = f"i{ind}_{shot}.jpg"
                (images / name).write_bytes(encode(textured_photo(ind, shot, SIZE), "JPEG"))
                rows.append(f"{name},bottlenose_dolphin,ind-{ind}")
        csv.write_text("\n".join(rows) + "\n")
        embedder = Embedder.for_model(settings, model.file_path)
        CatalogueImport(settings, factory, embedder, model.id, extractor_for(settings)).run(
            csv, images
        )
        identifier = Runtime(settings, factory).current()
        photos = [encode(textured_photo(i % 60, 9 + i // 60, SIZE), "JPEG") for i in range(queries)]
        timings: dict[str, list[float]] = {"none": [], "rerank": [], "features": [], "verify": []}
        base = identifier.model
        for data in tqdm(photos, desc="rerank", unit="query"):
            for mode in (Verification.NONE, Verification.RERANK):
                identifier.model = base.__class__(**{**base.__dict__, "verification": mode})
                start = time.perf_counter()
                answer = identifier.identify(data, filters=Filters(), record=False)
                timings[str(mode)].append((time.perf_counter() - start) * 1000)
                if mode == Verification.RERANK:
                    timings["features"].append(answer.timings.get("features", 0.0))
                    timings["verify"].append(answer.timings.get("verify", 0.0))
    added = [r - n for r, n in zip(timings["rerank"], timings["none"], strict=True)]
    return {
        "queries": queries,
        "none_p50": statistics.median(timings["none"]),
        "rerank_p50": statistics.median(timings["rerank"]),
        "added_p50": statistics.median(added),
        "added_p90": pct(added, 90),
        "features_p50": statistics.median(timings["features"]),
        "verify_p50": statistics.median(timings["verify"]),
    }


def local_at_scale(photos: int, distinct: int, queries: int) -> dict[str, float]:
    extractor = RootSift()
    rng = np.random.default_rng(0)
    base = {
        i: extractor.extract(textured_photo(i, 0, SIZE))
        for i in tqdm(range(distinct), desc="extract", unit="photo")
    }
    extract_ms = []
    for i in range(10):
        start = time.perf_counter()
        extractor.extract(textured_photo(i, 5, SIZE))
        extract_ms.append((time.perf_counter() - start) * 1000)
    gallery: dict[int, Features] = {}
    rows = []
    for image_id in range(1, photos + 1):
        source = base[image_id % distinct]
        jitter = rng.integers(-3, 4, source.descriptors.shape)
        descriptors = np.clip(source.descriptors.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
        gallery[image_id] = Features(source.points, descriptors, source.width, source.height)
        rows.append((image_id, image_id, f"ind-{image_id % distinct}", None, None, None, None))
    entries = GalleryEntries.from_rows(rows)
    matcher = LocalMatcher(_Given(gallery))  # type: ignore[arg-type]
    start = time.perf_counter()
    matcher.sync(entries)
    build_s = time.perf_counter() - start
    index_bytes = len(faiss.serialize_index(matcher.descriptors.index))
    stored = [sum(len(b) for b in f.pack()) for f in list(gallery.values())[:1000]]
    calibration = Calibration.default(0.62)
    total_ms, vote_ms = [], []
    for q in tqdm(range(queries), desc="local", unit="query"):
        query = extractor.extract(textured_photo(q % distinct, 7, SIZE))
        start = time.perf_counter()
        evidence = matcher.candidates(query, entries, Filters(), top=10, photos=3)
        voted = time.perf_counter()
        verify(query, evidence, lambda ids: {i: gallery[i] for i in ids}, calibration)
        total_ms.append((time.perf_counter() - start) * 1000)
        vote_ms.append((voted - start) * 1000)
    return {
        "photos": photos,
        "descriptors": matcher.descriptors.count,
        "exact": float(matcher.descriptors.exact),
        "build_s": build_s,
        "index_mb": index_bytes / 2**20,
        "stored_kb_per_photo": statistics.mean(stored) / 1024,
        "extract_p50": statistics.median(extract_ms),
        "vote_p50": statistics.median(vote_ms),
        "total_p50": statistics.median(total_ms),
        "total_p90": pct(total_ms, 90),
        "queries": queries,
    }


def _catalogue(
    folder: Path, set_name: str | None, individuals: int, shots: int, queries: int
) -> tuple[Path, Path, list[bytes]]:
    """A catalogue (csv, images folder) of ``individuals`` x ``shots`` photos and ``queries``
    other photos of them: real ones of ``set_name`` (read in place), else textured 640 px."""
    csv_path = folder / "targets.csv"
    lines = ["image,species,individual_id"]
    if set_name is None:
        images = folder / "targets"
        images.mkdir()
        for ind in range(individuals):
            for shot in range(shots):
                name = f"i{ind}_{shot}.jpg"
                (images / name).write_bytes(encode(textured_photo(ind, shot, SIZE), "JPEG"))
                lines.append(f"{name},bottlenose_dolphin,ind-{ind}")
        photos = [
            encode(textured_photo(i % individuals, 9 + i // individuals, SIZE), "JPEG")
            for i in range(queries)
        ]
    else:
        images = SHARED / set_name
        by: dict[str, list[str]] = {}
        with (images / "labels.csv").open() as f:
            for row in csv.DictReader(f):
                if not row.get("exact_duplicate_of"):
                    by.setdefault(row["individual_id"], []).append(row["image"])
        chosen = [k for k, v in by.items() if len(v) > shots][:individuals]
        for k in chosen:
            lines += [f"{image},animal,{k}" for image in by[k][:shots]]
        extra = [image for k in chosen for image in by[k][shots:]]
        photos = [(images / extra[i % len(extra)]).read_bytes() for i in range(queries)]
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path, images, photos


def _pairwise_best_photos(
    query: Features,
    candidates: Sequence[Evidence],
    features: Callable[[Sequence[int]], dict[int, Features]],
) -> list[int]:
    """Today's (before issue 27) matching of a shortlist: pair by pair, each photo's product,
    ratio test and homography on its own. The best inliers per candidate."""
    stored = features([i for c in candidates for i in c.photos])
    return [
        max((match_pair(query, stored[i]).inliers for i in c.photos if i in stored), default=0)
        for c in candidates
    ]


def _old_query_features(identifier: Identifier, raw: bytes, pool: ThreadPoolExecutor) -> float:
    """Today's (before issue 27) query features of a recorded ``/identify``, in ms: the photo
    as kept (re-encoded if need be, hashed, stored) made beside the preprocessing, waited for,
    and the features extracted from it. The decode and preprocessing are not counted."""
    photo = identifier.decode(raw, None)
    checked = pool.submit(_hash_and_check, raw, None)
    keeping = pool.submit(identifier._keep, raw, photo, False, checked)
    to_model_input(photo.image, identifier.embedder.contract.preprocessing)
    start = time.perf_counter()
    kept = keeping.result()[0]
    identifier.features.extractor.extract(kept.photo.image)
    return (time.perf_counter() - start) * 1000


def verification_targets(model_path: Path | None, set_name: str | None, queries: int) -> dict:
    """The issue-27 ratios, every figure of a ratio from this run, old and new alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = Settings(data_dir=folder / "data", _env_file=None)
        settings.ensure_dirs()
        migrate.upgrade(settings.sqlalchemy_url)
        factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
        model = register_model(settings, factory, model_path or DEMO_MODEL)
        with transaction(factory) as session:
            session.get_one(Model, model.id).verification = "rerank"
        activate_model(settings, factory, model.id)
        csv_path, images, photos = _catalogue(folder, set_name, 40, 3, queries)
        embedder = Embedder.for_model(settings, model.file_path)
        CatalogueImport(settings, factory, embedder, model.id, extractor_for(settings)).run(
            csv_path, images
        )
        identifier = Runtime(settings, factory).current()
        extractor = identifier.features.extractor
        spec = identifier.embedder.contract.preprocessing
        local = identifier.descriptors()
        entries = identifier.gallery.entries
        # The matching step at the extractor's settings: 640 px textured photos (~300-400
        # keypoints), 20 individuals x 3 photos.
        shortlist_gallery = {
            100 * ind + shot: extractor.extract(textured_photo(ind, shot, SIZE))
            for ind in range(20)
            for shot in range(3)
        }
        shortlist = [
            Evidence(f"ind-{ind}", None, tuple(100 * ind + s for s in range(3)))
            for ind in range(20)
        ]
        probes = [extractor.extract(textured_photo(q % 20, 9, SIZE)) for q in range(queries)]
        t: dict[str, list[float]] = {
            k: []
            for k in ("features_old", "features_new", "match_old", "match_new", "base", "rerank")
        }
        given = _Given(shortlist_gallery).get
        same = 0
        with ThreadPoolExecutor(2) as pool:
            for q, raw in enumerate(tqdm(photos, desc="targets", unit="query")):
                t["features_old"].append(_old_query_features(identifier, raw, pool))
                # In the service's order: the features before the embedding (ONNX Runtime's
                # threads spin a while after a run, and would slow the extraction after it).
                start = time.perf_counter()
                photo = identifier.decode(raw, None)
                pixels = to_model_input(photo.image, spec)
                mid = time.perf_counter()
                extractor.extract(
                    photo.image, kept_size(photo.image.size, settings.stored_photo_max_side)
                )
                features = time.perf_counter()
                identifier.embedder.embed(pixels[np.newaxis])
                end = time.perf_counter()
                t["features_new"].append((features - mid) * 1000)
                t["base"].append((end - start) * 1000)
                start = time.perf_counter()
                identifier.identify(raw, filters=Filters(), record=False)
                t["rerank"].append((time.perf_counter() - start) * 1000)
                probe = probes[q]
                start = time.perf_counter()
                old = _pairwise_best_photos(probe, shortlist, given)
                mid = time.perf_counter()
                new = best_photos(probe, shortlist, given)
                end = time.perf_counter()
                t["match_old"].append((mid - start) * 1000)
                t["match_new"].append((end - mid) * 1000)
                same += old == [c.inliers for c in new]
        p50 = {k: statistics.median(v) for k, v in t.items()}
    return {
        "queries": queries,
        "commit": git_commit(),
        "load": load_average(),
        "set": set_name or "textured 640 px",
        "model": (model_path or DEMO_MODEL).name,
        "gallery": len(entries),
        "descriptors": local.descriptors.count,
        **{f"{k}_p50": v for k, v in p50.items()},
        "features_ratio": p50["features_new"] / p50["features_old"],
        "match_ratio": p50["match_new"] / p50["match_old"],
        "identify_ratio": p50["rerank"] / p50["base"],
        "same_inliers": same / max(queries, 1),
    }


def render_targets(r: dict) -> str:
    return "\n".join(
        [
            f"**Verification targets** (issue 27; `{r['set']}` photos, {r['gallery']:.0f} in "
            f"the gallery, {r['descriptors']:.0f} descriptors, model `{r['model']}`, "
            f"{r['queries']:.0f} queries, old and new alternating in one process; p50 ms; "
            f"commit `{r['commit']}`, load average at the end {r['load']}):",
            "",
            "| | today | now | ratio | target |",
            "|---|---|---|---|---|",
            f"| the query's features | {r['features_old_p50']:.1f} | "
            f"{r['features_new_p50']:.1f} | {r['features_ratio']:.2f}x | <= 0.6x |",
            f"| matching 20 individuals x 3 photos (640 px, 400 keypoints) | "
            f"{r['match_old_p50']:.1f} | {r['match_new_p50']:.1f} | {r['match_ratio']:.2f}x | "
            "<= 25 ms |",
            f"| `/identify` with `rerank` / (decode + preprocess + embed + query features) | "
            f"{r['base_p50']:.1f} | {r['rerank_p50']:.1f} | {r['identify_ratio']:.2f}x | "
            "<= 1.3x |",
            "",
            f"The batched matcher gave the pair-by-pair inliers on {100 * r['same_inliers']:.0f} % "
            "of the shortlists.",
        ]
    )


class _Given:
    """A feature store over features already in memory (no database)."""

    def __init__(self, features: dict[int, Features]) -> None:
        self.features = features

    def get(self, image_ids: list[int]) -> dict[int, Features]:
        return {i: self.features[i] for i in image_ids if i in self.features}


def render(rerank: dict[str, float], scale: dict[str, float], targets: dict, seconds: float) -> str:
    return "\n".join(
        [
            MARK_BEGIN,
            "## Local features: verification and the local-features matcher",
            "",
            f"Measured by `bench/local_features.py` ({seconds:.0f} s) on this machine's 2 cores; "
            "RootSIFT at most 400 keypoints, photos scaled to 640 px on their longer side.",
            "",
            f"**Re-ranking**: the first 10 individuals of the toy model's kNN head and the first "
            "10 of the LNBNN vote, 3 photos each, over a catalogue of 240 textured 640 px JPEGs, "
            f"{rerank['queries']:.0f} queries, both ways alternating in one process (decode to "
            "answer, nothing recorded; the toy model itself takes about a millisecond):",
            "",
            "| | p50 ms |",
            "|---|---|",
            f"| verification off | {rerank['none_p50']:.1f} |",
            f"| verification on | {rerank['rerank_p50']:.1f} |",
            f"| added (p50 / p90 of the per-query difference) | {rerank['added_p50']:.1f} / "
            f"{rerank['added_p90']:.1f} |",
            f"| of which: the query's features / the matching | {rerank['features_p50']:.1f} / "
            f"{rerank['verify_p50']:.1f} |",
            "",
            "The target is at most 250 ms added at p50.",
            "",
            f"**The local-features matcher at {scale['photos']:.0f} gallery photos** "
            f"({scale['descriptors']:.0f} descriptors, "
            f"{'exact' if scale['exact'] else 'IVF with 8-bit scalar quantisation'}): the LNBNN "
            "vote and the verification of the best 10 individuals, per query, after the query's "
            "own features:",
            "",
            "| | |",
            "|---|---|",
            f"| query features (extraction, p50) | {scale['extract_p50']:.0f} ms |",
            f"| vote (p50) | {scale['vote_p50']:.0f} ms |",
            f"| vote + verification (p50 / p90) | {scale['total_p50']:.0f} / "
            f"{scale['total_p90']:.0f} ms |",
            f"| descriptor index in memory | {scale['index_mb']:.0f} MB |",
            f"| index built from the stored features | {scale['build_s']:.0f} s |",
            f"| stored per photo (features row) | {scale['stored_kb_per_photo']:.1f} kB, so "
            f"{scale['stored_kb_per_photo'] * 10_000 / 1024:.0f} MB per 10k photos |",
            "",
            "The target is an answer within 1 s at 10k gallery photos. The gallery's features are "
            "500 textured photos extracted for real, each repeated 20 times with jittered "
            "descriptors under its own image id, so the index's size and search are those of 10k "
            "photos while extraction stays a few minutes. The index is rebuilt from the database "
            "when a replica loads the matcher (the time above); it is not yet written to a file.",
            "",
            render_targets(targets),
            MARK_END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=500)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--model", type=Path, help="ONNX model of the targets (the demo's)")
    parser.add_argument(
        "--set", help="real photos of ../shared/data/SET for the targets (textured ones)"
    )
    parser.add_argument(
        "--only-targets", action="store_true", help="measure the targets only, write nothing"
    )
    args = parser.parse_args()
    setup_logging("%(asctime)s %(levelname)s %(message)s", quiet=("service",))
    start = time.perf_counter()
    targets = verification_targets(args.model, args.set, args.queries)
    log.info("verification targets:\n%s", render_targets(targets))
    if args.only_targets:
        return
    rerank = rerank_latency(args.queries)
    log.info("re-ranking: %s", rerank)
    scale = local_at_scale(args.photos, args.distinct, args.queries)
    log.info("local matcher: %s", scale)
    section = render(rerank, scale, targets, time.perf_counter() - start)
    replace_section(args.out, section, "local-features", new_doc=None)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
