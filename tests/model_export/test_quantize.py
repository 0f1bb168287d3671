"""``whaleid-export --quantize int8``: static QDQ, per-channel, calibrated on real photos, written
only if it stays close to fp32 on held-out photos and in validation MAP@5.

The tiny run's figures (cosines, MAP@5) are whatever its training gives, so no assertion here
depends on them: the gate's cosine is set where it cannot refuse (-1) or cannot pass (2), and the
run's 8 validation queries (fixed by the catalogue and the split, not by training) are always too
few to judge MAP@5. The gate's statistics are tested on fixed scores in test_map5_drop.py."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
onnx = pytest.importorskip("onnx")

from model_export.cli import main as export_cli  # noqa: E402
from model_export.export import ExportRefused, export_model  # noqa: E402
from service.embedder import Embedder  # noqa: E402
from tests.model_export.test_export import wide_photos  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.model import build_training_model  # noqa: E402


@pytest.fixture(scope="module")
def fp32(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "tiny.onnx"
    export_model(tiny_run / "model.keras", out)
    return out


def test_int8_is_static_qdq_per_channel_and_says_so(
    tiny_run: Path, fp32: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny-int8.onnx"
    result = export_model(
        tiny_run / "model.keras",
        out,
        quantize="int8",
        int8_min_cosine=-1.0,  # any model passes: this test is about the file, not its figures
        int8_accept_unjudged=True,
    )
    graph = onnx.load(str(out)).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    assert not ops["ConvInteger"] and not ops["DynamicQuantizeLinear"]  # not dynamic
    weights = {t.name: t for t in graph.initializer}
    per_channel = [
        node
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in weights
        and weights[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(weights[node.input[1]].dims) == 1  # one scale per output channel
    ]
    assert per_channel
    contract = Embedder(out).contract
    assert contract.version == "test-int8" and contract.name == "tiny"
    assert contract.preprocessing == Embedder(fp32).contract.preprocessing
    facts = contract.training
    assert facts["whaleid.training.quantization"].startswith("int8 static QDQ")
    assert "calibrated on 24 training photos of the run" in facts["whaleid.training.quantization"]
    assert "held-out photos" in facts["whaleid.training.int8_check"]
    assert "paired bootstrap interval" in facts["whaleid.training.int8_check"]
    assert facts["whaleid.training.int8_val_queries"] == "8"
    assert facts["whaleid.training.int8_map5_verdict"] == (
        "unjudged: too few queries to judge (8 < 100), written on the cosine check alone"
    )
    assert facts["whaleid.training.int8_map5_drop_interval"].startswith(
        "95% paired bootstrap interval ["
    )
    drop = float(facts["whaleid.training.fp32_val_map5"]) - float(
        facts["whaleid.training.int8_val_map5"]
    )
    assert float(facts["whaleid.training.int8_map5_drop"]) == pytest.approx(drop, abs=2e-4)
    assert result.metadata == {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    embeddings = Embedder(out).embed(x)
    assert embeddings.shape == Embedder(fp32).embed(x).shape
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_too_few_validation_queries_to_judge_int8_refuse_it_by_default(
    tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportRefused) as refused:
        export_model(tiny_run / "model.keras", out, quantize="int8", int8_min_cosine=-1.0)
    message = str(refused.value)
    assert message.startswith("too few validation queries to judge int8's MAP@5: 8 < 100")
    assert "paired bootstrap interval" in message and "--int8-accept-unjudged" in message
    assert not out.exists()


def test_an_int8_model_that_strays_is_refused_and_nothing_written(
    tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous model")
    with pytest.raises(ExportRefused, match="int8 embeddings stray from fp32: cosine"):
        # no cosine reaches 2: refused whatever the training gave, before MAP@5 is looked at
        export_model(tiny_run / "model.keras", out, quantize="int8", int8_min_cosine=2.0)
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_calibration_photos_from_a_folder(tiny_run: Path, tmp_path: Path) -> None:
    photos = tmp_path / "calibration"
    photos.mkdir()
    for path in sorted((tiny_run / "parity").iterdir())[:4]:
        (photos / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "int8.onnx"
    code = export_cli(
        [
            str(tiny_run / "model.keras"),
            "--out",
            str(out),
            "--quantize",
            "int8",
            "--calibration-photos",
            str(photos),
            "--int8-min-cosine",
            "-1",
            "--int8-accept-unjudged",
        ]
    )
    assert code == 0
    facts = Embedder(out).contract.training
    assert "calibrated on 4 photos of calibration/" in facts["whaleid.training.quantization"]
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(tiny_run / "model.keras"), "--out", str(tmp_path / "no.onnx"), "--quantize"]
    assert export_cli([*args, "int8", "--calibration-photos", str(empty)]) == 1
    assert not (tmp_path / "no.onnx").exists()


def test_int8_needs_the_runs_validation_photos(tmp_path: Path) -> None:
    model = build_training_model(TrainConfig(backbone="compact", input_size=32, embedding_dim=8), 3)
    model.save(tmp_path / "m.keras")
    with pytest.raises(FileNotFoundError, match="int8 quantization needs the training run"):
        export_model(
            tmp_path / "m.keras",
            tmp_path / "m.onnx",
            photos=wide_photos(tmp_path / "photos"),
            quantize="int8",
        )
    assert not (tmp_path / "m.onnx").exists()


def test_models_compared_side_by_side(fp32: Path, tmp_path: Path) -> None:
    from model_export.compare import compare
    from training.synthetic import write_catalogue

    catalogue = write_catalogue(
        tmp_path / "cat", individuals=4, photos=2, queries=1, unseen=1, size=48, seed=9
    )
    assert catalogue.queries_csv is not None
    twin = tmp_path / "twin.onnx"
    twin.write_bytes(fp32.read_bytes())
    result = compare(
        [fp32, twin], catalogue.catalogue_csv, catalogue.queries_csv, catalogue.images, rounds=2
    )
    first, second = result["models"]["tiny.onnx"], result["models"]["twin.onnx"]
    assert (result["gallery_photos"], result["queries"]) == (8, 6)  # 4 known + 2 unseen
    assert first["map5"] == second["map5"] and 0.0 <= first["map5"] <= 1.0
    assert second["min_cosine_to_first_model"] == pytest.approx(1.0)
    assert first["embed_one_photo"]["runs"] == 2 * 10 and first["embed_one_photo"]["p50_ms"] > 0
