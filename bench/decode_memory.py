"""Peak memory of a worker under a burst of large photos, with bounded decode slots.

Starts `whaleid serve` (SQLite, the toy model of the tests) once per slot setting, sends N
copies of a 7000x7000 PNG at once, and reports the server's peak resident memory (VmHWM) and
the answers. Run from the repository root:

    .venv/bin/python -m bench.decode_memory --clients 8 --slots 2 8
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench._common import setup_logging
from service.db import migrate
from service.settings import Settings
from tests.conftest import free_port, load_catalogue, make_keys, serve_process
from tests.toy import build_toy_model

log = logging.getLogger("decode_memory")


def big_png(side: int) -> bytes:
    """A mostly flat photo: a small file (about 160 KB) that decodes to side x side pixels."""
    image = Image.new("RGB", (side, side), (10, 80, 120))
    image.paste(Image.new("RGB", (side // 3, side // 5), (200, 30, 30)), (side // 4, side // 3))
    path = Path(tempfile.mkdtemp()) / "big.png"
    image.save(path)
    return path.read_bytes()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def run(slots: int, clients: int, photo: bytes, work: Path) -> None:
    settings = Settings(data_dir=work / f"data-{slots}", _env_file=None)
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url)
    load_catalogue(settings, work / f"catalogue-{slots}", build_toy_model(work / "toy.onnx"))
    key = make_keys(settings)["integration"]
    port = free_port()
    server = serve_process(
        settings, port, WHALEID_DECODE_SLOTS=str(slots), WHALEID_SLOT_WAIT_SECONDS="60"
    )
    try:
        idle = peak_rss_mib(server.pid)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        ) as client:

            def send(_: int) -> int:
                files = {"photo": ("big.png", photo)}
                return client.post("/identify", files=files).status_code

            with ThreadPoolExecutor(clients) as pool:
                statuses = Counter(pool.map(send, range(clients)))
        log.info(
            "decode slots %d, %d clients at once: peak %.0f MiB (idle %.0f MiB), answers %s",
            slots,
            clients,
            peak_rss_mib(server.pid),
            idle,
            dict(statuses),
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--slots", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    setup_logging("%(message)s")
    photo = big_png(args.side)
    with tempfile.TemporaryDirectory() as work:
        for slots in args.slots:
            run(slots, args.clients, photo, Path(work))


if __name__ == "__main__":
    main()
