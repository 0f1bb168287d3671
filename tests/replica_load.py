"""A mixed load on whaleid replicas (identifying, deciding, merging and splitting clients),
and a check that each replica's live gallery equals the database's. Used by
tests/service/gallery/test_gallery_replay.py and by bench/replicas.py."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import httpx
import numpy as np
from sqlalchemy import text

from service.db.tables import make_engine
from service.settings import Settings
from tests.toy import encode, photo

DIGEST_FIELDS = ("count", "ids_sha256", "vectors_sha256", "labels_sha256")


def _held(blobs: list[bytes], precision: str) -> bytes:
    """The vectors as an index of ``precision`` holds them, float32 bytes: rounded to half
    floats by faiss's own encoder (not the service's code) when the gallery is float16."""
    if precision == "float32" or not blobs:
        return b"".join(blobs)
    vectors = np.stack([np.frombuffer(b, "<f4") for b in blobs])
    quantizer = faiss.ScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16)
    return bytes(quantizer.decode(quantizer.compute_codes(vectors)).astype("<f4").tobytes())


def default_precision() -> str:
    """How the service holds a gallery's vectors by default (``WHALEID_GALLERY_FLOAT16``)."""
    return "float16" if Settings.model_fields["gallery_float16"].default else "float32"


def database_digest(url: str, model_id: int, precision: str | None = None) -> dict[str, Any]:
    """The gallery the database describes, fingerprinted as ``GET /gallery/digest`` does, but
    computed here from plain SQL (not through the service's own gallery code), its vectors as a
    gallery of ``precision`` (the service's default if None) holds them."""
    engine = make_engine(url)
    with engine.connect() as conn:
        individuals = conn.execute(
            text("SELECT id, catalogue_id, merged_into_id FROM individuals")
        ).all()
        rows = conn.execute(
            text(
                "SELECT e.id, e.vector, i.individual_id FROM embeddings e "
                "JOIN images i ON i.id = e.image_id "
                "WHERE e.model_id = :model AND i.individual_id IS NOT NULL ORDER BY e.id"
            ),
            {"model": model_id},
        ).all()
    engine.dispose()
    names = {i: code for i, code, _ in individuals}
    merged_into = {i: into for i, _, into in individuals}

    def label(individual: int) -> str:
        while merged_into[individual] is not None:
            individual = merged_into[individual]
        return str(names[individual])

    return {
        "count": len(rows),
        "ids_sha256": hashlib.sha256(np.array([r[0] for r in rows], "<i8").tobytes()).hexdigest(),
        "vectors_sha256": hashlib.sha256(
            _held([bytes(r[1]) for r in rows], precision or default_precision())
        ).hexdigest(),
        "labels_sha256": hashlib.sha256(
            "".join(f"{r[0]}\t{label(r[2])}\n" for r in rows).encode()
        ).hexdigest(),
    }


def differences(live: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The digest fields in which a replica's live gallery differs from the database's."""
    return [f"{k}: {live[k]} != {expected[k]}" for k in DIGEST_FIELDS if live[k] != expected[k]]


def check_replicas(urls: list[str], admin_key: str, database_url: str, model_id: int) -> list[str]:
    """Each replica's ``GET /gallery/digest`` against the database: the differences, if any."""
    expected: dict[str, dict[str, Any]] = {}  # by how the replica holds its vectors
    found = []
    for url in urls:
        live = httpx.get(
            f"{url}/gallery/digest", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
        ).json()
        precision = live["vectors"]
        if precision not in expected:
            expected[precision] = database_digest(database_url, model_id, precision)
        found += [f"{url}: {d}" for d in differences(live, expected[precision])]
    return found


@dataclass
class Load:
    """What the clients of one round saw: statuses and latencies (ms) by kind of request,
    server errors (5xx) and transport errors, and what the deciders made, for the editor."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    placed: list[tuple[str, int]] = field(default_factory=list)  # (individual, image id)
    created: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, response: httpx.Response) -> httpx.Response:
        with self.lock:
            self.statuses[f"{what} {response.status_code}"] += 1
            self.latencies[what].append(response.elapsed.total_seconds() * 1000)
            if response.status_code >= 500:
                self.errors.append(f"{what}: {response.status_code} {response.text[:200]}")
        return response


@dataclass(frozen=True)
class Mix:
    """How many clients of each kind run at once."""

    identifiers: int = 2  # /identify of catalogue photos
    deciders: int = 3  # /identify of a new photo, then confirm, new individual or reject
    editors: int = 1  # merges and splits of what the deciders made


def identifier(client: httpx.Client, load: Load, rng: random.Random) -> None:
    shot = rng.randrange(3)  # catalogue photos: the answer should not change under us
    load.record(
        "identify",
        client.post(
            "/identify", files={"photo": ("q.png", encode(photo(rng.randrange(12), shot)))}
        ),
    )


def decider(client: httpx.Client, load: Load, rng: random.Random, shots: Iterator[int]) -> None:
    animal = rng.randrange(16)  # 12 known animals, 4 unknown ones
    answer = load.record(
        "identify",
        client.post(
            "/identify", files={"photo": ("q.png", encode(photo(animal, 100 + next(shots))))}
        ),
    )
    if answer.status_code != 200:
        return
    body = answer.json()
    url = f"/identifications/{body['identification_id']}/decision"
    choice = rng.random()
    if choice < 0.5:
        target = f"ind-{rng.randrange(12)}"
        decision: dict[str, Any] = {"decision": "confirm", "individual_id": target}
    elif choice < 0.75:
        target = f"N{body['identification_id']}"
        decision = {"decision": "new_individual", "code": target}
    else:
        target, decision = "", {"decision": "reject"}
    response = load.record(decision["decision"], client.post(url, json=decision))
    if response.status_code == 200 and target:
        with load.lock:
            load.placed.append((target, body["query_image_id"]))
            if decision["decision"] == "new_individual":
                load.created.append(target)
    if response.status_code == 200 and rng.random() < 0.2:  # change one's mind
        load.record("supersede", client.post(url, json={"decision": "reject", "supersede": True}))


def editor(client: httpx.Client, load: Load, rng: random.Random, shots: Iterator[int]) -> None:
    with load.lock:
        created = list(load.created)
        placed = list(load.placed)
    if created and rng.random() < 0.5:
        source = created[rng.randrange(len(created))]
        into = f"ind-{rng.randrange(12)}"
        load.record("merge", client.post(f"/individuals/{source}/merge", json={"into": into}))
    elif placed:
        source, image_id = placed[rng.randrange(len(placed))]
        body = {"image_ids": [image_id], "new_individual_id": f"S{next(shots)}"}
        load.record("split", client.post(f"/individuals/{source}/split", json=body))
    time.sleep(0.05)


def run_round(
    urls: list[str],
    keys: dict[str, str],
    seconds: float,
    seed: int,
    shots: Iterator[int],
    mix: Mix = Mix(),
) -> Load:
    """The ``mix`` of clients for ``seconds``, each request sent to a replica drawn at random."""
    load, stop = Load(), threading.Event()
    workers: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
        *[("integration", identifier, ())] * mix.identifiers,
        *[("curator", decider, (shots,))] * mix.deciders,
        *[("curator", editor, (shots,))] * mix.editors,
    ]

    def client_loop(n: int, role: str, step: Callable[..., None], args: tuple[Any, ...]) -> None:
        rng = random.Random(seed * 100 + n)
        headers = {"Authorization": f"Bearer {keys[role]}"}
        clients = [httpx.Client(base_url=u, headers=headers, timeout=60) for u in urls]
        try:
            while not stop.is_set():
                try:
                    step(clients[rng.randrange(len(clients))], load, rng, *args)
                except httpx.TransportError as e:
                    with load.lock:
                        load.errors.append(f"{step.__name__}: {e!r}")
        finally:
            for c in clients:
                c.close()

    threads = [threading.Thread(target=client_loop, args=(n, *w)) for n, w in enumerate(workers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return load
