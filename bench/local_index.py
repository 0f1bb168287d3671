"""The local-features matcher at 10k, 50k and 100k gallery photos: the compressed descriptor
index (``DescriptorIndex.built``) against the exact search, on real cow-face descriptors.

The gallery is the quality bench's cow gallery (``bench/quality_split.py``, seed 0: the real
photos of the known cows), extracted for real with the service's RootSIFT extractor (cached
under ``--scratch``), plus distractors up to the gallery size: each a new individual made from a
real gallery photo whose descriptors are moved by a symmetry of the SIFT layout (a flip or
rotation of the 4 x 4 cell grid with the matching shift of the 8 orientation bins, never the
identity), then noise on every component and jitter on the keypoints. Small noise alone would
make each distractor a near-copy of a real photo under another name, and the exact search itself
could then no longer tell the cows apart: the symmetry keeps the distractors' descriptor
statistics those of real SIFT while making them other patterns. The known queries of the split
(at most ``--max-queries``) are the queries.

Steps: (1) the exact 6 nearest gallery descriptors of every query descriptor, for every size
in one chunked pass of ``faiss.knn`` (cached); (2) for each size, the compressed index built as
a replica with no saved index builds it (reading every photo's stored features: packed as the
database rows hold them, then unpacked) and saved (cached: built once); (3) a fresh process
reads the saved index as a replica does at load, then answers each known query: the LNBNN vote
and the geometric verification of the best 10 individuals (``verify``), p50 / p90 of wall time
and p50 of CPU time (every thread); its resident memory after the load (all of it, and what the
load added); MAP@5 of the known queries (the right cow's rank in the answer), and that of the
same vote over the exact neighbours.

    nice -n 19 .venv/bin/python bench/local_index.py --scratch /work/scratch/index30 \
        --sizes 10000,50000,100000 --nprobes 4,8,16
    .venv/bin/python bench/local_index.py --scratch /work/scratch/index30 --table table.md
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality_data  # noqa: E402
from bench._common import git_commit, load_average, pct, setup_logging  # noqa: E402
from bench.quality_split import SEED, split  # noqa: E402
from service.contract import Calibration  # noqa: E402
from service.gallery.sync import Filters, GalleryEntries  # noqa: E402
from service.imaging import decode_photo  # noqa: E402
from service.matching import local  # noqa: E402
from service.matching.features import DIM, Features, RootSift  # noqa: E402
from service.matching.local import LocalMatcher  # noqa: E402
from service.matching.verify import verify  # noqa: E402

log = logging.getLogger("bench.local_index")
SET = "holstein_cow_faces_holstein2025"
DATA = ROOT.parent / "shared" / "data" / SET


def extract_real(scratch: Path, max_queries: int) -> Path:
    """The real gallery's and known queries' features, extracted once into ``scratch``."""
    path = scratch / f"cows-seed{SEED}-q{max_queries}.npz"
    if path.exists():
        return path
    data = quality_data.holstein(DATA)
    s = split(data, SEED, max_queries)
    known = [q for q in s.queries if q.individual_id not in s.unseen]
    extractor = RootSift()
    arrays: dict[str, np.ndarray] = {}
    for side, photos in (("gallery", s.gallery), ("query", known)):
        points, descriptors, counts, sizes = [], [], [], []
        for n, p in enumerate(photos):
            photo = decode_photo((data.images / p.image).read_bytes(), max_pixels=50_000_000)
            f = extractor.extract(photo.image)
            points.append(f.points)
            descriptors.append(f.descriptors)
            counts.append(len(f))
            sizes.append((f.width, f.height))
            if n % 200 == 0:
                log.info("%s: %d/%d photos extracted", side, n, len(photos))
        arrays[f"{side}_points"] = np.concatenate(points)
        arrays[f"{side}_descriptors"] = np.concatenate(descriptors)
        arrays[f"{side}_counts"] = np.array(counts, np.int64)
        arrays[f"{side}_sizes"] = np.array(sizes, np.int64)
        arrays[f"{side}_labels"] = np.array([p.individual_id for p in photos])
    scratch.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


# The symmetries of the SIFT layout (index (row * 4 + col) * 8 + bin): the 8 maps of the 4 x 4
# grid (rotations and mirror images), each with the 8 shifts of the orientation bins (mirrored
# bins for the mirror images); the identity is left out, so no distractor copies a real photo.
def _symmetries() -> list[np.ndarray]:
    out = []
    for rot in range(4):
        for mirror in (False, True):
            for shift in range(8):
                if rot == 0 and not mirror and shift == 0:
                    continue
                perm = np.empty(DIM, np.int64)
                for r in range(4):
                    for c in range(4):
                        rr, cc = r, (3 - c if mirror else c)
                        for _ in range(rot):
                            rr, cc = cc, 3 - rr
                        for b in range(8):
                            bb = ((-b if mirror else b) + shift + 2 * rot) % 8
                            perm[(rr * 4 + cc) * 8 + bb] = (r * 4 + c) * 8 + b
                out.append(perm)
    return out


SYMMETRIES = _symmetries()


class Catalogue:
    """The real photos' features and the distractors', made on demand from the image id (so
    the bench never holds 100k photos' descriptors at once: they are read as a store is)."""

    def __init__(self, cache: Path, photos: int, noise: float = 3.0, jitter: float = 2.0):
        data = np.load(cache)
        self.real = self._unpacked(data, "gallery")
        self.queries = self._unpacked(data, "query")
        self.real_labels = [str(x) for x in data["gallery_labels"]]
        self.query_labels = [str(x) for x in data["query_labels"]]
        self.photos = photos
        self.noise, self.jitter = noise, jitter

    @staticmethod
    def _unpacked(data: Any, side: str) -> list[Features]:
        ends = np.cumsum(data[f"{side}_counts"])
        points = np.split(data[f"{side}_points"], ends[:-1])
        descriptors = np.split(data[f"{side}_descriptors"], ends[:-1])
        return [
            Features(p, d, int(w), int(h))
            for p, d, (w, h) in zip(points, descriptors, data[f"{side}_sizes"], strict=True)
        ]

    def label(self, image_id: int) -> str:
        real = len(self.real)
        return self.real_labels[image_id - 1] if image_id <= real else f"distractor-{image_id}"

    def features(self, image_id: int) -> Features:
        real = len(self.real)
        if image_id <= real:
            return self.real[image_id - 1]
        rng = np.random.default_rng(image_id)
        source = self.real[(image_id - 1) % real]
        perm = SYMMETRIES[((image_id - 1) // real) % len(SYMMETRIES)]
        moved = source.descriptors[:, perm].astype(np.float32)
        moved += rng.normal(0.0, self.noise, moved.shape)
        points = source.points + rng.uniform(-self.jitter, self.jitter, source.points.shape)
        return Features(
            points.astype(np.float32),
            np.clip(np.rint(moved), 0, 255).astype(np.uint8),
            source.width,
            source.height,
        )

    def get(self, image_ids: Iterable[int]) -> dict[int, Features]:
        """As ``FeatureStore.get``: each photo's row packed as the database holds it, then
        unpacked."""
        return {i: Features.unpack(*self.features(i).pack()) for i in image_ids}

    def entries(self) -> GalleryEntries:
        rows = [(i, i, self.label(i), None, None, None, None) for i in range(1, self.photos + 1)]
        return GalleryEntries.from_rows(rows)


def exact_neighbours(cat: Catalogue, sizes: list[int], scratch: Path) -> dict[int, Path]:
    """The exact ``K + 1`` nearest gallery descriptors of every query descriptor, for each
    gallery size in ``sizes`` (each gallery is the first photos of the next: one chunked pass
    of ``faiss.knn`` over the catalogue, never the whole gallery as float32 at once), cached in
    ``scratch`` as ``exact-PHOTOS.npz`` (similarities and descriptor ids, by query)."""
    paths = {n: scratch / f"exact-{n}.npz" for n in sizes}
    if all(p.exists() for p in paths.values()):
        return paths
    queries = np.concatenate([q.unit for q in cat.queries])
    k = local.K + 1
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    chunk = 2000
    top = max(sizes)
    for start in tqdm(range(1, top + 1, chunk), desc="exact", unit="chunk"):
        ids = range(start, min(start + chunk, top + 1))
        found = [cat.features(i) for i in ids]
        vectors = np.concatenate([f.unit for f in found])
        keys = np.concatenate(
            [
                (i << local._SHIFT) + np.arange(len(f), dtype=np.int64)
                for i, f in zip(ids, found, strict=True)
            ]
        )
        sims, rows = faiss.knn(queries, vectors, k, faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, sims], axis=1)
        all_i = np.concatenate([best_i, keys[rows]], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
        end = ids[-1]
        if end in paths:
            np.savez(paths[end], sims=best_s, ids=best_i)
            log.info("exact neighbours of a %d-photo gallery: %s", end, load_average())
    return paths


class CachedSearch:
    """A ``DescriptorIndex`` stand-in that answers the bench's queries from the exact
    neighbours computed by ``exact_neighbours``."""

    def __init__(self, cat: Catalogue, path: Path) -> None:
        data = np.load(path)
        ends = np.cumsum([len(q) for q in cat.queries])
        self.by_query = {
            id(q): (s, i)
            for q, s, i in zip(
                cat.queries,
                np.split(data["sims"], ends[:-1]),
                np.split(data["ids"], ends[:-1]),
                strict=True,
            )
        }

    def search(self, query: Features, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self.by_query[id(query)]
        return np.maximum(2.0 - 2.0 * sims[:, :k], 0.0), ids[:, :k]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def index_file(scratch: Path, photos: int) -> Path:
    """The saved index of a ``photos`` gallery under the compressed mode's settings."""
    layout = local.compressed_layout(local.compressed_lists(photos * 135))
    return scratch / f"local-{photos}-{layout.replace(',', '-')}-res{local.RESIDUAL:d}.faiss"


def build(cat: Catalogue, path: Path) -> dict[str, Any]:
    """Build the compressed index of the catalogue as a replica does with no saved index
    (reading every photo's stored features), and save it to ``path``."""
    entries = cat.entries()
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    matcher = LocalMatcher(cat, compressed_photos=1, path=path, extractor="bench")  # type: ignore[arg-type]
    matcher.sync(entries)
    return {
        "build_s": time.perf_counter() - start,
        "build_rss_mb": rss_mb() - before,
        "load_build": load_average(),
    }


def _replica(
    cat: Catalogue, entries: GalleryEntries, path: Path
) -> tuple[LocalMatcher, float, float]:
    """A fresh replica's matcher loaded from the saved index at ``path`` and synced to
    ``entries``: the matcher, the seconds it took and the resident MiB before it."""
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    matcher = LocalMatcher(cat, compressed_photos=1, path=path, extractor="bench")  # type: ignore[arg-type]
    matcher.sync(entries)
    return matcher, time.perf_counter() - start, before


def answer(
    cat: Catalogue, path: Path, exact: Path, queries: int | None, nprobes: list[int]
) -> list[dict[str, Any]]:
    """A fresh replica (this process) reads the saved index, then answers the known queries
    (once for each of ``nprobes``): load time, resident memory, vote and verification times,
    MAP@5 against the exact neighbours' on the same queries."""
    entries = cat.entries()
    matcher, load_s, before = _replica(cat, entries, path)
    assert matcher.builder is None and matcher.descriptors.compressed, "not read from the file"
    loaded = rss_mb()
    index = matcher.descriptors
    reference = LocalMatcher(cat)  # type: ignore[arg-type]
    reference.descriptors = CachedSearch(cat, exact)  # type: ignore[assignment]
    calibration = Calibration.default(0.62)
    chosen = list(range(len(cat.queries)))[:queries]
    exact_ranks = []
    for n in chosen:
        query = cat.queries[n]
        truth = reference.candidates(query, entries, Filters(), top=10, photos=3)
        exact_ranks.append(_rank(verify(query, truth, cat.get, calibration), cat.query_labels[n]))
    rows = []
    ivf: Any = faiss.extract_index_ivf(index.index)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        vote_ms, total_ms, ranks, vote_cpu, total_cpu = [], [], [], [], []
        for n in tqdm(chosen, desc=f"{cat.photos} photos, nprobe {nprobe}", unit="query"):
            query = cat.queries[n]
            start, cpu = time.perf_counter(), time.process_time()
            evidence = matcher.candidates(query, entries, Filters(), top=10, photos=3)
            voted, voted_cpu = time.perf_counter(), time.process_time()
            verified = verify(query, evidence, cat.get, calibration)
            total_ms.append((time.perf_counter() - start) * 1000)
            vote_ms.append((voted - start) * 1000)
            total_cpu.append((time.process_time() - cpu) * 1000)
            vote_cpu.append((voted_cpu - cpu) * 1000)
            ranks.append(_rank(verified, cat.query_labels[n]))
        rows.append(_row(cat, index, path, ranks, exact_ranks, vote_ms, total_ms))
        # CPU time (every thread of the process): what a query costs whatever the load.
        rows[-1].update(
            vote_cpu_p50=statistics.median(vote_cpu), total_cpu_p50=statistics.median(total_cpu)
        )
        rows[-1].update(load_s=load_s, rss_mb=loaded, rss_added_mb=loaded - before)
        rows[-1]["load"] = load_average()
    return rows


def replay(cache: Path, path: Path, photos: int, changed: int) -> dict[str, Any]:
    """A fresh replica (this process) whose saved index of ``photos`` is ``2 * changed``
    photos behind: the first ``changed`` left the gallery and as many new ones joined since it
    was written. Its load time (reading the file, then replaying them) and resident memory."""
    cat = Catalogue(cache, photos + changed)
    ids = range(changed + 1, photos + changed + 1)
    entries = GalleryEntries.from_rows([(i, i, cat.label(i), None, None, None, None) for i in ids])
    matcher, took, before = _replica(cat, entries, path)
    assert matcher.builder is None and matcher.descriptors.images == set(ids)
    return {
        "replayed": 2 * changed,
        "replay_load_s": took,
        "replay_rss_mb": rss_mb(),
        "replay_rss_added_mb": rss_mb() - before,
        "replay_load": load_average(),
    }


def _row(
    cat: Catalogue,
    index: local.DescriptorIndex,
    path: Path,
    ranks: list[int],
    exact_ranks: list[int],
    vote_ms: list[float],
    total_ms: list[float],
) -> dict[str, Any]:
    ivf: Any = faiss.extract_index_ivf(index.index)
    return {
        "photos": cat.photos,
        "codes": local.compressed_layout(0).split("IVF")[0] + local.COMPRESSED,
        "lists": int(ivf.nlist),
        "nprobe": int(ivf.nprobe),
        "descriptors": index.count,
        "index_mb": path.stat().st_size / 2**20,
        "vote_p50": statistics.median(vote_ms),
        "vote_p90": pct(vote_ms, 90),
        "total_p50": statistics.median(total_ms),
        "total_p90": pct(total_ms, 90),
        "map5": _map5(ranks),
        "exact_map5": _map5(exact_ranks),
        "top1": sum(r == 1 for r in ranks) / len(ranks),
        "queries": len(ranks),
        "ranks": ranks,
        "exact_ranks": exact_ranks,
    }


def _rank(verified: list[Any], truth: str) -> int:
    order = [e.label for e in sorted(verified, key=lambda e: -(e.score or 0.0))]
    return order.index(truth) + 1 if truth in order[:5] else 0


def _map5(ranks: list[int]) -> float:
    return sum(1.0 / r for r in ranks if r) / len(ranks)


def table(results: Path) -> str:
    """The markdown table of every row in ``results`` (one JSON object a line)."""
    lines = [
        "| photos | index | descriptors | build s (once) | load s (from the file) "
        "| RSS MiB after load (added by it) | index file MiB | vote p50 / p90 ms "
        "| vote + verification p50 / p90 ms | CPU ms p50: vote / vote + verification "
        "| MAP@5 known (top-1) | MAP@5, exact search | queries | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in results.read_text().splitlines():
        r = json.loads(line)
        lines.append(
            f"| {r['photos']:,} | IVF{r['lists']} {r['codes']}, nprobe {r['nprobe']} "
            f"| {r['descriptors']:,} | {r['build_s']:.0f} | {r['load_s']:.1f} "
            f"| {r['rss_mb']:.0f} ({r['rss_added_mb']:.0f}) | {r['index_mb']:.0f} "
            f"| {r['vote_p50']:.0f} / {r['vote_p90']:.0f} "
            f"| {r['total_p50']:.0f} / {r['total_p90']:.0f} "
            f"| {r['vote_cpu_p50']:.0f} / {r['total_cpu_p50']:.0f} "
            f"| {r['map5']:.3f} ({r['top1']:.3f}) | {r['exact_map5']:.3f} | {r['queries']} "
            f"| {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--max-queries", type=int, default=150)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--queries", type=int, default=None, help="at most this many queries")
    parser.add_argument("--table", type=Path, help="write the results' markdown table here")
    parser.add_argument("--nprobes", default=str(local.COMPRESSED_NPROBE))
    parser.add_argument(
        "--replay", type=int, default=0, help="then a replica this many photos behind"
    )
    parser.add_argument("--answer", type=int, help=argparse.SUPPRESS)  # the fresh replica
    parser.add_argument("--replayed", type=int, help=argparse.SUPPRESS)  # the one behind
    args = parser.parse_args()
    results = args.scratch / "results.jsonl"
    if args.table:
        args.table.write_text(table(results))
        return
    cache = extract_real(args.scratch, args.max_queries)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.replayed:
        path = index_file(args.scratch, args.replayed)
        row = replay(cache, path, args.replayed, args.replay // 2)
        (args.scratch / f"replay-{args.replayed}.json").write_text(json.dumps(row))
        return
    if args.answer:
        cat = Catalogue(cache, args.answer)
        exact = exact_neighbours(cat, [args.answer], args.scratch)[args.answer]
        nprobes = [int(x) for x in args.nprobes.split(",")]
        rows = answer(cat, index_file(args.scratch, args.answer), exact, args.queries, nprobes)
        (args.scratch / f"answer-{args.answer}.json").write_text(json.dumps(rows))
        return
    exact_neighbours(Catalogue(cache, max(sizes)), sizes, args.scratch)
    for size in sizes:
        path = index_file(args.scratch, size)
        built = json.loads(path.with_suffix(".build.json").read_text()) if path.exists() else {}
        if not built:
            built = build(Catalogue(cache, size), path)
            path.with_suffix(".build.json").write_text(json.dumps(built))
        command = [sys.executable, __file__, "--scratch", str(args.scratch), "--answer", str(size)]
        command += ["--max-queries", str(args.max_queries), "--nprobes", args.nprobes]
        if args.queries:
            command += ["--queries", str(args.queries)]
        subprocess.run(command, check=True)
        replayed: dict[str, Any] = {}
        if args.replay:
            behind = [sys.executable, __file__, "--scratch", str(args.scratch)]
            behind += ["--replayed", str(size), "--replay", str(args.replay)]
            subprocess.run(behind + ["--max-queries", str(args.max_queries)], check=True)
            replayed = json.loads((args.scratch / f"replay-{size}.json").read_text())
            log.info("%s", replayed)
        for answered in json.loads((args.scratch / f"answer-{size}.json").read_text()):
            row = {**built, **answered, **replayed, "commit": git_commit()}
            log.info("%s", {k: v for k, v in row.items() if "ranks" not in k})
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
