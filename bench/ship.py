"""Shipping throughput to tansu, baseline and candidate in one run.

    baseline   one event record per Kafka message (aiokafka send() per event, linger batching)
    candidate  batch envelopes of --batch records per message through sensor.shipper.Shipper
    spool      append and replay (read + ack) rates of sensor.spool.Spool on local disk

Run: .venv/bin/python bench/ship.py [--events 200000] [--batch 256] [--compression auto]
Prints events/s for each, the candidate/baseline ratio, and the shipper's drop counters.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from armorstream.embedded_broker import TansuBroker
from enforcer.envelope import encode_batch
from enforcer.records import AS_SCHEMA_VERSION, FILE_DTYPE, Kind
from sensor.shipper import Shipper, ShipperConfig, pick_compression
from sensor.spool import Spool, SpoolConfig

CONTAINERS = 8
PATHS = [b"/usr/lib/x86_64-linux-gnu/libc.so.6", b"/etc/ld.so.cache", b"/proc/self/status",
         b"/var/lib/app/data/segment-000123.log", b"/tmp/tmpa8x2k1/scratch", b"/etc/passwd"]  # fmt: skip


def make_records(n: int, seed: int = 1) -> np.ndarray:
    """File-open records with plausible variety (compressors see realistic, not zero, data)."""
    rng = np.random.default_rng(seed)
    r = np.zeros(n, FILE_DTYPE)
    h = r["hdr"]
    h["kind"], h["version"], h["size"] = Kind.FILE, AS_SCHEMA_VERSION, FILE_DTYPE.itemsize
    h["ktime_ns"] = np.cumsum(rng.integers(1_000, 50_000, n)) + 10**12
    h["cgroup_id"] = 0x1000 + rng.integers(0, CONTAINERS, n)
    h["host_pid"] = rng.integers(1000, 60000, n)
    h["pid"] = h["host_pid"] % 5000
    h["uid"] = rng.choice([0, 1000, 65534], n)
    h["comm"] = rng.choice([b"nginx", b"python3", b"java", b"sh"], n)
    r["open_flags"] = rng.choice([0, 0o1, 0o2 | 0o100], n)
    r["ino"] = rng.integers(1, 1 << 40, n)
    r["path"] = rng.choice(PATHS, n)
    return r


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        await admin.close()


async def baseline(bootstrap: str, recs: np.ndarray, compression: str | None) -> float:
    topic = f"base-{time.monotonic_ns()}"
    await create_topic(bootstrap, topic)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20,
                         compression_type=compression)  # fmt: skip
    await p.start()
    size = FILE_DTYPE.itemsize
    buf = recs.tobytes()
    keys = [int(c).to_bytes(8, "little") for c in recs["hdr"]["cgroup_id"]]
    try:
        t0 = time.perf_counter()
        futs = []
        for i in range(len(recs)):
            futs.append(await p.send(topic, buf[i * size : (i + 1) * size], key=keys[i]))
        await p.flush()
        await asyncio.gather(*futs)
        return len(recs) / (time.perf_counter() - t0)
    finally:
        await p.stop()


async def candidate(bootstrap: str, recs: np.ndarray, batch: int, compression: str, per_req: int,
                    spool_dir: Path) -> tuple[float, dict[str, object]]:  # fmt: skip
    topic = f"cand-{time.monotonic_ns()}"
    await create_topic(bootstrap, topic)
    spool = Spool(SpoolConfig(spool_dir))
    cfg = ShipperConfig(bootstrap=bootstrap, node="bench", topic=topic, compression=compression,
                        max_messages_per_batch=per_req)  # fmt: skip
    shipper = await Shipper(cfg, spool).start()
    # Group by container as the sensor's drain does (one ring buffer's bytes per key).
    cg = recs["hdr"]["cgroup_id"]
    order = np.argsort(cg, kind="stable")
    grouped = recs[order]
    bounds = np.flatnonzero(np.diff(cg[order])) + 1
    try:
        t0 = time.perf_counter()
        for part in np.split(grouped, bounds):
            key = int(part["hdr"]["cgroup_id"][0]).to_bytes(8, "little")
            raw = part.tobytes()
            step = batch * FILE_DTYPE.itemsize
            for off in range(0, len(raw), step):
                chunk = raw[off : off + step]
                env = encode_batch(Kind.FILE, chunk, node="bench", seq=shipper.next_seq())
                await shipper.submit(key, env, len(chunk) // FILE_DTYPE.itemsize)
        await shipper.flush()
        rate = len(recs) / (time.perf_counter() - t0)
        return rate, shipper.metrics.snapshot()
    finally:
        await shipper.stop()
        spool.close()


def spool_rates(recs: np.ndarray, batch: int, spool_dir: Path) -> tuple[float, float, float]:
    raw = recs.tobytes()
    step = batch * FILE_DTYPE.itemsize
    envs = [encode_batch(Kind.FILE, raw[o : o + step], node="bench", seq=i)
            for i, o in enumerate(range(0, len(raw), step))]  # fmt: skip
    with Spool(SpoolConfig(spool_dir, max_bytes=8 << 30)) as sp:
        t0 = time.perf_counter()
        for e in envs:
            sp.append(b"k" * 8, e, batch)
        t_app = time.perf_counter() - t0
        t0 = time.perf_counter()
        while entries := sp.read(max_entries=512):
            sp.ack(entries[-1].end)
        t_rep = time.perf_counter() - t0
    mb = sum(map(len, envs)) / 1e6
    return len(envs) / t_app, len(recs) / t_rep, mb / t_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256, help="records per envelope")
    ap.add_argument("--compression", default="auto", help="auto, zstd, lz4, gzip, none")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    codec = pick_compression(args.compression)
    recs = make_records(args.events)
    print(f"{args.events} FILE records of {FILE_DTYPE.itemsize} B, {CONTAINERS} containers, "
          f"compression={codec}, envelope={args.batch} records")  # fmt: skip
    with TansuBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        async def run() -> None:
            await baseline(broker.bootstrap, make_records(2000, 2), codec)  # warm-up
            base = statistics.median([await baseline(broker.bootstrap, recs, codec)
                                      for _ in range(args.repeats)])  # fmt: skip
            print(f"baseline   1 record/message          {base:>12,.0f} events/s")
            for per_req, label in ((1, "1 message/request (tansu-safe)"), (0, "many messages/request")):
                rates, snap = [], {}
                for i in range(args.repeats):
                    r, snap = await candidate(broker.bootstrap, recs, args.batch, args.compression, per_req,
                                              Path(tmp) / f"c{per_req}-{i}")  # fmt: skip
                    rates.append(r)
                cand = statistics.median(rates)
                print(f"candidate  {label:<30} {cand:>12,.0f} events/s  {cand / base:6.1f}x baseline  "
                      f"(spooled {snap['events_spooled']}, dropped {snap['events_dropped_user']})")

        asyncio.run(run())
        app, rep, mbs = spool_rates(recs, args.batch, Path(tmp) / "spool")
        print(f"spool      append {app:,.0f} batches/s ({mbs:,.0f} MB/s, {app * args.batch:,.0f} events/s); "
              f"replay {rep:,.0f} events/s")


if __name__ == "__main__":
    main()
