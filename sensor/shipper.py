"""Ship batch envelopes to the raw Kafka topic; spool them to disk while the broker is away.

Batches are opaque bytes here (enforcer.envelope makes them), keyed by container identity
so that one container's batches land in one partition, in order.

Ordering is the hard part. aiokafka retries a failed batch until it expires, and batches
of one partition expire one by one, so with several batches queued in aiokafka an older one
can fail while a newer one still gets through when the broker comes back. The shipper
therefore hands aiokafka at most one produce batch per partition at a time (`send_batch`),
and keeps the rest in its own per-partition queues. States:

    DIRECT    queues -> one outstanding produce batch per partition -> Kafka
    FAILOVER  a send failed: wait for the other outstanding batches to settle, then move
              every unacked batch to the spool in submit order
    SPOOLING  new batches go to the spool (after the older ones: ordering); a replay task
              sends the spool oldest-first and switches back to DIRECT once it is empty

Delivery is at-least-once: a batch whose send timed out may still have been stored, and a
replayed round whose ack was lost is sent again. Every batch carries a per-node sequence
number (`next_seq`, persisted across restarts), so consumers drop repeats by (node, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka import codec as kafka_codec
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from enforcer.errors import ArmorstreamError
from sensor.metrics import SensorMetrics
from sensor.spool import Spool

__all__ = ["SeqAllocator", "Shipper", "ShipperConfig", "ShipperError", "ShipperState", "pick_compression"]

log = logging.getLogger(__name__)

RAW_TOPIC: Final = "armorstream.raw"


class ShipperError(ArmorstreamError):
    pass


class ShipperState(StrEnum):
    DIRECT = "direct"
    FAILOVER = "failover"
    SPOOLING = "spooling"


def pick_compression(wanted: str) -> str | None:
    """The codec to ask aiokafka for. "auto": zstd, else lz4, else gzip, by what is installed
    (aiokafka gets zstd, lz4 and snappy from the optional `cramjam` package)."""
    checks: dict[str, Callable[[], bool]] = {
        "zstd": kafka_codec.has_zstd, "lz4": kafka_codec.has_lz4,
        "snappy": kafka_codec.has_snappy, "gzip": kafka_codec.has_gzip,
    }  # fmt: skip
    if wanted == "none":
        return None
    if wanted == "auto":
        return next(name for name in ("zstd", "lz4", "gzip") if checks[name]())
    if wanted not in checks:
        raise ShipperError(f"unknown compression {wanted!r}: use auto, zstd, lz4, snappy, gzip or none")
    if not checks[wanted]():
        raise ShipperError(f"compression {wanted} needs the cramjam package (pip install cramjam)")
    return wanted


@dataclass(frozen=True, slots=True)
class ShipperConfig:
    bootstrap: str
    node: str
    topic: str = RAW_TOPIC
    compression: str = "auto"
    acks: str = "all"
    # With several messages per produce batch: how long a lone queued message waits for
    # company. Under load batches form anyway while the previous request is in flight.
    linger_ms: int = 5
    max_batch_size: int = 1 << 20  # bytes per produce batch (one per partition in flight)
    # Kafka messages (envelopes) per produce batch; 0 = as many as fit in max_batch_size.
    # 1 is the default because tansu's high watermark goes wrong after a multi-record batch
    # and consumers then stop seeing new records; an envelope already carries many events.
    max_messages_per_batch: int = 1
    max_request_size: int = 8 << 20
    request_timeout_ms: int = 10_000  # after this a send counts as failed and batches go to the spool
    retry_backoff_ms: int = 100
    reconnect_backoff_s: float = 0.5
    max_queued_bytes: int = 64 << 20  # submit() waits while this much is queued in memory
    replay_batch: int = 512  # spool entries read per replay round
    enable_idempotence: bool = False  # tansu lacks InitProducerId; turn on for real Kafka
    client_id: str = "armorstream-sensor"


class SeqAllocator:
    """Per-node batch sequence numbers that keep rising across restarts.

    Numbers are reserved in blocks: the end of the current block is written (atomically,
    fsynced) before any number in it is used, so after a crash the next process starts
    above everything the last one could have sent. Gaps are fine; repeats are not.
    """

    BLOCK: Final = 1 << 16

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            raw = path.read_bytes()
            self._next = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        except FileNotFoundError:
            self._next = 0
        self._limit = self._next

    def next(self) -> int:
        if self._next >= self._limit:
            self._reserve(self._next + self.BLOCK)
        n = self._next
        self._next += 1
        return n

    def _reserve(self, limit: int) -> None:
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, struct.pack("<Q", limit))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        self._limit = limit


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception())


@dataclass(slots=True)
class _Item:
    idx: int  # submit order, to merge per-partition leftovers back into one order
    key: bytes
    value: bytes
    events: int


class Shipper:
    """Owns the producer and the replay task; the caller owns the spool and closes it."""

    def __init__(self, config: ShipperConfig, spool: Spool, metrics: SensorMetrics | None = None) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics if metrics is not None else SensorMetrics(config.node)
        self.seqs = SeqAllocator(spool.config.directory / "seq")
        self.compression = pick_compression(config.compression)
        self.state = ShipperState.SPOOLING
        self._producer: AIOKafkaProducer | None = None
        self._partitions: list[int] = []
        self._partition_of: dict[bytes, int] = {}
        self._partitioner = DefaultPartitioner()
        self._queues: dict[int, deque[_Item]] = {}
        self._outstanding: dict[int, list[_Item]] = {}
        self._failed: list[_Item] = []
        self._queued_bytes = 0
        self._idx = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._replay: asyncio.Task[None] | None = None
        self._closing = False
        g = self.metrics.gauges
        g.spool_bytes = lambda: spool.disk_bytes
        g.spool_pending_batches = lambda: spool.pending_batches
        g.spool_pending_events = lambda: spool.pending_events
        g.connected = lambda: int(self.state == ShipperState.DIRECT)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> Shipper:
        """Connect if the broker is there; otherwise start in SPOOLING and keep trying."""
        if self.spool.empty and await self._connect():
            self.state = ShipperState.DIRECT
        else:
            self._enter_spooling()
        pump = asyncio.create_task(self._pump(), name="shipper-pump")
        pump.add_done_callback(_log_crash)
        self._tasks.append(pump)
        self._update_idle()
        return self

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: wait (up to `timeout`, default request_timeout_ms) for outstanding sends and the
        spool to drain, then keep whatever is not acked in the spool for the next start."""
        self._closing = True
        if timeout is None:
            timeout = self.config.request_timeout_ms / 1000
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        for task in [*self._tasks, *([self._replay] if self._replay else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Whatever did not make it is kept for the next start, in order.
        left = sorted([*self._failed, *(i for items in self._outstanding.values() for i in items),
                       *(i for q in self._queues.values() for i in q)], key=lambda i: i.idx)  # fmt: skip
        self._failed.clear()
        self._outstanding.clear()
        self._queues.clear()
        for item in left:
            self._to_spool(item)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(KafkaError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(producer.stop(), 5)

    async def __aenter__(self) -> Shipper:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def flush(self) -> None:
        """Wait until every submitted batch is acked by Kafka (spool included)."""
        while True:
            self._update_idle()
            if self._idle.is_set():
                return
            await self._idle.wait()

    def next_seq(self) -> int:
        return self.seqs.next()

    # ---- submitting ------------------------------------------------------------------------
    async def submit(self, key: bytes, value: bytes, events: int) -> None:
        """Hand one batch over. Never raises for broker trouble; waits only for memory room."""
        c = self.metrics.counters
        c.events_seen += events
        c.batches_seen += 1
        if self.state == ShipperState.SPOOLING:
            self._to_spool(_Item(self._next_idx(), key, value, events))
            return
        while self._queued_bytes >= self.config.max_queued_bytes:
            self._room.clear()
            await self._room.wait()
            if self._spooling():  # a failover happened while we waited
                self._to_spool(_Item(self._next_idx(), key, value, events))
                return
        item = _Item(self._next_idx(), key, value, events)
        self._queues.setdefault(self._partition(key), deque()).append(item)
        self._queued_bytes += len(value)
        self._idle.clear()
        self._wake.set()

    def _spooling(self) -> bool:
        return self.state == ShipperState.SPOOLING

    def _next_idx(self) -> int:
        self._idx += 1
        return self._idx

    def _partition(self, key: bytes) -> int:
        p = self._partition_of.get(key)
        if p is None:
            p = self._partitioner(key, self._partitions, self._partitions)
            self._partition_of[key] = p
        return p

    def _to_spool(self, item: _Item) -> None:
        c = self.metrics.counters
        if self.spool.append(item.key, item.value, item.events):
            c.events_spooled += item.events
            c.batches_spooled += 1
        else:
            c.events_dropped_user += item.events
            c.batches_dropped_user += 1
        self._idle.clear()
        self._kick_replay()

    # ---- the direct path -------------------------------------------------------------------
    async def _pump(self) -> None:
        linger = self.config.linger_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.state == ShipperState.FAILOVER and not self._outstanding:
                self._finish_failover()
            if self.state != ShipperState.DIRECT:
                self._update_idle()
                continue
            lone = any(p not in self._outstanding and len(q) == 1 for p, q in self._queues.items())
            if linger and lone and self.config.max_messages_per_batch != 1:
                await asyncio.sleep(linger)  # let a lone batch gather company
            for p, q in list(self._queues.items()):
                if q and p not in self._outstanding and self.state == ShipperState.DIRECT:
                    await self._dispatch(p, q)
            self._update_idle()

    async def _dispatch(self, partition: int, q: deque[_Item]) -> None:
        assert self._producer is not None
        batch = self._producer.create_batch()
        items: list[_Item] = []
        limit = self.config.max_messages_per_batch or 1 << 62
        while q and len(items) < limit:
            if batch.append(key=q[0].key, value=q[0].value, timestamp=None) is None:
                break
            items.append(q.popleft())
        if not items:  # larger than max_batch_size on its own: it can never be sent
            big = q.popleft()
            log.error("batch of %d bytes exceeds max_batch_size %d: dropped", len(big.value),
                      self.config.max_batch_size)  # fmt: skip
            self.metrics.counters.events_dropped_user += big.events
            self.metrics.counters.batches_dropped_user += 1
            self._queued_bytes -= len(big.value)
            self._wake.set()
            return
        self._outstanding[partition] = items
        try:
            fut = await self._producer.send_batch(batch, self.config.topic, partition=partition)
        except (KafkaError, OSError) as e:
            self._settle(partition, e)
            return
        fut.add_done_callback(lambda f: self._settle(partition, None if f.cancelled() else f.exception()))

    def _settle(self, partition: int, error: BaseException | None) -> None:
        items = self._outstanding.pop(partition, [])
        size = sum(len(i.value) for i in items)
        self._queued_bytes -= size
        c = self.metrics.counters
        if error is None:
            c.batches_shipped += len(items)
            c.events_shipped += sum(i.events for i in items)
        else:
            c.send_failures += 1
            log.warning("send to %s partition %d failed (%s): spooling", self.config.topic, partition, error)
            self._failed.extend(items)
            if self.state == ShipperState.DIRECT:
                self.state = ShipperState.FAILOVER
        if self._queued_bytes < self.config.max_queued_bytes:
            self._room.set()
        self._wake.set()

    def _finish_failover(self) -> None:
        # Nothing is in flight any more, so nothing older can still reach Kafka: the failed
        # batches, then everything queued behind them, go to the spool in submit order.
        left = sorted([*self._failed, *(i for q in self._queues.values() for i in q)], key=lambda i: i.idx)
        self._failed.clear()
        self._queues.clear()
        self._queued_bytes = 0
        self._enter_spooling()
        for item in left:
            self._to_spool(item)
        self._room.set()

    def _enter_spooling(self) -> None:
        self.state = ShipperState.SPOOLING
        self._kick_replay()

    def _update_idle(self) -> None:
        busy = self._outstanding or any(self._queues.values()) or self._failed or not self.spool.empty
        if busy:
            self._idle.clear()
        else:
            self._idle.set()

    # ---- the spool path --------------------------------------------------------------------
    def _kick_replay(self) -> None:
        if self.state == ShipperState.SPOOLING and not self._closing and (
            self._replay is None or self._replay.done()
        ):
            self._replay = asyncio.create_task(self._replay_loop(), name="shipper-replay")
            self._replay.add_done_callback(_log_crash)

    async def _connect(self) -> bool:
        if self._producer is not None:
            return True
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap, client_id=cfg.client_id, acks=cfg.acks,
            compression_type=self.compression, max_batch_size=cfg.max_batch_size,
            max_request_size=cfg.max_request_size, linger_ms=0,  # our batches are complete when handed over
            request_timeout_ms=cfg.request_timeout_ms, retry_backoff_ms=cfg.retry_backoff_ms,
            enable_idempotence=cfg.enable_idempotence,
        )  # fmt: skip
        try:
            await producer.start()
            parts = await asyncio.wait_for(producer.partitions_for(cfg.topic), cfg.request_timeout_ms / 1000)
        except (KafkaError, OSError, TimeoutError) as e:
            log.info("broker %s not reachable (%s); spooling", cfg.bootstrap, e)
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(producer.stop(), 2)
            return False
        if not parts:
            await producer.stop()
            return False
        self._partitions = sorted(parts)
        self._partition_of.clear()
        self._producer = producer
        return True

    async def _replay_loop(self) -> None:
        cfg = self.config
        c = self.metrics.counters
        stale = False
        while self.state == ShipperState.SPOOLING:
            if not await self._connect():
                await asyncio.sleep(cfg.reconnect_backoff_s)
                continue
            assert self._producer is not None
            if stale and not await self._refresh_partitions():
                await asyncio.sleep(cfg.reconnect_backoff_s)
                continue
            stale = False
            entries = self.spool.read(max_entries=cfg.replay_batch, max_bytes=cfg.max_batch_size * 4)
            if not entries:
                # Spool drained with no await since the check: later batches may go direct.
                self.state = ShipperState.DIRECT
                self._wake.set()
                self._update_idle()
                return
            # One produce batch per partition per round; stop at the first entry that does
            # not fit its partition's batch so that the ack covers a contiguous prefix.
            batches: dict[int, Any] = {}
            counts: dict[int, int] = {}
            n = 0
            limit = cfg.max_messages_per_batch or 1 << 62
            for e in entries:
                p = self._partition(e.key)
                b = batches.get(p)
                if b is None:
                    b = batches[p] = self._producer.create_batch()
                    counts[p] = 0
                if counts[p] >= limit or b.append(key=e.key, value=e.value, timestamp=None) is None:
                    break
                counts[p] += 1
                n += 1
            if n == 0:
                log.error("spooled batch of %d bytes exceeds max_batch_size: skipped", len(entries[0].value))
                c.events_dropped_user += entries[0].events
                c.batches_dropped_user += 1
                self.spool.ack(entries[0].end)
                self.spool.rewind()
                continue
            ok = await self._send_round(batches)
            if ok:
                self.spool.ack(entries[n - 1].end)
                c.batches_replayed += n
                c.events_replayed += sum(e.events for e in entries[:n])
            else:
                c.send_failures += 1
                stale = True  # a broker that came back may have a different partition count
                await asyncio.sleep(cfg.reconnect_backoff_s)
            self.spool.rewind()  # read-ahead past what was sent is read again next round

    async def _refresh_partitions(self) -> bool:
        assert self._producer is not None
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(self.config.topic),
                                           self.config.request_timeout_ms / 1000)  # fmt: skip
        except (KafkaError, OSError, TimeoutError):
            return False
        if not parts:
            return False
        if sorted(parts) != self._partitions:
            log.warning("topic %s now has %d partitions (was %d)", self.config.topic, len(parts),
                        len(self._partitions))  # fmt: skip
            self._partitions = sorted(parts)
            self._partition_of.clear()
        return True

    async def _send_round(self, batches: dict[int, Any]) -> bool:
        assert self._producer is not None
        try:
            futs = [await self._producer.send_batch(b, self.config.topic, partition=p)
                    for p, b in batches.items() if b.record_count()]  # fmt: skip
            results = await asyncio.gather(*futs, return_exceptions=True)
        except (KafkaError, OSError) as e:
            log.info("replay send failed (%s); retrying", e)
            return False
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.info("replay send failed (%s); retrying", errors[0])
        return not errors
