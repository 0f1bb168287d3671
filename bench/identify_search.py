"""Section 2 and 3 of ``bench/identify.py``: ``GalleryIndex.build``/``search`` and the kNN head
one query at a time (recall against exact search, an ``nprobe`` sweep), and faiss against
scikit-learn on the same vectors."""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from bench._common import p50, p90, stopwatch
from bench.identify_data import Synthetic
from bench.identify_machine import guarded, load_meter
from bench.identify_records import CORES, CUTOFF, DIM, IVF_THRESHOLD, K, Profile, SearchResult
from service.contract import Ranking
from service.gallery.index import GalleryIndex
from service.knn import Neighbour, rank_candidates

log = logging.getLogger("bench.identify")


def _answer(syn: Synthetic, distances: np.ndarray, ids: np.ndarray) -> list[str]:
    """The kNN head's five labels for one search result (ids are gallery positions + 1)."""
    neighbours = [
        Neighbour(syn.label(int(i) - 1), float(d), int(i))
        for d, i in zip(distances, ids, strict=True)
    ]
    return [c.label for c in rank_candidates(neighbours, cutoff=CUTOFF, ranking=Ranking.VOTE)]


def _search_head(syn: Synthetic, index: GalleryIndex, q: np.ndarray) -> tuple[float, float]:
    """One query through GalleryIndex.search and the kNN head; (search ms, head ms)."""
    t0 = time.perf_counter()
    distances, ids = index.search(q, K)
    t1 = time.perf_counter()
    _answer(syn, distances, ids)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def _quality(
    syn: Synthetic, index: GalleryIndex, truth_ids: np.ndarray, truth_answers: list[list[str]]
) -> dict[str, float]:
    """recall@50 and recall@5 against exact search, and how often the answer is the same as with
    exact search: its first label, and all five labels in order."""
    r50 = r5 = same = first = 0.0
    for j, q in enumerate(syn.queries):
        distances, ids = index.search(q, K)
        r50 += len(set(ids.tolist()) & set(truth_ids[j].tolist())) / K
        r5 += len(set(ids[:5].tolist()) & set(truth_ids[j][:5].tolist())) / 5
        answer = _answer(syn, distances, ids)
        same += answer == truth_answers[j]
        first += answer[0] == truth_answers[j][0]
    n = len(syn.queries)
    return {
        "recall50": r50 / n,
        "recall5": r5 / n,
        "top1_agreement": first / n,
        "answer_agreement": same / n,
    }


def _search_threads(index: GalleryIndex, threads: int) -> None:
    """Search with ``threads`` OpenMP threads. The service searches on the calling thread
    (``GalleryIndex.search_threads``, which ``search`` applies); this overrides it for one index."""
    faiss.omp_set_num_threads(threads)
    index.search_threads = threads


def _timed(syn: Synthetic, index: GalleryIndex, threads: int, count: int) -> dict[str, float]:
    _search_threads(index, threads)
    try:
        for q in syn.queries[:5]:  # warm-up
            index.search(q, K)
        search, head, both = [], [], []
        for q in syn.queries[:count]:
            s, h = _search_head(syn, index, q)
            search.append(s)
            head.append(h)
            both.append(s + h)
    finally:
        faiss.omp_set_num_threads(CORES)
        index.__dict__.pop("search_threads", None)
    return {
        "search_p50": p50(search),
        "search_p90": p90(search),
        "head_p50": p50(head),
        "total_p50": p50(both),
        "total_p90": p90(both),
    }


def bench_search(
    syn: Synthetic,
    profile: Profile,
    *,
    sweep: Sequence[int] = (),
    with_sklearn: bool = False,
    timed: bool = True,
) -> SearchResult:
    n = len(syn.vectors)
    ids = np.arange(1, n + 1, dtype=np.int64)
    faiss.omp_set_num_threads(CORES)
    with stopwatch(f"GalleryIndex.build({n:,} {syn.structure})", log) as built:
        index = GalleryIndex.build(ids, syn.vectors, DIM, IVF_THRESHOLD)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(syn.vectors)
    t0 = time.perf_counter()
    scores, positions = exact.search(syn.queries, K)
    exact_batch_ms = (time.perf_counter() - t0) * 1000 / len(syn.queries)
    truth_ids = positions + 1
    truth_answers = [_answer(syn, 1.0 - scores[j], truth_ids[j]) for j in range(len(syn.queries))]
    quality = _quality(syn, index, truth_ids, truth_answers)
    load: dict[str, float] = {}
    one: dict[str, float] = {}
    every: dict[str, float] = {}
    exact_one = math.nan
    if timed:

        def measure() -> tuple[dict[str, float], dict[str, float], float, float]:
            meter: dict[str, float] = {}
            with load_meter(meter, "timed"):
                one = _timed(syn, index, 1, profile.timed_queries)
                every = _timed(syn, index, CORES, profile.timed_queries)
                exact_one = _exact_one_core(syn, exact, 20 if n > 200_000 else 50)
            return one, every, exact_one, meter["timed"]

        one, every, exact_one, load["timed"] = guarded(
            f"search timing at {n:,}", measure, lambda r: r[3]
        )
    log.info(
        "%s %s n=%d: build %.1f s, one core p50 %.2f ms, recall@50 %.4f",
        syn.structure,
        index.plan,
        n,
        built["s"],
        one.get("total_p50", math.nan),
        quality["recall50"],
    )
    result = SearchResult(
        n, syn.structure, index.plan, built["s"], exact_batch_ms, exact_one, quality, one, every
    )
    result.load = load
    if index.plan.kind == "ivf":
        for nprobe in sorted({*sweep, index.plan.nprobe}):
            if nprobe > index.plan.nlist:
                continue
            index.index.nprobe = nprobe
            row = {"nprobe": nprobe, **_quality(syn, index, truth_ids, truth_answers)}
            if timed:
                row.update(_timed(syn, index, 1, min(100, profile.timed_queries)))
            log.info("nprobe %d: %s", nprobe, {k: round(v, 4) for k, v in row.items()})
            result.sweep.append(row)
        index.index.nprobe = index.plan.nprobe
    if with_sklearn:
        result.sklearn = bench_sklearn(syn, exact, index, profile)
    return result


def _exact_one_core(syn: Synthetic, exact: Any, count: int) -> float:
    """p50 of one query against ``IndexFlatIP`` (a full exact scan) on one core."""
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in syn.queries[: count + 2]:
            t0 = time.perf_counter()
            exact.search(q[np.newaxis], K)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        faiss.omp_set_num_threads(CORES)
    return p50(times[2:])


def bench_sklearn(
    syn: Synthetic, exact: Any, index: GalleryIndex, profile: Profile
) -> dict[str, float]:
    """scikit-learn brute-force cosine kNN against faiss on the same vectors, one query at a time
    (what /identify does) and as a batch of 50 queries."""
    from sklearn.neighbors import NearestNeighbors  # type: ignore[import-untyped]

    n = len(syn.vectors)
    reps = profile.sklearn_reps_small if n <= 100_000 else profile.sklearn_reps_large
    with stopwatch(f"scikit-learn NearestNeighbors fit + {reps} queries at {n:,}", log):
        nn = NearestNeighbors(n_neighbors=K, metric="cosine", algorithm="brute").fit(syn.vectors)
        nn.kneighbors(syn.queries[:1], K)  # warm-up
        sk_times, overlap = [], []
        for j in range(reps):
            q = syn.queries[j : j + 1]
            t0 = time.perf_counter()
            _, sk_ids = nn.kneighbors(q, K)
            sk_times.append((time.perf_counter() - t0) * 1000)
            _, fa_ids = exact.search(q, K)
            overlap.append(len(set(sk_ids[0].tolist()) & set(fa_ids[0].tolist())) / K)
        batch = syn.queries[:50]
        t0 = time.perf_counter()
        nn.kneighbors(batch, K)
        sk_batch = (time.perf_counter() - t0) * 1000 / len(batch)
    faiss.omp_set_num_threads(CORES)
    t0 = time.perf_counter()
    exact.search(batch, K)
    fa_batch = (time.perf_counter() - t0) * 1000 / len(batch)
    faiss.omp_set_num_threads(1)
    flat_times, index_times = [], []
    for q in syn.queries[: max(reps, 30)]:
        t0 = time.perf_counter()
        exact.search(q[np.newaxis], K)
        t1 = time.perf_counter()
        index.search(q, K)
        t2 = time.perf_counter()
        flat_times.append((t1 - t0) * 1000)
        index_times.append((t2 - t1) * 1000)
    faiss.omp_set_num_threads(CORES)
    result = {
        "sklearn_p50": p50(sk_times),
        "faiss_flat_p50": p50(flat_times),
        "faiss_index_p50": p50(index_times),
        "sklearn_batch_per_query": sk_batch,
        "faiss_flat_batch_per_query": fa_batch,
        "overlap": float(np.mean(overlap)),
        "reps": reps,
    }
    log.info("sklearn vs faiss at %d: %s", n, {k: round(v, 3) for k, v in result.items()})
    del nn
    gc.collect()
    return result
