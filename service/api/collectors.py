"""Prometheus metrics of one worker process: request latency per route template, the stages of
an identification, the loaded gallery, the decode/embed slots and the job queue.

Every label takes a bounded set of values: the route *template* (``/identifications/{id}``, never
the raw path), the method (a standard one, else "other"), the status class, a stage name, a
model. Each app gets its own registry (no module globals), so two apps in one process (tests) do
not mix their counts."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.db.tables import Job
from service.jobs.queue import LIVE_STATES
from service.matching.runtime import Runtime

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "unmatched"
# The methods the API answers; any other (h11 takes any token as a method) is counted as OTHER.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The metrics of one app; ``render`` writes them in Prometheus' text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "whaleid_request_duration_seconds",
            "Time from the request's arrival to the end of its response, per route template.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "whaleid_identify_stage_seconds",
            "Time of each stage of one photo's identification (decode, preprocess, embed, "
            "search, head, database).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method_label(method), route, f"{status // 100}xx").observe(seconds)

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        """Record an identification's stage timings (milliseconds, as in Server-Timing)."""
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def watch(self, runtime: Runtime, engine: Engine) -> None:
        """Add the gauges read at scrape time: the loaded gallery, the slots, the job queue."""
        self.registry.register(_RuntimeCollector(runtime))
        self.registry.register(JobQueueCollector(lambda: engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def method_label(method: str) -> str:
    """``method`` if it is a standard one, else ``OTHER``: the label takes a bounded set."""
    return method if method in STANDARD_METHODS else OTHER


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        gallery = GaugeMetricFamily(
            "whaleid_gallery_embeddings",
            "Embeddings in the loaded gallery of a model (this process loads the active one).",
            labels=["model"],
        )
        loaded = self.runtime.loaded
        if loaded is not None:
            name = f"{loaded.model.name}:{loaded.model.version}"
            gallery.add_metric([name], loaded.gallery.size)
        yield gallery
        in_use = GaugeMetricFamily(
            "whaleid_slots_in_use", "Decode or embed slots held right now.", labels=["step"]
        )
        capacity = GaugeMetricFamily(
            "whaleid_slots", "Decode or embed slots of this process.", labels=["step"]
        )
        for slots in (self.runtime.slots.decode, self.runtime.slots.embed):
            in_use.add_metric([slots.step], slots.in_use)
            capacity.add_metric([slots.step], slots.count)
        yield in_use
        yield capacity


class JobQueueCollector(Collector):
    """Depth and age of the job queue, from the ``jobs`` table (nothing is reported on a schema
    from before it, so a scrape never fails on an old database)."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self.engine = engine
        self._has_table = False

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "whaleid_jobs", "Jobs waiting or running, per kind and state.", labels=["kind", "state"]
        )
        age = GaugeMetricFamily(
            "whaleid_job_oldest_age_seconds",
            "Age of the oldest job waiting or running, per kind and state.",
            labels=["kind", "state"],
        )
        try:
            for kind, state, count, oldest in self._live_jobs():
                depth.add_metric([kind, state], count)
                age.add_metric([kind, state], _age_seconds(oldest))
        except SQLAlchemyError as e:  # a scrape must not fail because the database blinked
            log.warning("job queue metrics unavailable: %s", e)
        yield depth
        yield age

    def _live_jobs(self) -> list[tuple[str, str, int, dt.datetime | None]]:
        engine = self.engine()
        if not self._has_table:
            self._has_table = inspect(engine).has_table("jobs")
            if not self._has_table:
                return []
        query = (
            select(Job.kind, Job.state, func.count(), func.min(Job.created_at))
            .where(Job.state.in_(LIVE_STATES))
            .group_by(Job.kind, Job.state)
        )
        with engine.connect() as conn:
            return [
                (kind, state, count, oldest) for kind, state, count, oldest in conn.execute(query)
            ]


def _age_seconds(created: dt.datetime | None) -> float:
    if created is None:
        return 0.0
    if created.tzinfo is None:  # SQLite keeps no zone; the service writes UTC
        created = created.replace(tzinfo=dt.UTC)
    return max(0.0, (dt.datetime.now(dt.UTC) - created).total_seconds())
