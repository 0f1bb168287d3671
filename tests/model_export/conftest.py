"""The export tests share the TensorFlow setup of the training tests (CPU only, quiet)."""

from tests.training.conftest import pytest_collection_modifyitems, tiny_run  # noqa: F401
