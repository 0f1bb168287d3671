"""The numbered sections of ``bench/identify.py``'s report (docs/performance.md): per-stage
latency, gallery search, faiss against scikit-learn, and ``/identify`` against the bare embedder
with throughput. Each writes its lines through ``w`` from a run's records."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bench._common import fmt, size_name
from bench.identify_reading import framework_ms, transport_ms
from bench.identify_records import (
    CORES,
    PROFILED_PARTS,
    SMALL_SIZE,
    STAGES,
    E2EResult,
    SearchResult,
)


def stages(results: dict[str, Any], w: Callable[[str], None]) -> None:
    """## 1. Per-stage latency of ``/identify``, the galleries' set-up, the search threads."""
    search: list[SearchResult] = results["search"]
    e2e: list[E2EResult] = results["e2e"]
    small = search[0]
    w("## 1. Per-stage latency of `/identify` (3 MP JPEG)")
    w("")
    w(
        "Milliseconds, p50 / p90 over the sequential requests. *server* = sum of the stages; "
        "*outside* = client total − server stages (HTTP, multipart parsing, authentication "
        "and response serialisation; the active model's check runs beside the decoding)."
    )
    w("")
    header = "| gallery | " + " | ".join(STAGES) + " | server | outside | client total |"
    w(header + " other load |")
    w("|---" * (len(STAGES) + 5) + "|")
    for r in e2e:
        s = r.sequential
        cells = [
            f"{fmt(s['stages'][st]['p50'], 2)} / {fmt(s['stages'][st]['p90'], 2)}" for st in STAGES
        ]
        w(
            f"| {size_name(r.n)} | "
            + " | ".join(cells)
            + f" | {fmt(s['server_p50'])} | {fmt(s['outside_p50'])} | "
            f"**{fmt(s['total_p50'])}** / {fmt(s['total_p90'])} | "
            f"{fmt(s['others_cores'], 2)} |"
        )
    w("")
    w("Setting up each gallery (not part of a request):")
    w("")
    w(
        "| gallery | insert rows | `activate_model` (index built from the DB, saved) | "
        "server start until `/ready` (index loaded from file) |"
    )
    w("|---|---|---|---|")
    for r in e2e:
        w(
            f"| {size_name(r.n)} | {fmt(r.setup.get('insert_s', math.nan))} s | "
            f"{fmt(r.setup.get('activate_s', math.nan))} s | "
            f"{fmt(r.setup.get('startup_s', math.nan))} s |"
        )
    w("")
    ab = next((r for r in e2e if r.search_threads_ab), None)
    if ab is not None:
        w(
            "The service searches one query on the calling thread (`GalleryIndex.search_threads "
            "= 1`). The same data directory served in process, once as the service is and once "
            f"with the search on faiss's default of all {CORES} cores (gallery "
            f"{size_name(ab.n)}, {results['profile'].requests} requests each, p50 ms):"
        )
        w("")
        w("| search on | search stage | embed stage | database stage | client total |")
        w("|---|---|---|---|---|")
        for label, prof in ab.search_threads_ab.items():
            w(
                f"| {label}{' (the service)' if label == 'calling thread' else ''} | "
                f"{fmt(prof['stage: search'], 2)} | {fmt(prof['stage: embed'])} | "
                f"{fmt(prof['stage: database'], 2)} | {fmt(prof['client total'])} |"
            )
        w("")

    inter = results.get("interplay")
    if inter:
        w(
            f"Why, one request's steps in one process on the {size_name(small.n)} gallery "
            "(12 ms of Python work standing for decode + preprocess, the B5 inference, the "
            "search, 5 ms of Python work standing for the database stage), with onnxruntime's "
            "pool threads spinning after a run or not (`session.intra_op.allow_spinning`), "
            "and faiss on all cores or one. p50 ms:"
        )
        w("")
        w("| onnxruntime spinning | faiss threads | inference | search | the 5 ms after |")
        w("|---|---|---|---|---|")
        for row in inter:
            w(
                f"| {'on (default)' if row['spinning'] else 'off'} | "
                f"{row['faiss_threads']:.0f}"
                f"{' (faiss default)' if row['faiss_threads'] == CORES else ' (the service)'}"
                f" | {fmt(row['embed_p50'])} | {fmt(row['search_p50'], 2)} | "
                f"{fmt(row['after_p50'], 2)} |"
            )
        w("")


def search_section(results: dict[str, Any], w: Callable[[str], None]) -> None:
    """## 2. Gallery search + kNN head, and the nprobe trade-off."""
    search: list[SearchResult] = results["search"]
    stress: SearchResult | None = results.get("stress")
    large = search[-1]
    w("## 2. Gallery search + kNN head")
    w("")
    w(
        "| gallery | index | build | search p50 (1 core) | **search + head** p50 / p90 (1 core) "
        f"| search + head p50 ({CORES} cores) | exact scan p50 (1 core) | recall@50 | recall@5 "
        "| same first label | same 5 labels | other load |"
    )
    w("|---" * 12 + "|")
    for sr in [*search, *([stress] if stress else [])]:
        plan = (
            "flat (exact)"
            if sr.plan.kind == "flat"
            else f"IVF nlist {sr.plan.nlist}, nprobe {sr.plan.nprobe}"
        )
        name = size_name(sr.n) + (" isotropic" if sr.structure == "isotropic" else "")
        w(
            f"| {name} | {plan} | {fmt(sr.build_s)} s | "
            f"{fmt(sr.one_core.get('search_p50'), 2)} | "
            f"**{fmt(sr.one_core.get('total_p50'), 2)}** / "
            f"{fmt(sr.one_core.get('total_p90'), 2)} | "
            f"{fmt(sr.all_cores.get('total_p50'), 2)} | {fmt(sr.exact_one_core_p50, 2)} | "
            f"{sr.quality['recall50']:.4f} | {sr.quality['recall5']:.4f} | "
            f"{sr.quality['top1_agreement']:.3f} | {sr.quality['answer_agreement']:.3f} | "
            f"{fmt(sr.load.get('timed', math.nan), 2)} |"
        )
    w("")
    w(
        "Latencies in ms. *same first label* / *same 5 labels*: share of queries whose answer "
        "after the kNN head has the same first candidate / the same five labels in the same "
        "order as with exact search (the five include `new_individual` and the near-tie "
        "candidates after it, so this is the strictest measure). *other load*: cores kept busy "
        "by other processes on the machine while timing (0 = quiet)."
    )
    w("")
    w(
        "*build* = `GalleryIndex.build` with all cores: k-means training on `64 × nlist` sampled "
        "vectors plus adding every vector. The kNN head on 50 neighbours takes "
        f"{fmt(large.one_core.get('head_p50'), 3)} ms."
    )
    w("")
    for sr in [*search, *([stress] if stress else [])]:
        if not sr.sweep:
            continue
        w(
            f"nprobe trade-off at {size_name(sr.n)} ({sr.structure}, nlist {sr.plan.nlist}; "
            f"one core{'' if sr.sweep and 'total_p50' in sr.sweep[0] else ', recall only'}):"
        )
        w("")
        w(
            "| nprobe | share of lists | search + head p50 | recall@50 | recall@5 "
            "| same first label | same 5 labels |"
        )
        w("|---|---|---|---|---|---|---|")
        for row in sr.sweep:
            mark = " (chosen)" if int(row["nprobe"]) == sr.plan.nprobe else ""
            mark += " (old rule)" if int(row["nprobe"]) == max(16, sr.plan.nlist // 32) else ""
            w(
                f"| {row['nprobe']:.0f}{mark} | {row['nprobe'] / sr.plan.nlist:.1%} | "
                f"{fmt(row.get('total_p50', math.nan), 2)} ms | {row['recall50']:.4f} | "
                f"{row['recall5']:.4f} | {row['top1_agreement']:.3f} | "
                f"{row['answer_agreement']:.3f} |"
            )
        w("")


def sklearn_section(results: dict[str, Any], w: Callable[[str], None]) -> None:
    """## 3. faiss against scikit-learn."""
    search: list[SearchResult] = results["search"]
    w("## 3. faiss against scikit-learn")
    w("")
    w(
        "Same vectors, same process, k = 50, one query per call (as `/identify`). scikit-learn "
        '`NearestNeighbors(metric="cosine", algorithm="brute")` uses numpy/BLAS with all '
        "cores; faiss runs on one core. *batch* = 50 queries in one call, per query (faiss on all "
        "cores)."
    )
    w("")
    w(
        "| gallery | scikit-learn p50 | faiss exact (`IndexFlatIP`) p50 | ratio | service index "
        "p50 | ratio | batch: scikit-learn | batch: faiss exact | ratio | same ids |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    for sr in search:
        s = sr.sklearn
        if not s:
            continue
        w(
            f"| {size_name(sr.n)} | {fmt(s['sklearn_p50'], 1)} ms | {fmt(s['faiss_flat_p50'], 2)} "
            f"ms | **{s['sklearn_p50'] / s['faiss_flat_p50']:.0f}×** | "
            f"{fmt(s['faiss_index_p50'], 2)} ms | **{s['sklearn_p50'] / s['faiss_index_p50']:.0f}"
            f"×** | {fmt(s['sklearn_batch_per_query'], 2)} ms | "
            f"{fmt(s['faiss_flat_batch_per_query'], 2)} ms | "
            f"{s['sklearn_batch_per_query'] / s['faiss_flat_batch_per_query']:.1f}× | "
            f"{s['overlap']:.3f} |"
        )
    w("")


def embedder_section(results: dict[str, Any], w: Callable[[str], None]) -> None:
    """## 4. ``/identify`` against the bare embedder; where the time goes; throughput."""
    e2e: list[E2EResult] = results["e2e"]
    bare = results["bare"]
    bare_after = results.get("bare_after")
    jpeg = results["jpeg"]
    w("## 4. `/identify` against the bare embedder; throughput")
    w("")
    bares = [bare["embed_p50"]] + ([bare_after["embed_p50"]] if bare_after else [])
    bares += [r.sequential["bare_embed_p50"] for r in e2e if "bare_embed_p50" in r.sequential]
    w(
        "This VM's speed drifts over minutes even when no other process runs on it (other "
        f"tenants of the host: the bare embedder's p50 ranged from {fmt(min(bares))} to "
        f"{fmt(max(bares))} ms during this run), so the ratio pairs each block of 10 requests "
        "with 10 runs of the unavoidable work (decode + preprocess + embed of the same photo) "
        "just before it, in the bench process with the server idle; *rounds* "
        "gives the lowest and highest ratio of those blocks. Bare embedder measured alone at "
        f"the start of the run: p50 {fmt(bare['embed_p50'])} ms (p90 {fmt(bare['embed_p90'])} "
        "ms)"
        + (f", at the end: {fmt(bare_after['embed_p50'])} ms" if bare_after else "")
        + f"; in the same process decode {fmt(bare['decode_p50'], 2)} ms and preprocess "
        f"{fmt(bare['preprocess_p50'], 2)} ms."
    )
    w("")
    w(
        "| gallery | `/identify` p50 | decode + preprocess + embed p50 (paired) | **ratio** | "
        "rounds | bare embedder p50 (paired) | embed stage p50 in the server | `/identify` "
        "p99 |"
    )
    w("|---|---|---|---|---|---|---|---|")
    rows = [(size_name(r.n), r.sequential) for r in e2e] + [
        (
            f"{size_name(r.n)}, the photo downscaled by the client to {SMALL_SIZE[0]}×"
            f"{SMALL_SIZE[1]} ({jpeg['small_bytes'] / 1e3:.0f} kB)",
            r.downscaled,
        )
        for r in e2e
        if r.downscaled
    ]
    for name, s in rows:
        w(
            f"| {name} | {fmt(s['total_p50'])} ms | {fmt(s['bare_p50'])} ms | "
            f"**{s['ratio']:.3f}×** | {s['round_ratio_min']:.2f}–{s['round_ratio_max']:.2f}× | "
            f"{fmt(s.get('bare_embed_p50', math.nan))} ms | "
            f"{fmt(s['stages']['embed']['p50'])} ms | {fmt(s.get('total_p99', math.nan))} ms |"
        )
    w("")
    if e2e:
        ref = e2e[0]
        s = ref.sequential
        st = s["stages"]
        w(
            f"Where the time goes (gallery {size_name(ref.n)}, p50s, ms); the side work (the "
            "upload's hash, the active model's check, the photo kept and written) runs on "
            "another thread beside decode and preprocess and is in no row:"
        )
        w("")
        w("| part | ms | how measured |")
        w("|---|---|---|")
        w(f"| decode | {fmt(st['decode']['p50'], 2)} | Server-Timing |")
        w(
            f"| preprocess (resize to 380², float32) | {fmt(st['preprocess']['p50'], 2)} | "
            "Server-Timing |"
        )
        w(
            f"| embed stage − bare embedder | "
            f"{fmt(st['embed']['p50'] - s.get('bare_embed_p50', math.nan), 2)} | "
            "Server-Timing − paired bare p50 |"
        )
        w(f"| search + head | {fmt(st['search']['p50'] + st['head']['p50'], 2)} | Server-Timing |")
        w(
            f"| database (one transaction, five statements: image, embedding, individuals, "
            f"identification, candidates) | {fmt(st['database']['p50'], 2)} | Server-Timing |"
        )
        w(
            "| outside the pipeline (HTTP, multipart, auth, FastAPI) | "
            f"{fmt(s['outside_p50'], 2)} | client total − Server-Timing sum |"
        )
        w(
            f"| of which: HTTP round trip of a trivial request (`GET /health`) | "
            f"{fmt(s['health_p50'], 2)} | client |"
        )
        w("")
        prof = ref.request_profile
        if prof:
            w(
                "The same data directory served in process (uvicorn in a thread, timers wrapped "
                f"around the parts of a request; p50 ms over {results['profile'].requests} "
                "requests; the client shares the process, so the total is a little higher):"
            )
            w("")
            w("| part | ms |")
            w("|---|---|")
            parts = [
                "client total",
                "client: build the multipart request",
                "ASGI app, request in to response out",
                *PROFILED_PARTS,
                "pipeline (the six stages)",
                "embed stage: Embedder.embed",
                "database stage: the transaction",
                "Runtime.current (side work, beside the decoding)",
                "side work: write the photo file",
            ]
            for part in parts:
                if part in prof:
                    w(f"| {part} | {fmt(prof[part], 2)} |")
            w(
                f"| *derived:* FastAPI rest (routing, dependencies, thread hops, validation, "
                f"response) = ASGI − the parts above | {fmt(framework_ms(prof), 2)} |"
            )
            w(
                "| *derived:* transport (client send/receive, uvicorn HTTP parsing) = client total "
                f"− request build − ASGI | {fmt(transport_ms(prof), 2)} |"
            )
            w("")
        dec = results.get("decode")
        if dec:
            w(
                "Decode of the query JPEG in process (p50 ms): "
                + "; ".join(f"{k} {fmt(v, 2)}" for k, v in dec.items())
                + "."
            )
            w("")
    conc = next((r for r in e2e if r.concurrency), None)
    if conc is not None:
        w(
            f"Throughput, gallery {size_name(conc.n)}: each client is a thread with its own "
            f"connection sending requests back to back; {results['profile'].requests_per_level} "
            "requests per level and round, three rounds, each paired with the bare pipeline "
            "(decode + preprocess + embed in the bench process, the server idle) from as many "
            "threads, and one photo after another. The ratio is over the better of the two."
        )
        w("")
        w(
            "| clients | `/identify` photos/s | bare pipeline photos/s: threads / one by one | "
            "**ratio** | latency p50 | p90 | p99 | bare threads p50 / p99 | embed stage p50 | "
            "other load |"
        )
        w("|---|---|---|---|---|---|---|---|---|---|")
        for c in conc.concurrency:
            w(
                f"| {c['clients']:.0f} | {c['throughput']:.2f} | "
                f"{c.get('bare_threads_throughput', math.nan):.2f} / "
                f"{c.get('bare_sequential_throughput', math.nan):.2f} | "
                f"**{c.get('throughput_ratio', math.nan):.3f}×** | {fmt(c['p50'])} ms | "
                f"{fmt(c['p90'])} ms | {fmt(c.get('p99', math.nan))} ms | "
                f"{fmt(c.get('bare_threads_p50', math.nan))} / "
                f"{fmt(c.get('bare_threads_p99', math.nan))} ms | {fmt(c['embed_p50'])} ms | "
                f"{fmt(c['others_cores'], 2)} |"
            )
        w("")
