"""The shipper against a real tansu broker: order per container, broker outages, the spool.

Each event carries a per-container serial number in hdr.ktime_ns, so the tests check
every single event (not just batch counts) after dedupe by (node, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from enforcer.envelope import decode_batch, encode_batch
from enforcer.records import AS_SCHEMA_VERSION, EXIT_DTYPE, Kind
from sensor.shipper import Shipper, ShipperConfig, ShipperState, pick_compression
from sensor.spool import Spool, SpoolConfig
from tests.conftest import need

pytestmark = pytest.mark.broker

NODE = "node-a"
TOPIC = "armorstream.raw"
PARTITIONS = 4  # what tansu auto-creates, so a topic made by a metadata request matches


def container_key(i: int) -> bytes:
    return (0x1000 + i).to_bytes(8, "little")  # cgroup id bytes


class Workload:
    """Makes envelopes for K containers; remembers what each one sent."""

    def __init__(self, shipper: Shipper, containers: int) -> None:
        self.shipper = shipper
        self.containers = containers
        self.next_event = [0] * containers
        self.sent: dict[bytes, list[int]] = defaultdict(list)  # key -> seqs in submit order
        self.batches = 0
        self.rng = np.random.default_rng(7)

    async def send_one(self) -> None:
        c = self.batches % self.containers
        n = int(self.rng.integers(1, 20))
        recs = np.zeros(n, EXIT_DTYPE)
        h = recs["hdr"]
        h["kind"], h["version"], h["size"] = Kind.EXIT, AS_SCHEMA_VERSION, EXIT_DTYPE.itemsize
        h["cgroup_id"] = 0x1000 + c
        h["ktime_ns"] = np.arange(self.next_event[c], self.next_event[c] + n)
        self.next_event[c] += n
        seq = self.shipper.next_seq()
        value = encode_batch(Kind.EXIT, recs.tobytes(), node=NODE, seq=seq)
        key = container_key(c)
        self.sent[key].append(seq)
        self.batches += 1
        await self.shipper.submit(key, value, n)

    @property
    def events(self) -> int:
        return sum(self.next_event)


class Collector:
    """Consumes the raw topic (no group: all partitions, from the start of the log)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.msgs: list[tuple[bytes, int, str, list[int]]] = []  # key, seq, node, event serials

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=self.bootstrap, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                    request_timeout_ms=3000, retry_backoff_ms=50)  # fmt: skip
        await consumer.start()
        try:
            while not stop.is_set():
                for recs in (await consumer.getmany(timeout_ms=100)).values():
                    for m in recs:
                        assert m.key is not None and m.value is not None
                        hdr, arr = decode_batch(m.value)  # CRC and layout checked
                        assert (arr["hdr"]["cgroup_id"] == int.from_bytes(m.key, "little")).all()
                        self.msgs.append((m.key, hdr.seq, hdr.node, arr["hdr"]["ktime_ns"].tolist()))
        finally:
            await consumer.stop()

    def deduped(self) -> dict[bytes, list[tuple[int, list[int]]]]:
        seen: set[tuple[str, int]] = set()
        out: dict[bytes, list[tuple[int, list[int]]]] = defaultdict(list)
        for key, seq, node, events in self.msgs:
            if (node, seq) not in seen:
                seen.add((node, seq))
                out[key].append((seq, events))
        return out


def check_exactly_once_in_order(w: Workload, col: Collector) -> None:
    got = col.deduped()
    assert set(got) == set(w.sent)
    for key, sent in w.sent.items():
        assert [s for s, _ in got[key]] == sent, f"container {key.hex()}: batches missing or out of order"
        events = [e for _, evs in got[key] for e in evs]
        assert events == list(range(len(events)))  # every event once, in order
    assert sum(len(evs) for v in got.values() for _, evs in v) == w.events


async def create_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:  # the shipper's metadata request may have auto-created it already (same partitions)
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


def make_shipper(bootstrap: str, spool_dir: Path, **kw: object) -> tuple[Shipper, Spool]:
    spool = Spool(SpoolConfig(spool_dir, segment_bytes=1 << 18, max_bytes=64 << 20))
    cfg = ShipperConfig(bootstrap=bootstrap, node=NODE, request_timeout_ms=1500, linger_ms=2,
                        reconnect_backoff_s=0.2, **kw)  # type: ignore[arg-type]
    return Shipper(cfg, spool), spool


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def flow(w: Workload, stop: asyncio.Event, gate: asyncio.Event | None = None) -> None:
    while not stop.is_set():
        if gate is not None:
            await gate.wait()
        await w.send_one()
        await asyncio.sleep(0.002)


def test_ships_every_batch_in_order_per_container(broker: object, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap  # type: ignore[attr-defined]

    async def main() -> None:
        await create_topic(bootstrap)
        shipper, spool = make_shipper(bootstrap, tmp_path)
        col, stop = Collector(bootstrap), asyncio.Event()
        consume = asyncio.create_task(col.run(stop))
        async with shipper:
            assert shipper.state == ShipperState.DIRECT
            w = Workload(shipper, containers=6)
            for _ in range(600):
                await w.send_one()
            await asyncio.wait_for(shipper.flush(), 10)
        await wait_for(lambda: len(col.msgs) >= 600, 10, "the consumer")
        await asyncio.sleep(0.3)  # anything beyond 600 would be a bug: give it a chance to show
        stop.set()
        await consume
        spool.close()
        assert len(col.msgs) == 600  # no duplicates without an outage
        check_exactly_once_in_order(w, col)
        snap = shipper.metrics.snapshot()
        assert snap["batches_shipped"] == 600 and snap["events_shipped"] == w.events
        assert snap["batches_spooled"] == 0 and snap["events_dropped_user"] == 0

    asyncio.run(main())


def test_broker_paused_spools_then_replays_in_order(broker: object, tmp_path: Path) -> None:
    """SIGSTOP: the broker is unreachable but keeps its log; requests it holds may land late."""
    bootstrap = broker.bootstrap  # type: ignore[attr-defined]
    pid = broker.proc.pid  # type: ignore[attr-defined]

    async def main() -> None:
        await create_topic(bootstrap)
        shipper, spool = make_shipper(bootstrap, tmp_path)
        col, stop_consume, stop_flow = Collector(bootstrap), asyncio.Event(), asyncio.Event()
        consume = asyncio.create_task(col.run(stop_consume))
        await shipper.start()
        w = Workload(shipper, containers=5)
        produce = asyncio.create_task(flow(w, stop_flow))
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: shipper.state == ShipperState.SPOOLING, 8, "failover to the spool")
            await wait_for(lambda: spool.pending_batches > 50, 8, "batches in the spool")
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.5)
        stop_flow.set()
        await produce
        await asyncio.wait_for(shipper.flush(), 15)
        assert shipper.state == ShipperState.DIRECT and spool.empty
        await wait_for(lambda: len(col.deduped()) == 5 and sum(map(len, col.deduped().values())) >= w.batches,
                       10, "every batch at the consumer")  # fmt: skip
        stop_consume.set()
        await consume
        await shipper.stop()
        spool.close()
        check_exactly_once_in_order(w, col)
        snap = shipper.metrics.snapshot()
        assert snap["batches_spooled"] > 50 and snap["batches_replayed"] == snap["batches_spooled"]
        assert snap["batches_shipped"] + snap["batches_replayed"] >= w.batches
        assert snap["events_dropped_user"] == 0 and snap["send_failures"] >= 1

    asyncio.run(main())


def test_broker_killed_and_restarted_on_same_port(broker: object, tmp_path: Path) -> None:
    """kill -9: tansu's memory storage is lost, so count across both broker lifetimes."""
    from armorstream.embedded_broker import TansuBroker

    b = broker
    bootstrap = b.bootstrap  # type: ignore[attr-defined]

    async def main() -> None:
        await create_topic(bootstrap)
        shipper, spool = make_shipper(bootstrap, tmp_path)
        await shipper.start()
        w = Workload(shipper, containers=4)
        first, stop1 = Collector(bootstrap), asyncio.Event()
        consume1 = asyncio.create_task(first.run(stop1))
        stop_flow, gate = asyncio.Event(), asyncio.Event()
        gate.set()
        produce = asyncio.create_task(flow(w, stop_flow, gate))
        await asyncio.sleep(0.5)
        # tansu keeps its log in memory: what it acked must be read before it dies, or the
        # broker (not the shipper) loses it. So the flow pauses for that moment only.
        gate.clear()
        await asyncio.wait_for(shipper.flush(), 10)
        await wait_for(lambda: len(first.msgs) >= w.batches, 10, "the first consumer")
        stop1.set()  # (aiokafka's consumer.stop() trips over a dead broker)
        await consume1
        b.proc.kill()  # type: ignore[attr-defined]
        b.proc.wait()  # type: ignore[attr-defined]
        gate.set()  # batches flow on while the broker is gone
        await wait_for(lambda: shipper.state == ShipperState.SPOOLING, 8, "failover to the spool")
        await wait_for(lambda: spool.pending_batches > 30, 8, "batches in the spool")
        b.proc = None  # type: ignore[attr-defined]
        b.start()  # type: ignore[attr-defined]  # same port
        await create_topic(bootstrap)
        second, stop2 = Collector(bootstrap), asyncio.Event()
        consume2 = asyncio.create_task(second.run(stop2))
        await asyncio.sleep(0.5)
        stop_flow.set()
        await produce
        await asyncio.wait_for(shipper.flush(), 15)
        assert shipper.state == ShipperState.DIRECT and spool.empty
        await wait_for(lambda: len({s for _, s, _, _ in first.msgs + second.msgs}) >= w.batches, 10,
                       "every batch at the consumers")  # fmt: skip
        stop2.set()
        await consume2
        await shipper.stop()
        spool.close()
        col = Collector(bootstrap)
        col.msgs = first.msgs + second.msgs
        check_exactly_once_in_order(w, col)
        snap = shipper.metrics.snapshot()
        assert snap["batches_spooled"] > 30 and snap["batches_replayed"] == snap["batches_spooled"]
        assert snap["events_dropped_user"] == 0

    assert isinstance(b, TansuBroker)
    asyncio.run(main())


def test_starts_without_broker_and_keeps_spool_across_restart(tmp_path: Path) -> None:
    """No broker at all: batches go to the spool; a new shipper process finds them there."""
    from armorstream.embedded_broker import BrokerError, TansuBroker, free_port

    port = free_port()
    bootstrap = f"127.0.0.1:{port}"

    async def offline() -> Workload:
        shipper, spool = make_shipper(bootstrap, tmp_path)
        await shipper.start()
        assert shipper.state == ShipperState.SPOOLING
        w = Workload(shipper, containers=3)
        for _ in range(100):
            await w.send_one()
        assert spool.pending_batches == 100 and shipper.metrics.counters.batches_spooled == 100
        await shipper.stop(timeout=0.1)
        spool.close()
        return w

    w = asyncio.run(offline())
    try:
        broker = TansuBroker(port=port).start()
    except BrokerError as e:
        need(False, str(e))
        raise

    async def online() -> None:
        await create_topic(bootstrap)
        shipper, spool = make_shipper(bootstrap, tmp_path)
        assert spool.pending_batches == 100
        col, stop = Collector(bootstrap), asyncio.Event()
        consume = asyncio.create_task(col.run(stop))
        async with shipper:
            w.shipper = shipper
            for _ in range(50):  # new batches queue behind the spooled ones
                await w.send_one()
            await asyncio.wait_for(shipper.flush(), 10)
        await wait_for(lambda: len(col.msgs) >= 150, 10, "the consumer")
        stop.set()
        await consume
        spool.close()
        check_exactly_once_in_order(w, col)
        assert shipper.metrics.counters.batches_replayed >= 100

    try:
        asyncio.run(online())
    finally:
        broker.stop()


def test_spool_full_drops_are_counted(tmp_path: Path) -> None:
    from armorstream.embedded_broker import free_port

    async def main() -> None:
        spool = Spool(SpoolConfig(tmp_path, segment_bytes=1 << 14, max_bytes=1 << 16))
        shipper = Shipper(ShipperConfig(bootstrap=f"127.0.0.1:{free_port()}", node=NODE,
                                        request_timeout_ms=500, reconnect_backoff_s=5), spool)  # fmt: skip
        await shipper.start()
        w = Workload(shipper, containers=2)
        for _ in range(300):
            await w.send_one()
        c = shipper.metrics.counters
        assert c.batches_dropped_user > 0
        assert c.batches_spooled + c.batches_dropped_user == 300
        assert c.events_spooled + c.events_dropped_user == w.events == c.events_seen
        assert c.batches_spooled == spool.pending_batches and c.events_spooled == spool.pending_events
        await shipper.stop(timeout=0.1)
        spool.close()

    asyncio.run(main())


def test_metrics_over_http(tmp_path: Path) -> None:
    from armorstream.embedded_broker import free_port

    async def main() -> None:
        spool = Spool(SpoolConfig(tmp_path))
        shipper = Shipper(ShipperConfig(bootstrap=f"127.0.0.1:{free_port()}", node=NODE,
                                        reconnect_backoff_s=5), spool)  # fmt: skip
        await shipper.start()
        w = Workload(shipper, containers=1)
        for _ in range(3):
            await w.send_one()
        shipper.metrics.counters.events_dropped_kernel += 7
        stop = shipper.metrics.serve(0, "127.0.0.1")
        try:
            url = f"http://127.0.0.1:{shipper.metrics.port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            stop()
        assert f'armorstream_sensor_events_dropped_total{{node="{NODE}",where="kernel"}} 7.0' in body
        assert f'armorstream_sensor_batches_spooled_total{{node="{NODE}"}} 3.0' in body
        assert f'armorstream_sensor_spool_pending_events{{node="{NODE}"}} {float(w.events)}' in body
        assert f'armorstream_sensor_connected{{node="{NODE}"}} 0.0' in body
        snap = shipper.metrics.snapshot()
        assert snap["events_seen"] == w.events and snap["connected"] == 0
        await shipper.stop(timeout=0.1)
        spool.close()

    asyncio.run(main())


def test_compression_choice() -> None:
    assert pick_compression("auto") in {"zstd", "lz4", "gzip"}
    assert pick_compression("none") is None
    assert pick_compression("gzip") == "gzip"

