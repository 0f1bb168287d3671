"""The README's curl walkthrough, run as a newcomer pastes it: its shell blocks are read from
README.md itself and run by bash in a fresh copy of the repository (a fresh data directory),
and every HTTP call must succeed. The answer it shows and the figures it quotes are checked
against the real run, so the README cannot drift from the service.

Two things differ from a person's paste, both mechanical: the server listens on a free port
rather than 8000 (the README's ``localhost:8000`` is rewritten to it, and ``PORT`` is set for
``scripts/serve.sh``), and ``serve.sh`` uses this suite's virtualenv as it is (``SKIP_INSTALL=1``)
instead of installing into it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).parents[1]
SECTION = "## Walkthrough with curl"
# Every curl call goes through this wrapper: it runs the real curl and notes the exit code and
# HTTP status of each call, one line per call.
CURL_WRAPPER = """#!/usr/bin/env bash
headers=$(mktemp)
"$REAL_CURL" -D "$headers" "$@"
rc=$?
status=$(awk 'toupper($1) ~ /^HTTP/ {code=$2} END {print code}' "$headers")
printf '%s\\t%s\\t%s\\n' "$rc" "${status:-none}" "$*" >> "$CURL_LOG"
rm -f "$headers"
exit $rc
"""


def walkthrough_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the walkthrough section (up to the next ``## `` heading)."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end > 0 else None]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def sample_answer(readme: str) -> dict[str, object]:
    """The answer the README shows for the first /identify (its first ```json block)."""
    start = readme.index(SECTION)
    block = re.search(r"```json\n(.*?)```", readme[start:], flags=re.DOTALL)
    assert block is not None, "the walkthrough shows no sample answer"
    answer: dict[str, object] = json.loads(block.group(1))
    return answer


def fresh_copy(target: Path) -> None:
    """The repository's files as a clone has them (tracked and new, not ignored ones), with the
    suite's virtualenv."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (target / source.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / source.relative_to(ROOT))
    (target / ".venv").symlink_to(Path(sys.executable).parent.parent)


def evaluate_map5(clone: Path, env: dict[str, str]) -> float:
    done = subprocess.run(
        [".venv/bin/whaleid", "evaluate", "data/demo-gallery/queries.csv"]
        + ["--images", "data/demo-gallery/images"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(json.loads(done.stdout)["map5"])


def quoted_map5(readme: str, after: str) -> float:
    """The first MAP@5 figure quoted after ``after`` in the walkthrough."""
    start = readme.index(SECTION)
    found = re.search(after + r".*?(\d\.\d{3})", readme[start:], flags=re.DOTALL)
    assert found is not None, f"the README quotes no figure after {after!r}"
    return float(found.group(1))


@pytest.mark.slow
@pytest.mark.readme
def test_the_readme_walkthrough_works_when_pasted(tmp_path: Path) -> None:
    real_curl = shutil.which("curl")
    if real_curl is None:
        if os.environ.get("CI"):
            pytest.fail("curl is missing")
        pytest.skip("no curl")
    readme = (ROOT / "README.md").read_text()
    blocks = walkthrough_blocks(readme)
    assert len(blocks) >= 3, "the walkthrough, 'More' and 'Curating' blocks"

    clone = tmp_path / "whaleid"
    fresh_copy(clone)
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(CURL_WRAPPER)
    (bin_dir / "curl").chmod(0o755)
    curl_log = tmp_path / "curl.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHALEID_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        REAL_CURL=real_curl,
        CURL_LOG=str(curl_log),
        PORT=str(port),
        SKIP_INSTALL="1",
    )
    script = "set -e -o pipefail\n" + "\n".join(blocks).replace(
        "localhost:8000", f"localhost:{port}"
    )
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the server it starts in the background is in its group
    )
    try:
        output, _ = process.communicate(timeout=600)
        serve_log = (clone / "serve.log").read_text() if (clone / "serve.log").exists() else ""
        assert process.returncode == 0, f"{output}\n--- serve.log ---\n{serve_log}"

        calls = [line.split("\t", 2) for line in curl_log.read_text().splitlines()]
        waits = [c for c in calls if "/ready" in c[2]]
        assert waits and waits[-1][:2] == ["0", "200"], waits
        steps = [c for c in calls if "/ready" not in c[2]]
        assert len(steps) >= 15
        for rc, status, args in steps:
            assert rc == "0" and status.startswith("2"), f"{status} (curl exit {rc}): {args}"

        # The README's sample answer is what identification 1 really answered.
        key = subprocess.run(
            [".venv/bin/whaleid", "keys", "create", "--role", "admin", "--name", "test"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        real = httpx.get(
            f"http://127.0.0.1:{port}/identifications/1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).json()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

    sample = sample_answer(readme)
    assert len(real["candidates"]) == 5
    assert len(sample["candidates"]) == 5  # type: ignore[arg-type]
    for shown, got in zip(sample["candidates"], real["candidates"], strict=True):  # type: ignore[call-overload]
        for field in ("rank", "individual_id", "species", "votes", "best_image_id"):
            assert shown[field] == got[field], (field, shown, got)
        if got["distance"] is not None:
            assert shown["distance"] == pytest.approx(got["distance"], abs=1e-4)
            assert shown["confidence"] == pytest.approx(got["confidence"], abs=1e-4)
    assert sample["model"] == real["model"] and sample["gallery_size"] == real["gallery_size"]
    # The walkthrough's decisions were recorded.
    assert real["status"] == "confirmed"

    # The MAP@5 figures it quotes: the fresh demo's (evaluate ran in the 'More' block, before
    # any decision) and the one after the walkthrough's decisions.
    fresh = re.search(r'"map5": ([0-9.]+)', output)
    assert fresh is not None, output
    quoted = quoted_map5(readme, "`evaluate` reports MAP@5")
    assert float(fresh.group(1)) == pytest.approx(quoted, abs=5e-4)
    after = evaluate_map5(clone, env)
    assert after == pytest.approx(quoted_map5(readme, "after the decisions below"), abs=5e-4)
