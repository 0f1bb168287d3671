"""TensorFlow tests run on the CPU only (accelerators hidden), quietly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.training.helpers import tiny_run  # noqa: E402,F401  (a session fixture)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keras 2.15 seeds its initialisers with random.randint(1, 1e9): not our warning."""
    here = Path(__file__).parent
    suites = (here, here.parent / "model_export")  # the TensorFlow suites share this setup
    for item in items:
        if any(suite in item.path.parents for suite in suites):
            item.add_marker(pytest.mark.filterwarnings("ignore:non-integer arguments to randrange"))
