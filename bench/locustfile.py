"""The users of bench/platform_load.py: what a Flukebook-style platform sends to whaleid.

Each request goes to one of the replicas in WHALEID_LOAD_URLS at random. Statuses, acknowledged
decisions and batch jobs are written to WHALEID_LOAD_OUT (JSON) when the run stops.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.toy import encode, photo  # noqa: E402

URLS = os.environ.get("WHALEID_LOAD_URLS", "http://127.0.0.1:8000").split(",")
KEYS: dict[str, str] = json.loads(os.environ.get("WHALEID_LOAD_KEYS", "{}"))
OUT = os.environ.get("WHALEID_LOAD_OUT", "load.json")
INDIVIDUALS = 12
SHOTS = itertools.count(1000)

statuses: Counter[str] = Counter()
acknowledged: list[dict[str, Any]] = []
jobs: list[dict[str, Any]] = []


@events.request.add_listener
def _count(name: str, response: Any, exception: Any, **_: Any) -> None:
    code = getattr(response, "status_code", 0) if exception is None else 0
    statuses[f"{name} {code}"] += 1


@events.quitting.add_listener
def _write(**_: Any) -> None:
    Path(OUT).write_text(
        json.dumps({"statuses": statuses, "acknowledged": acknowledged, "jobs": jobs})
    )


def _replica() -> str:
    return random.choice(URLS)


class Platform(HttpUser):
    abstract = True
    role = "integration"

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {KEYS[self.role]}"

    def identify(self, individual: int, shot: int) -> dict[str, Any] | None:
        files = {"photo": ("q.png", encode(photo(individual, shot)))}
        with self.client.post(
            f"{_replica()}/identify", files=files, name="/identify", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                return None
            body: dict[str, Any] = r.json()
            return body


class Identifier(Platform):
    """Identifies photos of catalogue animals."""

    weight = 4
    wait_time = between(0.1, 0.5)

    @task
    def known(self) -> None:
        self.identify(random.randrange(INDIVIDUALS), random.randrange(3))


class Curator(Platform):
    """Identifies a new photo, then confirms, declares a new individual or rejects."""

    weight = 4
    role = "curator"
    wait_time = between(0.2, 0.8)

    @task
    def decide(self) -> None:
        animal = random.randrange(INDIVIDUALS + 4)  # 4 animals not in the catalogue
        body = self.identify(animal, next(SHOTS))
        if body is None:
            return
        ident = body["identification_id"]
        choice = random.random()
        if choice < 0.5:
            decision = {"decision": "confirm", "individual_id": f"ind-{random.randrange(12)}"}
        elif choice < 0.75:
            decision = {"decision": "new_individual", "code": f"N{ident}"}
        else:
            decision = {"decision": "reject"}
        with self.client.post(
            f"{_replica()}/identifications/{ident}/decision",
            json=decision,
            name="/identifications/{id}/decision",
            catch_response=True,
        ) as r:
            if r.status_code == 200:
                acknowledged.append({"identification_id": ident, **decision})
            else:
                r.failure(f"{r.status_code}")


class Batch(Platform):
    """Submits a ZIP of eight photos as a batch job and polls it to the end."""

    weight = 1
    wait_time = between(2, 5)

    @task
    def batch(self) -> None:
        animals = [random.randrange(INDIVIDUALS) for _ in range(8)]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for n, a in enumerate(animals):
                zf.writestr(f"{n}_ind-{a}.png", encode(photo(a, next(SHOTS))))
        r = self.client.post(
            f"{_replica()}/jobs/identify/archive",
            files={"archive": ("batch.zip", buffer.getvalue())},
            name="/jobs/identify/archive",
        )
        if r.status_code != 202:
            return
        job_id = r.json()["id"]
        started = time.monotonic()
        while time.monotonic() - started < 120:
            job = self.client.get(f"{_replica()}/jobs/{job_id}", name="/jobs/{id}").json()
            if job.get("state") not in ("queued", "running"):
                break
            time.sleep(0.5)
        jobs.append(
            {
                "id": job_id,
                "state": job.get("state"),
                "done": job.get("done"),
                "failed": job.get("failed"),
                "seconds": round(time.monotonic() - started, 2),
            }
        )
