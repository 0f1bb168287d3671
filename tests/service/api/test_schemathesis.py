"""The whole OpenAPI, fuzzed by schemathesis against a real uvicorn on PostgreSQL with an admin
key: no 5xx, and every response matches its schema. Schemathesis' own examples rarely reach
integers beyond 64 bits, NUL characters or numbers that are not finite, so those are sent
explicitly, to every parameter of every operation."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.failures import FailureGroup

from service.db import migrate
from service.settings import Settings
from tests.conftest import LiveServer, load_catalogue, run_server
from tests.toy import encode, photo

log = logging.getLogger(__name__)
CHECKS = [not_a_server_error, response_schema_conformance]
# Revoking keys is tested on its own (test_operations): here it could revoke the key in use.
EXCLUDED = {("DELETE", "/keys/{key_id}")}
EXAMPLES = 15
NUL = "x\x00y"
EDGE_INTEGERS = [2**64, -(2**64), 2**63 - 1, 0]
EDGE_STRINGS = [NUL, "9" * 5000, " new_individual "]


@pytest.fixture
def fuzzed(postgres_url: str, tmp_path: Path, toy_model: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url, _env_file=None)  # type: ignore[call-arg]
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url)
    load_catalogue(settings, tmp_path / "catalogue", toy_model, individuals=6, shots=(0, 1))
    yield from run_server(settings)


def _operations(live: LiveServer) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    return [op for op in operations if (op.method.upper(), op.path) not in EXCLUDED]


def _check(case: Any, live: LiveServer, session: requests.Session, failures: list[str]) -> None:
    try:
        start = time.perf_counter()
        response = case.call(base_url=live.url, session=session)
        seconds = time.perf_counter() - start
        if seconds > 1:  # (schemathesis' response.elapsed is a float of seconds)
            log.warning("slow: %s %s %.1f s", case.method, case.formatted_path[:80], seconds)
        case.validate_response(response, checks=CHECKS)
    except (Exception, FailureGroup) as e:  # collected: one run reports every failing operation
        failures.append(f"{case.method} {case.formatted_path}: {e}")


def _fuzz(operation: Any, live: LiveServer, session: requests.Session, failures: list[str]) -> None:
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            _check(case, live, session, failures)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
            log.info("%s %s: no %s cases", operation.method, operation.path, mode.value)


def _edge_cases(operation: Any) -> Iterator[Any]:
    """Each path and query parameter, in turn, at an edge value of its type."""
    definition = operation.definition.raw
    for parameter in definition.get("parameters", []):
        where = parameter["in"]
        if where not in ("path", "query"):
            continue
        kind = _type_of(parameter["schema"])
        values: list[Any] = EDGE_INTEGERS if kind == "integer" else EDGE_STRINGS
        for value in values:
            params = {p["name"]: _plain(p["schema"]) for p in definition["parameters"]}
            params[parameter["name"]] = value
            path = {
                p["name"]: params[p["name"]] for p in definition["parameters"] if p["in"] == "path"
            }
            query = {
                p["name"]: params[p["name"]] for p in definition["parameters"] if p["in"] == "query"
            }
            yield operation.Case(path_parameters=path, query=query, **_body_of(operation))
    if "requestBody" in definition:
        for value in (*EDGE_STRINGS, 2**64, float("inf")):
            yield operation.Case(
                **_body_of(operation, value), path_parameters=_plain_path(operation)
            )


def _type_of(schema: dict[str, Any]) -> str:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") not in (None, "null"):
            return str(option["type"])
    return "string"


def _plain(schema: dict[str, Any]) -> Any:
    return 1 if _type_of(schema) == "integer" else "ind-1"


def _plain_path(operation: Any) -> dict[str, Any]:
    parameters = operation.definition.raw.get("parameters", [])
    return {p["name"]: _plain(p["schema"]) for p in parameters if p["in"] == "path"}


def _body_of(operation: Any, edge: Any = None) -> dict[str, Any]:
    """A body for ``operation``: every field at ``edge`` (or a plain value)."""
    content = operation.definition.raw.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in content:
        picture = io.BytesIO(encode(photo(1, 3)))
        fields = {"photo": picture.getvalue()}
        if edge is not None:
            text = str(edge) if not isinstance(edge, float) else "inf,0,10,10"
            fields |= {"species": text, "location": text, "bbox": text, "date_from": text}
        return {"body": fields, "media_type": "multipart/form-data"}
    if "application/json" in content:
        if edge is None:
            return {"body": {}, "media_type": "application/json"}
        body = {
            name: edge if not isinstance(edge, int) else [edge]
            for name in (
                "decision",
                "individual_id",
                "code",
                "name",
                "species",
                "comment",
                "into",
                "new_individual_id",
                "image_ids",
                "role",
            )
        }
        if isinstance(edge, float):
            body = {"image_ids": ["inf"], "into": "ind-2"}
        return {"body": body, "media_type": "application/json"}
    return {}


@pytest.mark.slow
@pytest.mark.postgres
def test_the_whole_api_answers_without_5xx_and_as_its_schema_says(fuzzed: LiveServer) -> None:
    failures: list[str] = []
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {fuzzed.keys['admin']}"
    operations = _operations(fuzzed)
    assert len(operations) >= 15
    edges = 0
    for operation in operations:
        start = time.perf_counter()
        for case in _edge_cases(operation):
            _check(case, fuzzed, session, failures)
            edges += 1
        _fuzz(operation, fuzzed, session, failures)
        seconds = time.perf_counter() - start
        log.info("%s %s: %.1f s", operation.method.upper(), operation.path, seconds)
    log.info("schemathesis: %d operations, %d explicit edge cases", len(operations), edges)
    assert edges > 60
    assert not failures, "\n\n".join(failures[:20])
