"""What the bench scripts share: the checkout's paths, logging set-up, percentiles and a
stopwatch, the machine and commit a run was measured on, a ``whaleid serve`` subprocess's start
and stop, and the marked section of a document that one bench rewrites.

A bench script starts with ``sys.path.insert(0, <checkout>)`` and then imports from here."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "whaleid-demo.onnx"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"

# --------------------------------------------------------------------------- logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    fmt: str = LOG_FORMAT, *, verbose: bool = False, quiet: Iterable[str] = ("httpx",)
) -> None:
    """The bench's log on stderr (never print), with the chatty loggers in ``quiet`` at
    WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- the command line


def bench_parser(doc: str | None, *, postgres: bool = False) -> argparse.ArgumentParser:
    """A bench script's parser, its docstring as the description (laid out as written); with
    ``postgres``, the required ``--postgres`` server URL."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if postgres:
        parser.add_argument(
            "--postgres", required=True, help="server URL; a scratch database is used"
        )
    return parser


def within(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (the run stays bounded)."""

    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return number

    return parse


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when there are none)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def p50(values: Sequence[float]) -> float:
    return pct(values, 50)


def p90(values: Sequence[float]) -> float:
    return pct(values, 90)


@contextlib.contextmanager
def stopwatch(label: str, logger: logging.Logger = log) -> Iterator[dict[str, float]]:
    """Log ``label`` (to ``logger``) and, at the end of the block, its seconds (also under
    ``["s"]``)."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    logger.info("%s ...", label)
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start
        logger.info("%s: %.1f s", label, out["s"])


# --------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


def git_commit(dirty_under: str | None = None) -> str:
    """The checkout's short commit ("unknown" outside git); with ``dirty_under``, a note when
    that folder has uncommitted changes."""
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                check=True,
                text=True,
            ).stdout.strip()
            or "unknown"
        )
        if dirty_under is not None:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", dirty_under],
                cwd=ROOT,
                capture_output=True,
                check=True,
                text=True,
            ).stdout.strip()
            if dirty:
                commit += f" + uncommitted changes in {dirty_under}/"
    return commit


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def shared_data() -> Path:
    """../shared/data beside the checkout (or beside the worktrees' folder)."""
    for parent in ROOT.parents[:2]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- a server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotReady(RuntimeError):
    """A server process exited, or did not answer ``/ready`` in time."""


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    """Poll ``url``'s ``/ready`` until it answers 200; NotReady when ``process`` exits first or
    ``timeout_s`` passes."""
    import httpx  # not in the training virtualenv, where some bench scripts run

    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5) as client:
        while True:
            if process.poll() is not None:
                raise NotReady(f"exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise NotReady(f"was not ready in {timeout_s:.0f} s")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/ready").status_code == 200:
                    return
            time.sleep(0.2)


def stop(process: subprocess.Popen[bytes] | None, grace_s: float = 30) -> None:
    """Terminate ``process``; kill it when it is still there after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- documents


def marks(name: str) -> tuple[str, str]:
    """The HTML comments around the section a bench writes into a document."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(
    path: Path,
    section: str,
    name: str,
    *,
    new_doc: str | None = "# Performance\n",
    required: bool = False,
) -> None:
    """Put ``section`` (which starts and ends with the marks of ``name``) in place of that
    section of ``path``, or at its end when it has none (``required``: refuse instead). A
    missing file starts as ``new_doc`` (None: refuse)."""
    begin, end = marks(name)
    if not path.exists() and new_doc is None:
        raise SystemExit(f"{path} does not exist")
    text = path.read_text() if path.exists() else str(new_doc)
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif required:
        raise SystemExit(f"{path} has no {begin} ... {end} block to fill")
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def fmt(value: float | None, digits: int = 1) -> str:
    """``value`` with thousands separators and ``digits`` decimals; "n/a" for None or NaN."""
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:,.{digits}f}")
    )


def size_name(n: int) -> str:
    """1000 as "1k", 2000000 as "2M"; other numbers as they are."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)
