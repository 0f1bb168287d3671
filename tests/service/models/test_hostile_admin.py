"""What an admin's refused upload says: why, never where the server keeps its files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.settings import Settings
from tests.conftest import LiveServer, run_server


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    yield from run_server(settings)


@pytest.mark.parametrize("junk", [b"not onnx at all", b"\x08\x07" + b"\xff" * 64])
def test_a_junk_model_file_is_422_without_a_server_path(server: LiveServer, junk: bytes) -> None:
    with server.client("admin") as admin:
        answer = admin.post("/models", content=junk)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("the uploaded file is not a loadable ONNX model"), detail
    for leak in (str(server.settings.data_dir), str(server.settings.models_dir), ".upload."):
        assert leak not in detail, detail
    assert not list(server.settings.models_dir.glob(".upload.*"))
