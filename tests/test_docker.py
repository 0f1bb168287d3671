"""The Docker files, checked without a Docker engine: hadolint on the Dockerfile, the compose
file against the Compose Specification's schema, and the serving image's install steps
replayed in a fresh virtualenv that then serves."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from scripts.serving_pyproject import serving_pyproject
from tests.conftest import free_port
from tests.toy import build_toy_model

ROOT = Path(__file__).resolve().parent.parent


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads((ROOT / "tests/schemas/compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification() -> None:
    compose = _compose()
    assert _compose_errors(compose) == []
    services = compose["services"]
    assert services["api"]["build"]["target"] == "serve"
    assert "pgdata:/var/lib/postgresql/data" in services["db"]["volumes"]
    assert services["api"]["environment"]["WHALEID_STORAGE_URL"].startswith("s3://")
    assert services["objects"]["image"].startswith("minio/minio")
    assert services["train"]["profiles"] == ["train"] and "profiles" not in services["api"]
    # The schema bites: a misspelt key is an error.
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_onn"] = broken["services"]["api"].pop("depends_on")
    assert any("depends_onn" in e for e in _compose_errors(broken))


def test_the_serving_pyproject_drops_training_and_export() -> None:
    text = serving_pyproject((ROOT / "pyproject.toml").read_text())
    assert "training.cli" not in text and "model_export.cli" not in text
    assert 'include = ["service*", "migrations*"]' in text


def _build_stage(dockerfile: str) -> tuple[list[list[str]], list[str], dict[str, str]]:
    """The COPY arguments, RUN commands and ENV values of the Dockerfile's `build` stage."""
    copies: list[list[str]] = []
    runs: list[str] = []
    env: dict[str, str] = {}
    in_build = False
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            in_build = line.split()[-1] == "build"
        elif in_build and words[0] == "COPY":
            copies.append(shlex.split(words[1]))
        elif in_build and words[0] == "RUN":
            runs.append(words[1])
        elif in_build and words[0] == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(words[1]))
    return copies, runs, env


def _wait(url: str, process: subprocess.Popen[bytes], status: int) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the replayed server exited"
        try:
            response = httpx.get(url, timeout=10)
            if response.status_code == status:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status}")


@pytest.mark.slow
@pytest.mark.docker
def test_the_replayed_image_installs_without_tensorflow_and_serves(tmp_path: Path) -> None:
    """The build stage's COPY and RUN steps, replayed in a fresh folder and virtualenv (pip's
    cache is kept, unlike in the image); then the image's entrypoint on an empty database."""
    copies, runs, env = _build_stage((ROOT / "Dockerfile").read_text())
    src, venv = tmp_path / "src", tmp_path / "venv"
    for *sources, dest in copies:
        target = src / dest
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    environment = {**os.environ, **env, "WHALEID_VENV": str(venv)}
    environment.pop("PIP_NO_CACHE_DIR")
    environment.pop("VIRTUAL_ENV", None)
    for command in runs:
        subprocess.run(["/bin/sh", "-c", command], cwd=src, env=environment, check=True)
    commands = {p.name for p in (venv / "bin").iterdir()}
    assert "whaleid" in commands and not commands & {"whaleid-train", "whaleid-export"}

    data, port = tmp_path / "data", free_port()
    serve_env = {
        **environment,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "WHALEID_DATA_DIR": str(data),
        "WHALEID_DATABASE_URL": "",
    }
    entrypoint = ROOT / "scripts/docker-entrypoint.sh"
    server = subprocess.Popen(
        [str(entrypoint), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/health", server, 200)  # migrations ran at start on an empty database
        assert httpx.get(f"{url}/ready", timeout=60).status_code == 503  # no model yet
        model = build_toy_model(tmp_path / "toy.onnx")
        subprocess.run(
            [str(venv / "bin/whaleid"), "models", "add", str(model), "--activate"],
            cwd=tmp_path,
            env=serve_env,
            check=True,
            capture_output=True,
        )
        # Without a key /ready says only its status; with one, which model is active.
        assert _wait(f"{url}/ready", server, 200).json() == {"status": "ready"}
        key = subprocess.run(
            [str(venv / "bin/whaleid"), "keys", "create", "--role", "integration", "--name", "ci"],
            cwd=tmp_path,
            env=serve_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        ready = httpx.get(
            f"{url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=60
        ).json()
        assert ready["status"] == "ready" and ready["model"]["name"] == "toy"
    finally:
        server.terminate()
        server.wait(timeout=10)
