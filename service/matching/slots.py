"""Bounded slots for the expensive steps of an identification (decoding and embedding), so a
burst of large photos queues for a while and is then refused, instead of running a worker out of
memory. docs/reliability.md gives the memory a worker needs at the default limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from service.errors import Busy
from service.settings import Settings


class Slots:
    """At most ``count`` holders at once; a caller waits up to ``wait_seconds`` for a place."""

    def __init__(self, step: str, count: int, wait_seconds: float) -> None:
        if count < 1:
            raise ValueError(f"{step} slots must be at least 1, not {count}")
        self.step = step
        self.count = count
        self.wait_seconds = wait_seconds
        self._semaphore = threading.BoundedSemaphore(count)
        self._held = 0  # for the metrics; the semaphore does not say
        self._count_lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """How many holders there are right now."""
        return self._held

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self.wait_seconds):
            raise Busy(self.step, self.wait_seconds)
        with self._count_lock:
            self._held += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._held -= 1
            self._semaphore.release()


class WorkSlots:
    """The decode and embed slots of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.decode = Slots("decode", settings.decode_slots, settings.slot_wait_seconds)
        self.embed = Slots("embed", settings.embed_slot_count, settings.slot_wait_seconds)
        # The side work of a decode slot's holder, on another core while it decodes: the
        # upload's hash with the active model's check, then the photo kept (re-encoded if need
        # be, written), which may run on into the embedding. Two tasks a holder, a few
        # milliseconds each: with a worker for each, plus one for each embed slot, they do not
        # wait in a queue.
        self.side = ThreadPoolExecutor(
            2 * self.decode.count + self.embed.count, thread_name_prefix="side-work"
        )
        # A verifying model's embedding, made while the decode slot's holder extracts the
        # query's local features: one a holder, which then waits for it.
        self.embedding = ThreadPoolExecutor(
            self.decode.count + self.embed.count, thread_name_prefix="embedding"
        )
