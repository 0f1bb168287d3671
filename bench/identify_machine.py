"""How busy the machine is while ``bench/identify.py`` measures: the cores other processes keep
busy over a phase, waiting for a quiet machine, and measuring a phase again that they disturbed
(``--wait-idle``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench.identify_records import NOISY

log = logging.getLogger("bench.identify")
T = TypeVar("T")


class Server(Protocol):
    def cpu_seconds(self) -> float: ...


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    finished children). The difference over an interval is what other processes used."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    busy = (sum(values[:8]) - idle) / ticks  # user..steal, without guest (counted in user)
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


@contextlib.contextmanager
def load_meter(into: dict[str, Any], key: str, server: Server | None = None) -> Iterator[None]:
    """Record under ``into[key]`` how many cores other processes kept busy meanwhile (the
    server subprocess, if given, counts as ours)."""
    busy0, own0 = _cpu_seconds()
    server0 = server.cpu_seconds() if server else 0.0
    t0 = time.perf_counter()
    try:
        yield
    finally:
        busy1, own1 = _cpu_seconds()
        server1 = server.cpu_seconds() if server else 0.0
        wall = time.perf_counter() - t0
        others = (busy1 - busy0) - (own1 - own0) - (server1 - server0)
        into[key] = max(0.0, others / wall) if wall > 0 else math.nan


def wait_for_idle(max_wait_s: float, threshold: float = 0.15, window_s: float = 10.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores over
    ``window_s``; return their load over the last window."""
    start = time.monotonic()
    said = False
    while True:
        probe: dict[str, Any] = {}
        with load_meter(probe, "others"):
            time.sleep(window_s)
        waited = time.monotonic() - start
        if probe["others"] < threshold or waited >= max_wait_s:
            WAITED_S[0] += waited if said else 0.0
            if said:
                log.info(
                    "waited %.0f s; other processes now use %.2f cores", waited, probe["others"]
                )
            return float(probe["others"])
        if not said:
            log.info("other processes use %.2f cores; waiting for a quiet machine", probe["others"])
            said = True


# How long each timed phase may wait for other processes to leave the CPUs alone (--wait-idle);
# 0: measure at once, whatever the load.
QUIET_WAIT_S = 0.0
WAITED_S = [0.0]  # time spent waiting for other processes, over the whole run


def guarded(label: str, measure: Callable[[], T], load_of: Callable[[T], float]) -> T:
    """Run ``measure``; with --wait-idle, first wait for a quiet machine, and measure once more
    if other processes were busy meanwhile."""
    result = measure()
    for _ in range(2 if QUIET_WAIT_S > 0 else 0):
        load = load_of(result)
        if load <= NOISY:
            break
        log.warning("%s: other processes used %.2f cores; measuring again", label, load)
        wait_for_idle(QUIET_WAIT_S, window_s=5.0)
        result = measure()
    return result
