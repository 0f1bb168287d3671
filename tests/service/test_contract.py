"""The model contract round-trips through ONNX metadata, and refuses what it cannot serve."""

from __future__ import annotations

import pytest

from service.contract import (
    PAPER_HEAD,
    Head,
    ModelContract,
    PixelRange,
    Preprocessing,
    Ranking,
    Resize,
)
from service.errors import ModelContractError


def test_to_metadata_and_back_is_the_same_contract() -> None:
    contract = ModelContract(
        "effb5-arcface",
        "2026.11",
        Preprocessing(380, Resize.LETTERBOX, PixelRange.IMAGENET),
        Head(10, 0.32, Ranking.NEAREST),
        {"whaleid.training.val_map5": "0.8210"},
    )
    props = contract.to_metadata()
    assert all(isinstance(v, str) for v in props.values())
    assert props["whaleid.cutoff"] == "0.32" and props["whaleid.ranking"] == "nearest"
    assert ModelContract.from_metadata(props, fallback_name="x") == contract


def test_missing_optional_keys_take_the_papers_defaults() -> None:
    contract = ModelContract.from_metadata({"whaleid.input_size": "224"}, fallback_name="file")
    assert contract.head == PAPER_HEAD == Head(50, 0.62, Ranking.VOTE)
    assert contract.preprocessing == Preprocessing(224, Resize.STRETCH, PixelRange.BYTES)
    assert (contract.name, contract.version) == ("file", "0")


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({}, "no whaleid.input_size"),
        ({"whaleid.input_size": "big"}, "not a number"),
        ({"whaleid.input_size": "380", "whaleid.ranking": "votes"}, "vote, nearest"),
        ({"whaleid.input_size": "380", "whaleid.resize": "crop"}, "stretch, letterbox"),
        ({"whaleid.input_size": "380", "whaleid.cutoff": "3"}, r"\[0, 2\]"),
    ],
)
def test_a_model_breaking_the_contract_is_refused_saying_what_to_fix(
    props: dict[str, str], message: str
) -> None:
    with pytest.raises(ModelContractError, match=message):
        ModelContract.from_metadata(props, fallback_name="x")
