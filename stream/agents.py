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
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import faust
import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.partitioner import murmur2

from enforcer.control import ControlError
from enforcer.envelope import decode_header
from enforcer.errors import ArmorstreamError
from stream.alerts import AlertThrottle, SiemBatch, SiemEncoder
from stream.app import StreamSettings, make_app
from stream.join import AckToken, LateBuffer, MetadataState
from stream.topics import StreamTopics
from stream.worker import BatchProcessor, Group, Output, RawMessage, groups_table

__all__ = ["ClickHouseHistory", "Sink", "StreamError", "StreamRuntime", "build"]

log = logging.getLogger(__name__)


class StreamError(ArmorstreamError):
    pass


class Sink(Protocol):
    """Where processed groups go for history (ClickHouse). Synchronous: run in a thread."""

    def write(self, groups: Sequence[Group]) -> None: ...

    def stored(self, ids: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which raw batches (node, seq) are already stored; empty when that cannot be known."""
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
        self.sent = {"alerts": 0, "logs": 0, "dead": 0}
        self.failure: BaseException | None = None
        self.deliveries: set[asyncio.Future[None]] = set()
        self._next_offset: dict[int, int] = {}  # raw partition -> the offset that follows the last one
        self._checking: set[int] = set()  # raw partitions whose batches may be re-deliveries (stored)
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        s = self.settings
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.broker, acks="all", enable_idempotence=s.idempotent_producer,
            linger_ms=5, max_batch_size=512 * 1024, max_request_size=4 * 1024 * 1024,
            compression_type=s.siem_compression,
        )
        self.control = AIOKafkaConsumer(
            *self.processor.state.topics(), bootstrap_servers=s.broker, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest",
        )
        await self.producer.start()
        await self.control.start()
        self.ready.set()

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
        if isinstance(self.sink, ClickHouseHistory):
            self.sink.close()
        log.info("stream counters at stop: %s sent=%s", self.processor.counters(), self.sent)

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
        log.info("stream counters: %s sent=%s", self.processor.counters(), self.sent)

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
        found = await asyncio.get_running_loop().run_in_executor(None, self.sink.stored, list(ids))
        for part in set(ids.values()) - {ids[i] for i in found if i in ids}:
            self._checking.discard(part)  # caught up with what the store has
        return found

    async def deliver(self, out: Output) -> None:
        """Send everything in `out`, store it, then release (and ack) what it came from."""
        await self.ready.wait()
        s = self.settings
        futs: list[asyncio.Future[Any]] = []
        assert self.producer is not None
        for d in out.dead:
            headers = [("armorstream-error", d.reason.encode()), ("armorstream-origin", d.origin.encode())]
            futs.append(await self.producer.send(s.dead_letter_topic, d.value, key=d.key, headers=headers))
        futs += await self._send(s.alerts_topic, out.siem.alerts)
        futs += await self._send(s.logs_topic, out.siem.logs)
        if futs:
            await asyncio.gather(*futs)
        self.sent["dead"] += len(out.dead)
        self.sent["alerts"] += len(out.siem.alerts)
        self.sent["logs"] += len(out.siem.logs)
        out.siem, out.dead = SiemBatch(), []  # sent: not held through the ClickHouse insert
        done = [tok for tok in out.released if tok.release()]
        groups = out.groups + [g for tok in done for g in tok.groups]
        if self.sink is not None and groups:
            await asyncio.get_running_loop().run_in_executor(None, self.sink.write, groups)
        if self.stream is not None:
            for tok in done:
                if tok.event is not None:
                    await self.stream.ack(tok.event)

    async def _send(self, topic: str, records: list[tuple[bytes, bytes]]) -> list[asyncio.Future[Any]]:
        """Producer batches, one stream of them per partition, keyed like Kafka's default partitioner."""
        if not records:
            return []
        assert self.producer is not None
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self.producer.partitions_for(topic))
        # Records come in runs of one key (a container's events): one partition lookup per run.
        by_part: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        part_of = self._part_of
        if len(part_of) > 100_000:  # keys are namespace/pod: pods come and go
            part_of.clear()
        for k, run in groupby(records, key=itemgetter(0)):
            p = part_of.get((topic, k))
            if p is None:
                p = part_of[(topic, k)] = (murmur2(k) & 0x7FFFFFFF) % n
            by_part[p].extend(run)
        futs = []
        for p, recs in by_part.items():
            batch = self.producer.create_batch()
            for k, v in recs:
                if batch.append(key=k, value=v, timestamp=None) is None:
                    futs.append(await self._enqueue(batch, topic, p))
                    batch = self.producer.create_batch()
                    batch.append(key=k, value=v, timestamp=None)
            futs.append(await self._enqueue(batch, topic, p))
        return futs

    async def _enqueue(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
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
