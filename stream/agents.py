"""The Faust agent over raw batches, and the runtime it delivers through (top of the Faust layers).

Throughput comes from batches: one raw Kafka message is an envelope of many
records, the agent takes up to `take_max` messages at a time, and everything
after that is per batch (stream.worker), never an `await` per event.

Delivery order for a step: dead letters, SIEM records (aiokafka producer
batches, one per partition), ClickHouse rows; only then are the raw messages
acked, so Faust commits an offset only once everything that came from it is
out. A message whose events wait for late metadata stays unacked until they
leave the late buffer.

Control topics are read by a plain group-less consumer from the beginning,
not by a consumer-group agent: every worker needs every container's metadata,
whichever raw partitions it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import faust
import mode
import numpy as np
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from enforcer.control import ControlError
from enforcer.envelope import decode_header
from enforcer.errors import ArmorstreamError
from stream.alerts import EVENT_ID_HEADER, AlertThrottle, SiemBatch, SiemEncoder
from stream.app import StreamSettings, make_app
from stream.join import AckToken, LateBuffer, MetadataState
from stream.recordbatch import Batcher, RecordColumns
from stream.topics import StreamTopics
from stream.worker import BatchProcessor, Group, Output, RawMessage, groups_table

__all__ = ["ClickHouseHistory", "Sink", "StreamError", "StreamRuntime", "build"]

log = logging.getLogger(__name__)

ORIGIN_HEADER = "armorstream-origin"  # a dead letter's raw message: b"topic/partition/offset"


class StreamError(ArmorstreamError):
    pass


class Sink(Protocol):
    """Where processed groups go for history (ClickHouse). Synchronous: run in a thread."""

    def write(self, groups: Sequence[Group]) -> None: ...

    def stored(self, ids: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which raw batches (node, seq) are already stored; empty when that cannot be known."""
        ...

    def write_marks(self, marks: list[tuple[str, int, str, int, int]]) -> None:
        """(raw topic, raw partition, SIEM topic, SIEM partition, offset): what was sent for raw
        messages not yet stored lies at or above the offset."""
        ...

    def marks(self, raw_topic: str, raw_partition: int) -> dict[tuple[str, int], int]:
        """The newest mark per SIEM (topic, partition) of a raw partition; empty when unknown."""
        ...


class ClickHouseHistory:
    """The store's sink behind the `Sink` seam: one insert per step, retried while ClickHouse is away.

    Retrying here (in the delivery thread) is the back-pressure: the step stays in flight,
    the agent stops taking raw messages once `max_inflight` steps wait, and nothing is acked.
    """

    def __init__(self, target: str, cluster: str, retry_s: float = 1.0) -> None:
        from stream.store import Sink as StoreSink
        from stream.store import StoreConfig, open_store

        if target.startswith("chdb:"):
            config = StoreConfig(path=Path(target.removeprefix("chdb:")))
        elif target.startswith(("http://", "https://")):
            config = StoreConfig(url=target)
        else:
            raise StreamError(f"ClickHouse target {target!r}: expected chdb:DIR or an http(s):// URL")
        self.store = open_store(config)
        self.sink = StoreSink(self.store)
        self.cluster = cluster
        self.retry_s = retry_s
        self._lock = threading.Lock()  # one client, used from executor threads
        self.rows = 0

    def write(self, groups: Sequence[Group]) -> None:
        from stream.store import StoreUnavailable

        table = groups_table(groups, self.cluster)
        with self._lock:
            while True:
                try:
                    self.rows += self.sink.insert(table).rows
                    return
                except StoreUnavailable as e:
                    log.warning("ClickHouse unavailable, retrying in %.1fs: %s", self.retry_s, e)
                    time.sleep(self.retry_s)

    def stored(self, ids: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        from stream.store import StoreError

        with self._lock:
            try:
                return self.sink.stored_batches(list(ids))
            except StoreError as e:  # ClickHouse away: send anyway (at least once), the insert waits
                log.info("stored batches unknown, sending the step: %s", e)
                return set()

    def write_marks(self, marks: list[tuple[str, int, str, int, int]]) -> None:
        with self._lock:
            self.sink.write_marks(marks)

    def marks(self, raw_topic: str, raw_partition: int) -> dict[tuple[str, int], int]:
        from stream.store import StoreError

        with self._lock:
            try:
                return self.sink.marks(raw_topic, raw_partition)
            except StoreError as e:
                log.warning("SIEM marks of raw partition %d unknown: %s", raw_partition, e)
                return {}

    def close(self) -> None:
        self.store.close()


class StreamRuntime(mode.Service):
    """Producer, control-topic reader and late-metadata timer shared by the agent."""

    def __init__(self, settings: StreamSettings, processor: BatchProcessor, sink: Sink | None = None,
                 **kwargs: Any) -> None:
        self.settings = settings
        self.processor = processor
        self.sink = sink
        self.producer: AIOKafkaProducer | None = None
        self.control: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self.caught_up = asyncio.Event()  # control topics read to their end (or the wait ran out)
        self.stream: faust.StreamT[Any] | None = None
        self._partitions: dict[str, int] = {}
        self._part_of: dict[tuple[str, bytes], int] = {}
        self._batchers: dict[str, Batcher] = {}  # per SIEM topic: its compression ratio so far
        self.sent = {"alerts": 0, "logs": 0, "dead": 0}
        self.failure: BaseException | None = None
        self.deliveries: set[asyncio.Future[None]] = set()
        self._next_offset: dict[int, int] = {}  # raw partition -> the offset that follows the last one
        self._checking: set[int] = set()  # raw partitions whose batches may be re-deliveries (stored)
        # Exactly once on the SIEM topics (see `stored` and `_write_marks`):
        self.app: faust.App | None = None  # for the raw partitions this worker owns
        self._siem_end: dict[tuple[str, int], int] = {}  # SIEM partition -> end after our last acked batch
        self._open: dict[int, dict[tuple[str, int], int]] = {}  # id(token) -> _siem_end as its sends began
        self._marked_at = 0.0
        self._scanned: set[int] = set()  # raw partitions whose SIEM records were read back
        self._sent_ids: set[bytes] = set()  # event ids found on the SIEM topics (catch-up only)
        self._sent_batches: set[tuple[str, int]] = set()  # their raw batches
        self._sent_origins: set[bytes] = set()  # raw messages already on the dead-letter topic
        self.already_sent = 0  # records not sent again: found on the SIEM topics after a restart
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        s = self.settings
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.broker, acks="all", enable_idempotence=s.idempotent_producer,
            linger_ms=5, max_batch_size=s.siem_batch_bytes, max_request_size=4 * 1024 * 1024,
            compression_type=s.siem_compression,
        )
        self.control = AIOKafkaConsumer(
            *self.processor.state.topics(), bootstrap_servers=s.broker, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest",
        )
        await self.producer.start()
        await self.control.start()
        # Where our sends will begin on each SIEM partition: the marks' starting point.
        with contextlib.suppress(KafkaError):
            tps = await self._siem_partitions()
            self._siem_end = {(tp.topic, tp.partition): off
                              for tp, off in (await self.control.end_offsets(tps)).items()}
        self.ready.set()

    async def _siem_partitions(self) -> list[TopicPartition]:
        assert self.producer is not None
        s = self.settings
        return [TopicPartition(t, p) for t in (s.alerts_topic, s.logs_topic, s.dead_letter_topic)
                for p in sorted(await self.producer.partitions_for(t))]

    async def on_stop(self) -> None:
        # Steps already sent to the SIEM topics finish their ClickHouse insert before we go.
        if self.deliveries:
            await asyncio.wait(self.deliveries, timeout=self.settings.stop_timeout_s)
        # What still waits for metadata goes out flagged rather than being lost.
        with contextlib.suppress(Exception):
            await self.deliver(self.processor.flush_late(all_=True))
        for c in (self.control, self.producer):
            if c is not None:
                with contextlib.suppress(KafkaError):
                    await c.stop()
        with contextlib.suppress(Exception):
            await self._write_marks(force=True)
        if isinstance(self.sink, ClickHouseHistory):
            self.sink.close()
        log.info("stream counters at stop: %s sent=%s already_sent=%d", self.processor.counters(), self.sent,
                 self.already_sent)

    @mode.Service.task
    async def _control_loop(self) -> None:
        await self.ready.wait()
        assert self.control is not None
        end: dict[Any, int] | None = None
        deadline = time.monotonic() + self.settings.control_catchup_s
        while not self.should_stop:
            batches = await self.control.getmany(timeout_ms=200, max_records=10_000)
            state = self.processor.state
            policy_topics = {state.view.topics.policies, state.view.topics.namespaces}
            applied, rebuild = 0, False
            for tp, msgs in batches.items():
                for m in msgs:
                    try:
                        state.apply(tp.topic, m.key, m.value)
                    except ControlError as e:
                        where = f"{tp.topic}/{tp.partition}/{m.offset}"
                        log.warning("control record %s skipped: %s", where, e)
                        continue
                    applied += 1
                    rebuild = rebuild or tp.topic in policy_topics
            if rebuild:
                self.processor.verdicts.rebuild(state.view)
            if not self.caught_up.is_set():
                end = await self._catch_up(end, deadline)
            if applied:
                await self.deliver(self.processor.flush_late())

    async def _catch_up(self, end: dict[Any, int] | None, deadline: float) -> dict[Any, int] | None:
        """Raw batches wait (boundedly) until the control topics are read up to their end at start.

        tansu reports end offsets too high after multi-record batches; the deadline keeps
        that from blocking the stream: it then starts with what it has read.
        """
        assert self.control is not None
        tps = self.control.assignment()
        if end is None and tps:
            end = await self.control.end_offsets(list(tps))
        done = end is not None
        for tp, off in (end or {}).items():
            done = done and await self._position(tp) >= off
        if done or time.monotonic() > deadline:
            if not done:
                log.warning("control topics not read to their end within %.1fs; starting anyway",
                            self.settings.control_catchup_s)
            if self.processor.verdicts.matcher is None:  # no policy record seen: still a matcher
                self.processor.verdicts.rebuild(self.processor.state.view)
            self.caught_up.set()
        return end

    async def _position(self, tp: Any) -> int:
        assert self.control is not None
        return int(await self.control.position(tp))

    @mode.Service.timer(0.25)
    async def _late_timer(self) -> None:
        if self.ready.is_set() and self.processor.late.items:
            await self.deliver(self.processor.flush_late())

    @mode.Service.timer(10.0)
    async def _report(self) -> None:
        log.info("stream counters: %s sent=%s already_sent=%d", self.processor.counters(), self.sent,
                 self.already_sent)

    def delivered(self, inflight: asyncio.Semaphore, task: asyncio.Future[None]) -> None:
        inflight.release()
        self.deliveries.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("delivery failed; the step's raw messages stay unacked: %s", e)
            self.failure = e

    def check(self) -> None:
        """Stop the agent after a failed delivery: Kafka re-delivers the unacked messages."""
        if self.failure is not None:
            raise StreamError(f"delivery failed: {self.failure}") from self.failure

    async def stored(self, msgs: Sequence[RawMessage], positions: Sequence[tuple[int, int]]
                     ) -> set[tuple[str, int]]:
        """The step's raw batches already in the store: re-deliveries after a crash between the
        store's insert and the offset commit (Faust commits every few seconds), whose Alerts and
        Logs went out before.

        Only a partition that starts or jumps (its first message here, or an offset that does
        not follow the last one: a restart, a rebalance) is checked, one ledger query per step,
        until a step of it finds nothing stored; a partition read in order costs nothing.
        `positions` are the messages' (partition, offset)."""
        if self.sink is None or self.settings.resend_stored:
            return set()
        ids: dict[tuple[str, int], int] = {}
        for m, (part, off) in zip(msgs, positions, strict=True):
            follows = self._next_offset.get(part) == off
            self._next_offset[part] = off + 1
            if follows and part not in self._checking:
                continue
            self._checking.add(part)
            with contextlib.suppress(ArmorstreamError):  # a malformed one goes to the dead letters
                hdr = decode_header(m.value)
                ids[(hdr.node, hdr.seq)] = part
        if not ids:
            return set()
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self.sink.stored, list(ids))
        new = self._checking - self._scanned
        if new:  # what went out for raw messages not stored (a crash between the two)
            await self._scan_sent(new)
        sent = {i for i in ids if i not in found and i in self._sent_batches}
        for part in set(ids.values()) - {ids[i] for i in found | sent if i in ids}:
            self._checking.discard(part)  # caught up with what the store and the SIEM topics have
        if not self._checking:
            self._scanned.clear()
            self._sent_ids, self._sent_batches = set(), set()
        return found

    async def _scan_sent(self, parts: set[int]) -> None:
        """Read the SIEM topics from the raw partitions' marks to their end and keep the event ids
        found there: records of raw messages that were sent but not stored before a crash, which
        `deliver` then leaves out. Without a mark, the last `siem_scan_max` records per SIEM
        partition are read."""
        assert self.sink is not None
        s = self.settings
        self._scanned |= parts
        loop = asyncio.get_running_loop()
        lows: dict[tuple[str, int], int] = {}
        missing = False
        for p in sorted(parts):
            m = await loop.run_in_executor(None, self.sink.marks, s.raw_topic, p)
            missing = missing or not m
            for tp, off in m.items():
                lows[tp] = min(lows.get(tp, off), off)
        tps = await self._siem_partitions()
        c = AIOKafkaConsumer(bootstrap_servers=s.broker, group_id=None, enable_auto_commit=False,
                             max_partition_fetch_bytes=8 << 20)
        t0, n = time.monotonic(), 0
        await c.start()
        try:
            c.assign(tps)
            ends = await c.end_offsets(tps)
            begins = await c.beginning_offsets(tps)
            todo = set()
            for tp in tps:
                low = lows.get((tp.topic, tp.partition), 0) if not missing else 0
                start = max(low, begins[tp], ends[tp] - s.siem_scan_max)
                if start < ends[tp]:
                    c.seek(tp, start)
                    todo.add(tp)
            deadline = time.monotonic() + 120
            while todo:
                got = await c.getmany(*todo, timeout_ms=500, max_records=50_000)
                for recs in got.values():
                    for r in recs:
                        n += 1
                        for k, v in r.headers or ():
                            if k == EVENT_ID_HEADER:
                                self._sent_ids.add(v)
                            elif k == ORIGIN_HEADER:  # a dead letter's raw message
                                self._sent_origins.add(v)
                for tp in list(todo):
                    if await c.position(tp) >= ends[tp]:
                        todo.discard(tp)
                if todo and time.monotonic() > deadline:
                    log.warning("SIEM topics not read back within 120 s: records may be sent twice")
                    break
        finally:
            await c.stop()
        for i in self._sent_ids:
            node, seq, _ = i.decode(errors="replace").split("/", 2)
            self._sent_batches.add((node, int(seq)))
        where = f"no marks: the last {s.siem_scan_max} per partition" if missing else "from their marks"
        log.info("raw partitions %s: read %d SIEM records back in %.2f s (%s); %d event ids of %d raw "
                 "batches, left out unless stored", sorted(parts), n, time.monotonic() - t0, where,
                 len(self._sent_ids), len(self._sent_batches))

    async def deliver(self, out: Output) -> None:
        """Send everything in `out`, store it, then release (and ack) what it came from."""
        await self.ready.wait()
        s = self.settings
        futs: list[asyncio.Future[Any]] = []
        assert self.producer is not None
        if self._sent_ids:
            out.siem, n = out.siem.without(self._sent_ids)
            self.already_sent += n
        if self._sent_origins and out.dead:
            keep = [d for d in out.dead if d.origin.encode() not in self._sent_origins]
            self._sent_origins.difference_update(d.origin.encode() for d in out.dead)
            self.already_sent += len(out.dead) - len(keep)
            out.dead = keep
        began = dict(self._siem_end)  # this step's records land at or above these offsets
        for tok in out.released:
            self._open.setdefault(id(tok), began)
        for d in out.dead:
            headers = [("armorstream-error", d.reason.encode()), (ORIGIN_HEADER, d.origin.encode())]
            fut = await self.producer.send(s.dead_letter_topic, d.value, key=d.key, headers=headers)
            fut.add_done_callback(self._acked_record)
            futs.append(fut)
        # chunk by chunk (each an encoded part of the step), in order: joining them first
        # would copy every record once more
        for chunk in out.siem.alert_chunks:
            futs += await self._send(s.alerts_topic, chunk)
        for chunk in out.siem.log_chunks:
            futs += await self._send(s.logs_topic, chunk)
        if futs:
            await asyncio.gather(*futs)
        alerts, logs = out.siem.counts
        self.sent["dead"] += len(out.dead)
        self.sent["alerts"] += alerts
        self.sent["logs"] += logs
        out.siem, out.dead = SiemBatch(), []  # sent: not held through the ClickHouse insert
        done = [tok for tok in out.released if tok.release()]
        groups = out.groups + [g for tok in done for g in tok.groups]
        if self.sink is not None and groups:
            await asyncio.get_running_loop().run_in_executor(None, self.sink.write, groups)
        for tok in done:
            self._open.pop(id(tok), None)
        if self.stream is not None:
            for tok in done:
                if tok.event is not None:
                    await self.stream.ack(tok.event)
        await self._write_marks()

    async def _write_marks(self, force: bool = False) -> None:
        """For each raw partition this worker owns (and has caught up with): per SIEM partition,
        the offset at or above which lie all records it sent for raw messages not yet stored.

        A step's records follow every record acked before its sends began (`_siem_end` then), so
        the lowest such snapshot among unstored steps is a bound; with none open, the end of our
        last acked batch. At most every `mark_interval_s`; a failed write only costs a longer
        read-back after a crash."""
        if self.sink is None or self.settings.resend_stored or self.app is None:
            return
        now = time.monotonic()
        if not force and now - self._marked_at < self.settings.mark_interval_s:
            return
        self._marked_at = now
        s = self.settings
        try:
            owned = [tp.partition for tp in self.app.consumer.assignment() if tp.topic == s.raw_topic]
        except Exception:  # no consumer yet, or being rebalanced: next time
            return
        owned = [p for p in owned if p not in self._checking]
        rows = []
        opened = list(self._open.values())
        for tp, end in self._siem_end.items():
            if any(tp not in snap for snap in opened):
                continue  # an open step began before this partition's end was known
            low = min((snap[tp] for snap in opened), default=end)
            rows += [(s.raw_topic, p, tp[0], tp[1], low) for p in owned]
        if rows:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.sink.write_marks, rows)
            except ArmorstreamError as e:
                log.warning("SIEM marks not written: %s", e)

    async def _send(self, topic: str, records: RecordColumns) -> list[asyncio.Future[Any]]:
        """Producer batches, one stream of them per partition, keyed like Kafka's default partitioner;
        each record with its event id header. The batches are encoded column-wise
        (stream.recordbatch) and handed to aiokafka whole."""
        if not len(records):
            return []
        assert self.producer is not None
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self.producer.partitions_for(topic))
        # Keys are namespace/pod: a few distinct ones per step, one murmur2 each.
        keys = pc.dictionary_encode(records.keys)
        part_of = self._part_of
        if len(part_of) > 100_000:  # pods come and go
            part_of.clear()
        parts = []
        for k in keys.dictionary.to_pylist():
            p = part_of.get((topic, k))
            if p is None:
                p = part_of[(topic, k)] = (murmur2(k) & 0x7FFFFFFF) % n
            parts.append(p)
        rows = np.array(parts, np.int64)[keys.indices.to_numpy(zero_copy_only=False)]
        batcher = self._batchers.get(topic)
        if batcher is None:
            s = self.settings
            batcher = self._batchers[topic] = Batcher(EVENT_ID_HEADER.encode(), s.siem_compression,
                                                      max_bytes=s.siem_batch_bytes)
        batches = batcher.batches(records, rows)
        futs = []
        for p, batch in batches:
            futs.append(await self._enqueue(batch, topic, p, batch.record_count()))
        return futs

    def _acked(self, tp: tuple[str, int], n: int, fut: asyncio.Future[Any]) -> None:
        """A producer batch of `n` records on `tp` is acked at its base offset."""
        if not fut.cancelled() and fut.exception() is None:
            self._advance(tp, fut.result().offset + n)

    def _acked_record(self, fut: asyncio.Future[Any]) -> None:
        """One record (a dead letter) is acked; its metadata names its partition."""
        if not fut.cancelled() and fut.exception() is None:
            md = fut.result()
            self._advance((md.topic, md.partition), md.offset + 1)

    def _advance(self, tp: tuple[str, int], end: int) -> None:
        if end > self._siem_end.get(tp, -1):
            self._siem_end[tp] = end

    async def _enqueue(self, batch: Any, topic: str, partition: int, n: int) -> asyncio.Future[Any]:
        """send_batch, waiting as long as the broker keeps draining.

        aiokafka queues one batch per partition and makes send_batch wait for the one
        before it; its wait loop deducts the time already waited again on every wake-up, so
        a step with many batches for one partition can time out within seconds although
        the broker is draining. Waiting again is safe: a batch that timed out was not queued.
        """
        assert self.producer is not None
        deadline = time.monotonic() + self.settings.produce_timeout_s
        while True:
            try:
                fut: asyncio.Future[Any] = await self.producer.send_batch(batch, topic, partition=partition)
                fut.add_done_callback(partial(self._acked, (topic, partition), n))
                return fut
            except KafkaTimeoutError:
                if time.monotonic() > deadline:
                    raise


def shorten_fetch_wait(app: faust.App, ms: int) -> bool:
    """Set the raw consumer's fetch.max.wait.ms, which Faust fixes at 1.5 s.

    tansu answers a fetch at the end of the log only when that wait is up, even if records
    arrive meanwhile (Kafka answers as soon as they do), so a worker that catches up with
    the sensors idles up to 1.5 s per fetch. Faust has no setting for it: this reaches into
    its consumer thread's aiokafka fetcher, and says so when a Faust or aiokafka upgrade
    moved it.
    """
    consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
        log.warning("cannot shorten the raw consumer's fetch wait (Faust/aiokafka internals moved)")
        return False
    fetcher._fetch_max_wait_ms = ms
    return True


def build(settings: StreamSettings, sink: Sink | None = None) -> tuple[faust.App, StreamRuntime]:
    """The Faust app with its raw-batch agent, and the runtime to run beside it."""
    s = settings
    app = make_app(s)
    topics = StreamTopics.declare(app, s)
    processor = BatchProcessor(
        state=MetadataState.for_prefix(s.control_prefix),
        encoder=SiemEncoder(cluster=s.cluster, throttle=AlertThrottle(
            enabled=s.throttle, max_per_sec=s.max_alerts_per_sec, throttle_s=s.throttle_s)),
        late=LateBuffer(max_wait_s=s.late_wait_s, max_events=s.late_max_events),
    )
    if sink is None and s.clickhouse:
        sink = ClickHouseHistory(s.clickhouse, s.cluster)
    runtime = StreamRuntime(s, processor, sink)
    runtime.app = app

    @app.agent(topics.raw, name="armorstream.raw-batches")
    async def raw_batches(stream: faust.StreamT[bytes]) -> None:
        await runtime.caught_up.wait()
        if s.fetch_max_wait_ms is not None:
            shorten_fetch_wait(app, s.fetch_max_wait_ms)
        manual = stream.noack()  # type: ignore[attr-defined]  # Stream has it; StreamT does not declare it
        inflight = asyncio.Semaphore(s.max_inflight)
        runtime.stream = manual
        async for events in manual.take_events(s.take_max, within=s.take_within_s):
            t0 = time.perf_counter()
            msgs = []
            for ev in events:
                km = ev.message
                # take_events acks every event it yielded as soon as the next step is taken, even
                # on a noack() stream: before the step is stored. One more reference per message
                # keeps that ack from being the final one; `deliver` gives the last (Faust commits
                # an offset once its message's references are all acked).
                km.incref()
                origin = f"{km.topic}/{km.partition}/{km.offset}"
                msgs.append(RawMessage(ev.value, ev.key, origin, AckToken(ev)))
            stored = await runtime.stored(msgs, [(ev.message.partition, ev.message.offset) for ev in events])
            out = processor.process_many(msgs, stored)
            out.released.extend(m.token for m in msgs if m.token is not None)
            # Deliver while the next step is decoded; at most max_inflight steps are in the
            # air, so a slow broker or store pushes back instead of filling memory.
            await inflight.acquire()
            runtime.check()
            task = asyncio.ensure_future(runtime.deliver(out))
            runtime.deliveries.add(task)
            task.add_done_callback(partial(runtime.delivered, inflight))
            log.debug("step: %d messages, %d events in %.1f ms", len(events), out.events,
                      (time.perf_counter() - t0) * 1e3)

    return app, runtime
