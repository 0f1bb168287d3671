"""TensorFlow tests run on the CPU only (accelerators hidden), quietly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.training.helpers import tiny_run  # noqa: E402,F401  (a session fixture)

# Warnings of TensorFlow's own code, not ours: autograph's AST annotations (deprecated in
# Python 3.13) and Keras converting tensors with np.array(copy=False) under numpy 2.
_FOREIGN_WARNINGS = (
    "ignore:.*unexpected keyword argument '___pyct_anno':DeprecationWarning",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    suites = (here, here.parent / "model_export")  # the TensorFlow suites share this setup
    for item in items:
        if any(suite in item.path.parents for suite in suites):
            for warning in _FOREIGN_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(warning))
