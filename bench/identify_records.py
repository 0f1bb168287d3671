"""What ``bench/identify.py`` measures and the records it returns: the sizes of a full and a
``--quick`` run (``Profile``), the constants of the synthetic data and of the targets, and the
dataclasses a run's figures come back in. Both halves import it: the measuring
(``identify_measure`` and its parts) and the report (``identify_report``), which re-renders from
saved records without measuring."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.gallery.index import IndexPlan
from service.settings import Settings

DEFAULT_MODEL = Path("/work/bench-cache/effb5-380.onnx")
DIM = 512
K = 50
CUTOFF = 0.62
IVF_THRESHOLD: int = Settings.model_fields["ivf_threshold"].default
CORES = os.cpu_count() or 1

# Synthetic gallery: Happywhale's train set has 51,033 photos of 15,587 individuals (3.3 each).
PHOTOS_PER_INDIVIDUAL = 3.3
N_SPECIES = 30
LATENT_DIM = 64  # "lowrank": embeddings live near a 64-dimensional subspace of the 512
SPECIES_WEIGHT = 0.5  # share of an individual's latent centre that its species explains
POSE_NOISE = 0.5  # per-photo variation inside the latent space (pose, light, water)
ISO_NOISE = 0.15  # per-photo variation in all 512 dimensions
PHOTO_NOISE = 0.6  # "isotropic": photo = random unit centre + 0.6 * random unit direction

# The 3-megapixel query photo.
JPEG_SIZE = (2000, 1500)
JPEG_NOISE = 11.0
JPEG_QUALITY = 90
SMALL_SIZE = (1000, 750)  # the same photo resized by the client before uploading

TARGETS = {
    "search_head_50k_1core_ms": 5.0,
    "search_head_1m_ms": 20.0,
    "recall_1m": 0.98,
    # /identify p50 over the unavoidable work (decode + preprocess + embed), same photo, same run
    "e2e_ratio": 1.05,
    # throughput under 1, 4 and 16 clients over the bare pipeline's on the same cores
    "throughput_ratio": 0.95,
}


@dataclass(frozen=True)
class Profile:
    """How much work a run does: the full run or the ``--quick`` smoke run."""

    e2e_sizes: tuple[int, ...]
    search_sizes: tuple[int, ...]  # the first is the "50k" row, the last the "1M" row
    sweep: tuple[int, ...]  # nprobe values tried on the largest IVF gallery
    sklearn_sizes: tuple[int, ...]
    stress_size: int  # isotropic gallery (0: skip)
    queries: int  # query vectors for recall
    timed_queries: int  # of which timed one by one
    requests: int  # sequential /identify requests per gallery size
    embed_reps: int
    concurrency: tuple[int, ...]
    requests_per_level: int  # per concurrency level and round, all clients together
    sklearn_reps_small: int
    sklearn_reps_large: int


FULL = Profile(
    e2e_sizes=(1_000, 50_000, 1_000_000),
    search_sizes=(50_000, 200_000, 1_000_000),
    sweep=(64, 128, 256, 384, 512, 768, 1024, 1536),
    sklearn_sizes=(50_000, 1_000_000),
    stress_size=1_000_000,
    queries=300,
    timed_queries=200,
    requests=60,
    embed_reps=40,
    concurrency=(1, 4, 16),
    requests_per_level=32,
    sklearn_reps_small=30,
    sklearn_reps_large=5,
)
QUICK = Profile(
    e2e_sizes=(1_000, 20_000),
    search_sizes=(20_000, 200_000),
    sweep=(64, 384, 512, 768),
    sklearn_sizes=(20_000,),
    stress_size=200_000,
    queries=100,
    timed_queries=60,
    requests=10,
    embed_reps=10,
    concurrency=(1, 4),
    requests_per_level=8,
    sklearn_reps_small=10,
    sklearn_reps_large=2,
)


STAGES = ("decode", "preprocess", "embed", "search", "head", "database")

# The parts of a request, one after another (the rest is the framework's); Runtime.current
# runs inside the pipeline, beside the decoding.
PROFILED_PARTS = (
    "auth: API key lookup (in the thread pool)",
    "multipart parsing",
    "Runtime.identify (the one hop)",
)


NOISY = 0.25  # cores used by other processes above which a phase is measured again


@dataclass
class SearchResult:
    n: int
    structure: str
    plan: IndexPlan
    build_s: float
    exact_batch_ms: float
    exact_one_core_p50: float
    quality: dict[str, float]
    one_core: dict[str, float]
    all_cores: dict[str, float]
    sweep: list[dict[str, float]] = field(default_factory=list)
    sklearn: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)


@dataclass
class E2EResult:
    n: int
    setup: dict[str, float]
    sequential: dict[str, Any]
    concurrency: list[dict[str, float]] = field(default_factory=list)
    search_threads_ab: dict[str, dict[str, float]] = field(default_factory=dict)
    request_profile: dict[str, float] = field(default_factory=dict)
    downscaled: dict[str, Any] | None = None


# --------------------------------------------------------------------------- as JSON


def save_results(path: Path, results: dict[str, Any]) -> None:
    """A run's records as JSON (``--json``), for ``load_results`` to read back."""
    path.write_text(json.dumps(results, default=_jsonable, indent=2))


def load_results(path: Path) -> dict[str, Any]:
    """The figures of a run saved with --json, as ``run`` left them."""
    raw = json.loads(path.read_text())

    def search(d: dict[str, Any]) -> SearchResult:
        return SearchResult(**{**d, "plan": IndexPlan(**d["plan"])})

    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in raw["profile"].items()
    }
    raw["profile"] = Profile(**fields)
    raw["search"] = [search(d) for d in raw["search"]]
    if raw.get("stress"):
        raw["stress"] = search(raw["stress"])
    known = set(E2EResult.__dataclass_fields__)
    raw["e2e"] = [E2EResult(**{k: v for k, v in d.items() if k in known}) for d in raw["e2e"]]
    return dict(raw)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return {k: getattr(o, k) for k in o.__dataclass_fields__}
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
