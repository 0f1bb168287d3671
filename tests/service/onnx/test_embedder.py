"""The ONNX model contract, read by the embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.errors import ModelContractError
from service.onnx.embedder import Embedder
from tests.toy import build_toy_model


def test_defaults_for_missing_optional_metadata(toy_model: Path) -> None:
    contract = Embedder(toy_model).contract
    assert contract.preprocessing.input_size == 32
    assert contract.preprocessing.resize == "stretch"
    assert contract.preprocessing.pixel_range == "0-255"
    assert (contract.head.k, contract.head.cutoff, contract.head.ranking) == (50, 0.62, "vote")
    assert (contract.name, contract.version) == ("toy", "seed0")


def test_metadata_overrides(tmp_path: Path) -> None:
    path = build_toy_model(
        tmp_path / "m.onnx",
        metadata={
            "whaleid.k": "20",
            "whaleid.cutoff": "0.5",
            "whaleid.ranking": "nearest",
            "whaleid.resize": "letterbox",
            "whaleid.pixel_range": "0-1",
            "whaleid.training.map5": "0.86",
        },
    )
    contract = Embedder(path).contract
    assert (contract.head.k, contract.head.cutoff, contract.head.ranking) == (20, 0.5, "nearest")
    assert contract.preprocessing.resize == "letterbox"
    assert contract.training == {"whaleid.training.map5": "0.86"}


def test_model_without_input_size_is_refused(tmp_path: Path) -> None:
    path = build_toy_model(tmp_path / "m.onnx", metadata={"whaleid.input_size": None})  # type: ignore[dict-item]
    with pytest.raises(ModelContractError, match="whaleid.input_size"):
        Embedder(path)


def test_model_with_3d_output_is_refused(tmp_path: Path) -> None:
    path = build_toy_model(tmp_path / "m.onnx", output_rank=3)
    with pytest.raises(ModelContractError, match="2-D"):
        Embedder(path)


def test_bad_metadata_value_is_named(tmp_path: Path) -> None:
    path = build_toy_model(tmp_path / "m.onnx", metadata={"whaleid.ranking": "best"})
    with pytest.raises(ModelContractError, match="whaleid.ranking"):
        Embedder(path)


def test_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelContractError, match="not a loadable ONNX model"):
        Embedder(path)


def test_embeddings_are_unit_vectors_in_batches(toy_model: Path) -> None:
    embedder = Embedder(toy_model, max_batch_size=3)
    batch = np.random.default_rng(0).uniform(0, 255, (7, 32, 32, 3)).astype(np.float32)
    vectors = embedder.embed(batch)
    assert vectors.shape == (7, embedder.dim) == (7, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    single = embedder.embed(batch[4:5])
    assert np.allclose(single[0], vectors[4], atol=1e-6)
