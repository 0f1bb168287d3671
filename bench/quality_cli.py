"""The command line as ``bench/quality.py`` drives it: ``python -m service.cli`` of this checkout
in a subprocess, on a throw-away data directory, each command's log kept in a numbered file; and
what it reads back from the output (a registered model's id, ``whaleid models list``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bench._common import ROOT, NotReady, free_port, stop, wait_ready

# `whaleid` output: the id a registration got, and a row of `whaleid models list`.
REGISTERED = re.compile(r"registered model .* as id (\d+)")
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ [\w.]+: ")
MODEL_ROW = re.compile(
    r"^(\d+)\t(\w+)\t(\S+)\t(\S+)\tdim=\d+\tk=(\d+)\tcutoff=([\d.]+)\t(\w+)(?:\t.*)?$"
)


class CommandFailed(RuntimeError):
    """A ``whaleid`` command exited non-zero or ran out of time."""

    def __init__(self, command: Sequence[str], why: str, tail: str) -> None:
        self.command = " ".join(command)
        self.why = why
        self.tail = tail
        super().__init__(f"`{self.command}` {why}: {tail}")


@dataclass(frozen=True)
class Done:
    stdout: str
    stderr: str
    seconds: float


class Cli:
    """``python -m service.cli`` of this checkout, on one data directory (or none)."""

    # Service settings every command gets (``bench/quality.py --setting``).
    settings: ClassVar[dict[str, str]] = {}

    def __init__(self, data_dir: Path | None, logs: Path) -> None:
        self.data_dir = data_dir
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHALEID_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["WHALEID_LOG_LEVEL"] = "INFO"
        env["WHALEID_WORKER"] = "false"
        env.update(self.settings)
        if data_dir is not None:
            env["WHALEID_DATA_DIR"] = str(data_dir)
        self.env = env
        self.count = 0

    def python(self, *args: str, timeout: float = 600, interpreter: Path | None = None) -> Done:
        """``python ARGS`` (this interpreter, or ``interpreter``: the training virtualenv's),
        its stderr logged to a numbered file of the log folder."""
        command = [str(interpreter or sys.executable), *args]
        self.count += 1
        logfile = self.logs / f"{self.count:02d}-{_slug(args)}.log"
        started = time.perf_counter()
        try:
            # The scratch folder as working directory: no .env of the checkout is read.
            done = subprocess.run(
                command,
                cwd=self.logs,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            logfile.write_text(_text(e.stderr))
            raise CommandFailed(_shown(args), f"ran past {timeout:.0f} s", "") from e
        seconds = time.perf_counter() - started
        logfile.write_text(done.stderr)
        if done.returncode != 0:
            raise CommandFailed(_shown(args), f"exited {done.returncode}", _tail(done.stderr))
        return Done(done.stdout, done.stderr, seconds)

    def whaleid(self, *args: str, timeout: float = 600) -> Done:
        return self.python("-m", "service.cli", *args, timeout=timeout)

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """``whaleid serve`` on a free loopback port until the block ends."""
        port = free_port()
        logfile = (self.logs / f"serve-{port}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-migrate", "--port", str(port)],
            cwd=self.logs,
            env=self.env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(process, url, 300)
            except NotReady as e:
                exited = process.poll() is not None
                why, tail = ("exited", f"see {logfile.name}") if exited else (str(e), "")
                raise CommandFailed(["serve"], why, tail) from e
            yield url
        finally:
            stop(process)
            logfile.close()


def _slug(args: Sequence[str]) -> str:
    words = [
        a
        for a in args
        if not a.startswith("-") and "/" not in a and "=" not in a and a != "service.cli"
    ]
    return "-".join(words[:3]) or "python"


def _shown(args: Sequence[str]) -> list[str]:
    """The command as a reader types it: ``whaleid ...`` with paths cut to their names."""
    args = list(args)
    programs = {
        "service.cli": "whaleid",
        "training": "whaleid-train",
        "model_export": "whaleid-export",
    }
    if len(args) >= 2 and args[0] == "-m" and args[1] in programs:
        args = [programs[args[1]], *args[2:]]
    return [Path(a).name if "/" in a else a for a in args]


def _tail(text: str, lines: int = 2) -> str:
    """The last lines a command wrote, without the log prefix (time, level, logger)."""
    kept = [LOG_PREFIX.sub("", line).strip() for line in text.strip().splitlines()]
    return " / ".join([line for line in kept if line][-lines:])[-300:]


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def capabilities(cli: Cli) -> dict[str, bool]:
    """What ``whaleid evaluate`` accepts today: the modes use ``--model`` and
    ``--verification`` where it has them."""
    usage = cli.whaleid("evaluate", "--help").stdout
    return {"model": "--model" in usage, "verification": "--verification" in usage}


@dataclass(frozen=True)
class ModelRow:
    id: int
    status: str
    name: str
    version: str
    k: int
    cutoff: float
    ranking: str


def models(cli: Cli) -> list[ModelRow]:
    rows = []
    for line in cli.whaleid("models", "list").stdout.splitlines():
        m = MODEL_ROW.match(line)
        if m:
            rows.append(ModelRow(int(m[1]), m[2], m[3], m[4], int(m[5]), float(m[6]), m[7]))
    return rows


def registered_id(done: Done, cli: Cli) -> int:
    """The id ``whaleid models add`` gave, from its log line or else the newest model."""
    m = REGISTERED.search(done.stderr)
    if m:
        return int(m[1])
    return max(r.id for r in models(cli))
