"""Rewrite pyproject.toml (in place) for the serving image: only the `service` and `migrations`
packages and the `whaleid` command, so neither `training/` nor `model_export/` nor their
commands (which import TensorFlow) get installed. Used by scripts/install-serving.sh."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_TRAINING_SCRIPT = re.compile(r"^whaleid-\w+ = \"(training|model_export)\.[\w.:]+\"\n", re.M)
_INCLUDE = re.compile(r"^include = \[.*\]$", re.M)


def serving_pyproject(text: str) -> str:
    """The pyproject text with the training and export packages and commands removed."""
    text = _TRAINING_SCRIPT.sub("", text)
    text, count = _INCLUDE.subn('include = ["service*", "migrations*"]', text)
    if count != 1:
        raise SystemExit("pyproject.toml: no [tool.setuptools.packages.find] include line")
    project = tomllib.loads(text)["project"]
    if set(project["scripts"]) != {"whaleid"}:
        raise SystemExit(f"pyproject.toml: unexpected commands {sorted(project['scripts'])}")
    return text


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    path.write_text(serving_pyproject(path.read_text()))
