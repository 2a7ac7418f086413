"""The controller loop: events from a source -> ClusterState -> control topics.

The source (Kubernetes watchers or a policy directory) runs in threads and hands
`Sync`/`Change` items over through an asyncio queue. Once every resource is listed
the first full snapshot goes out; after that each item's deltas are published as they
come, and a full snapshot every `snapshot_interval` seconds (brokers without
compaction would otherwise make a late consumer replay every change ever made).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from controller.publish import Publisher
from controller.state import Change, ClusterState, InvalidPolicy, Sync, describe

__all__ = ["Controller", "Source"]

log = logging.getLogger("armorstream.controller")


class Source(Protocol):
    resources: tuple[str, ...]

    def start(self, sink: Callable[[Sync | Change], None]) -> None: ...

    def stop(self) -> None: ...

    def report_invalid(self, inv: InvalidPolicy) -> None: ...


@dataclass
class Controller:
    source: Source
    publisher: Publisher
    state: ClusterState
    snapshot_interval: float = 300.0
    started_at: float = field(default_factory=time.monotonic)
    first_snapshot_after: float | None = None  # seconds from start to the first full snapshot
    invalid_reported: int = 0
    # counters for /metrics (controller.metrics)
    events_applied: int = 0  # lists and watch events folded into the state
    records_published: int = 0  # changed records and tombstones sent (snapshots apart)
    snapshots_published: int = 0
    _queue: asyncio.Queue[Sync | Change] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Sync | Change] = asyncio.Queue()
        self._queue = queue
        await self.publisher.start()

        def sink(item: Sync | Change) -> None:  # called from the source's threads
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.source.start(sink)
        try:
            await self._loop(queue)
        finally:
            await loop.run_in_executor(None, self.source.stop)
            await self.publisher.stop()

    async def _loop(self, queue: asyncio.Queue[Sync | Change]) -> None:
        loop = asyncio.get_running_loop()
        next_snapshot: float | None = None
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                timeout = None if next_snapshot is None else max(0.0, next_snapshot - loop.time())
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, stop_wait}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    if stop_wait in done:
                        break
                    await self.publisher.snapshot(self.state.snapshot())
                    self.snapshots_published += 1
                    next_snapshot = loop.time() + self.snapshot_interval
                    continue
                # Drain what is queued before publishing: one batch of sends per burst.
                items = [get.result()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                changes = []
                self.events_applied += len(items)
                for item in items:
                    up = self.state.apply(item)
                    changes.extend(up.changes)
                    for inv in up.invalid:
                        await self._report(inv)
                if next_snapshot is None:
                    if self.state.ready:
                        await self.publisher.snapshot(self.state.snapshot())
                        self.snapshots_published += 1
                        self.first_snapshot_after = time.monotonic() - self.started_at
                        next_snapshot = loop.time() + self.snapshot_interval
                elif changes:
                    await self.publisher.publish(changes)
                    self.records_published += len(changes)
        finally:
            stop_wait.cancel()

    async def _report(self, inv: InvalidPolicy) -> None:
        self.invalid_reported += 1
        for e in inv.errors:
            log.error("invalid policy %s not applied: %s", inv.key, e)
        log.debug("invalid policy %s: %s", inv.key, describe(inv.errors))
        await asyncio.get_running_loop().run_in_executor(None, self.source.report_invalid, inv)
