"""The ``whaleid.*`` metadata_props of an exported model, from the training run's summary."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.contract import Head, ModelContract, Preprocessing


def head_from(summary: dict[str, Any] | None) -> Head:
    """The head the run's grid search chose; the paper's defaults when there is no summary."""
    return Head.from_dict((summary or {}).get("head"))


def _training_facts(summary: dict[str, Any]) -> dict[str, str]:
    facts: dict[str, Any] = {
        "backbone": summary.get("backbone"),
        "data": (summary.get("data") or {}).get("source"),
        "photos": (summary.get("data") or {}).get("photos"),
        "train_individuals": (summary.get("data") or {}).get("train_individuals"),
        "epochs": summary.get("epochs"),
        "global_batch": summary.get("global_batch"),
        "strategy": summary.get("strategy"),
    }
    validation = summary.get("validation") or {}
    best = validation.get("best") or {}
    default = validation.get("default_head") or {}
    facts.update(
        {
            "val_map5": best.get("map5"),
            "val_map5_known": best.get("map5_known"),
            "val_map5_unseen": best.get("map5_unseen"),
            "val_queries": best.get("queries"),
            "val_map5_paper_head": default.get("map5"),
        }
    )
    return {
        f"whaleid.training.{key}": (f"{value:.4f}" if isinstance(value, float) else str(value))
        for key, value in facts.items()
        if value is not None
    }


def build_metadata(
    *,
    spec: Preprocessing,
    head: Head,
    name: str,
    version: str,
    summary: dict[str, Any] | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The model contract as ONNX metadata_props (all strings), with what the run tells of its
    training under ``whaleid.training.*``."""
    training = {
        "whaleid.training.exported_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(_training_facts(summary) if summary else {}),
    }
    props = ModelContract(name, version, spec, head, training).to_metadata()
    props.update(extra or {})
    return props
