"""Stream throughput: the naive Faust pipeline (one event per Kafka message, an await per
event) vs armorstream's stream (envelopes of many records, per-batch processing), in one run,
on one tansu broker, with the same generated FILE events of several pods, produced zstd-
compressed as the sensor ships them. Each run ends when its last Log record is on its logs
topic.

    naive + chdb   the issue's baseline: per event, decode, format the Log JSON and send it;
                   rows go into chdb (the same migrated schema) in inserts of 1,000 rows or
                   once a second (an insert per row would run ~40 events/s: too easy a baseline)
    naive          the same without the chdb insert (Kafka only): a stricter baseline
    armorstream    `armorstream stream` with its embedded chdb history (unless --no-clickhouse)

The target ratio (>= 100x) is against the issue's baseline; the ratio to the Kafka-only
naive pipeline is printed beside it.

    .venv/bin/python bench/stream_throughput.py [--naive-events 2000] [--events 600000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armorstream.embedded_broker import TansuBroker, free_port  # noqa: E402
from enforcer.control import CgroupRecord, ContainerRecord, ControlTopics, encode, encode_key  # noqa: E402
from enforcer.envelope import encode_batch  # noqa: E402
from enforcer.records import FILE_DTYPE, Kind  # noqa: E402
from stream.app import StreamSettings  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

NODE = "bench-node"
PROGRESS = bool(os.environ.get("BENCH_PROFILE") or os.environ.get("BENCH_PROGRESS"))
PODS = 8
BOOT = time.time_ns() - 10**12  # recent: the store keeps 30 days


def records(n: int, start: int) -> np.ndarray:
    r = np.zeros(n, FILE_DTYPE)
    h = r["hdr"]
    h["kind"], h["version"], h["size"] = Kind.FILE, 1, FILE_DTYPE.itemsize
    i = np.arange(start, start + n)
    h["ktime_ns"] = i * 1000
    h["cgroup_id"] = 100 + i % PODS
    h["host_pid"] = 1000 + i % 50
    h["pid"] = 1 + i % 50
    h["uid"] = 1000
    h["comm"] = b"python3"
    r["path"] = [f"/srv/data/file{j % 500}".encode() for j in i.tolist()]
    r["owner_uid"] = 0
    return r


def batches(total: int, per: int) -> list[bytes]:
    return [encode_batch(Kind.FILE, records(min(per, total - s), s).tobytes(), node=NODE, seq=s // per,
                         boot_wall_ns=BOOT)
            for s in range(0, total, per)]


async def control(s: StreamSettings) -> None:
    ct = ControlTopics(s.control_prefix)
    p = AIOKafkaProducer(bootstrap_servers=s.broker)
    await p.start()
    for k in range(PODS):
        cid = f"c{k}"
        rec = ContainerRecord(cid, "containerd", "bench", f"pod{k}", f"u{k}", "main", "img:1", NODE,
                              {"app": f"pod{k}"})
        await p.send(ct.containers, encode(rec), key=encode_key(cid))
        cg = CgroupRecord(NODE, 100 + k, cid, f"u{k}", "containerd")
        await p.send(ct.cgroups, encode(cg), key=encode_key(cg.key))
    await p.stop()


def _stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds from a /proc .../stat line (fields after the command name)."""
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of a process, summed by thread name ("main": the
    thread running the event loop and the Python work; others: Faust's consumer thread, the
    executor's, chdb's own C++ pools)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = "main" if task.name == str(pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
        out[name] = out.get(name, 0.0) + _stat_cpu_s(stat)
    return out


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class LogCounter:
    """Counts the records on a topic from the record-batch headers of raw fetches.

    The run ends when the last Log is on the logs topic; a consumer that decompressed and
    decoded every record (~2.5 us each) would take CPU from the worker it measures on these
    two shared cores. A v2 batch header holds its record count: nothing else is read.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        from aiokafka.client import AIOKafkaClient

        self.client = AIOKafkaClient(bootstrap_servers=bootstrap)
        self.topic = topic
        self.next: dict[int, int] = {}

    async def start(self) -> None:
        await self.client.bootstrap()
        await self.client._wait_on_metadata(self.topic)
        self.next = dict.fromkeys(self.client.cluster.partitions_for_topic(self.topic) or (), 0)

    async def stop(self) -> None:
        await self.client.close()

    async def poll(self, max_wait_ms: int = 50) -> int:
        """Records appended since the last poll (one fetch per partition leader)."""
        from aiokafka.protocol.fetch import FetchRequest
        from aiokafka.structs import TopicPartition

        by_leader: dict[int, list[tuple[int, int, int]]] = {}
        for p, off in self.next.items():
            leader = self.client.cluster.leader_for_partition(TopicPartition(self.topic, p))
            by_leader.setdefault(leader, []).append((p, off, 32 << 20))
        n = 0
        for leader, parts in by_leader.items():
            req = FetchRequest(max_wait_ms, 1, 64 << 20, 0, [(self.topic, parts)], rack_id="")
            resp = await self.client.send(leader, req)
            for _topic, partitions in resp.topics:
                for part in partitions:
                    p, err, data = part[0], part[1], part[-1]
                    if err:
                        raise SystemExit(f"fetch {self.topic}/{p}: error {err}")
                    got, self.next[p] = count_batches(data or b"", self.next[p])
                    n += got
        return n


def count_batches(buf: bytes, offset: int) -> tuple[int, int]:
    """(records at or after `offset`, the offset after the last whole batch) in a fetched record set."""
    n, pos = 0, 0
    while pos + 61 <= len(buf):
        base, length = struct.unpack_from(">qi", buf, pos)
        if pos + 12 + length > len(buf):
            break  # a partial batch at the end of the fetch
        last_delta = struct.unpack_from(">i", buf, pos + 23)[0]
        count = struct.unpack_from(">i", buf, pos + 57)[0]
        end = base + last_delta + 1
        if end > offset:  # a batch may start before the offset asked for
            n += count - max(0, offset - base) if base < offset else count
            offset = end
        pos += 12 + length
    return n, offset


async def run_load(s: StreamSettings, msgs: list[bytes], want: int, warm: bytes,
                   pids: dict[str, int] | None = None) -> tuple[float, dict[str, float]]:
    """Send a warm-up message, wait for its log, then time `msgs` until `want` more logs exist.
    Returns the seconds and the CPU seconds each of `pids` used meanwhile."""
    # zstd, as the sensor ships (sensor.shipper.pick_compression's "auto")
    p = AIOKafkaProducer(bootstrap_servers=s.broker, linger_ms=5, max_batch_size=1 << 20,
                         max_request_size=8 << 20, compression_type="zstd")
    c = LogCounter(s.broker, s.logs_topic)
    await p.start()
    await c.start()
    try:
        await p.send_and_wait(s.raw_topic, warm, key=NODE.encode())
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 1:
            if time.monotonic() > deadline:
                raise SystemExit("worker did not start")
            seen += await c.poll()
        pids = {**(pids or {}), "bench (producer + consumer)": os.getpid()}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        threads0 = thread_cpu_s(pids["armorstream worker"]) if "armorstream worker" in pids else {}
        t0 = time.perf_counter()
        for m in msgs:
            await p.send(s.raw_topic, m, key=NODE.encode())
        await p.flush()
        if PROGRESS:
            print(f"  produced {len(msgs)} messages in {time.perf_counter() - t0:.2f} s")
        target = seen + want
        marks = [seen + want // 10 * k for k in range(1, 11)]
        stall = time.monotonic() + 120
        while seen < target:
            got = await c.poll()
            seen += got
            stall = time.monotonic() + 120 if got else stall
            if time.monotonic() > stall:
                raise SystemExit(f"{s.logs_topic}: {seen - target + want} of {want} logs, none for 120 s")
            while marks and seen >= marks[0] and PROGRESS:
                print(f"  {marks.pop(0) - target + want} logs at {time.perf_counter() - t0:.2f} s")
        secs = time.perf_counter() - t0
        cpu = {k: cpu_s(p) - cpu0[k] for k, p in pids.items()}
        if threads0:
            now = thread_cpu_s(pids["armorstream worker"])
            by_thread = {k: v - threads0.get(k, 0.0) for k, v in now.items()}
            busy = sorted(by_thread.items(), key=lambda kv: -kv[1])
            cpu.update({f"  {k}": v for k, v in busy if v >= 0.05})
        # The header count, checked by a consumer that reads every record (untimed).
        await wait_logs(s, seen, exact=True)
        return secs, cpu
    finally:
        await c.stop()
        await p.stop()


def processing_only(msgs: list[bytes], events: int, take_max: int) -> float:
    """The worker's per-batch work alone (decode, join, verdicts, JSON), no Kafka: the CPU bound."""
    from stream.worker import BatchProcessor, RawMessage

    p = BatchProcessor()
    for k in range(PODS):
        cid = f"c{k}"
        rec = ContainerRecord(cid, "containerd", "bench", f"pod{k}", f"u{k}", "main", "img:1", NODE,
                              {"app": f"pod{k}"})
        p.state.apply(p.state.view.topics.containers, encode_key(cid), encode(rec))
        p.state.put_cgroup(NODE, 100 + k, cid)
    p.verdicts.rebuild(p.state.view)
    t0 = time.perf_counter()
    for i in range(0, len(msgs), take_max):  # steps of --take-max messages, as the worker takes them
        p.process_many([RawMessage(m) for m in msgs[i : i + take_max]])
    return events / (time.perf_counter() - t0)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(cmd, cwd=log.parent, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    p.send_signal(sig)  # py-spy writes its profile on SIGINT
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def naive_worker() -> None:
    """The baseline: one event per message, decoded, formatted and sent with an await each;
    with BENCH_NAIVE_CH set, each event's row is also inserted into chdb there."""
    import faust
    import orjson

    from enforcer.envelope import decode_batch
    from stream.store.client import StoreConfig, open_store

    ch = os.environ.get("BENCH_NAIVE_CH")
    store = open_store(StoreConfig(path=Path(ch))) if ch else None
    rows: list[list[object]] = []
    last = [time.monotonic()]
    columns = ["Timestamp", "HostName", "HostPID", "PID", "UID", "Operation", "Resource", "Type",
               "node", "batch_seq", "event_index"]

    s = StreamSettings(broker=os.environ["BENCH_BROKER"], app_id="naive",
                       raw_topic=os.environ["BENCH_RAW"], logs_topic=os.environ["BENCH_LOGS"])
    app = faust.App("bench-naive", broker=f"kafka://{s.broker}", value_serializer="raw",
                    broker_session_timeout=2.0, web_enabled=False, topic_allow_declare=False,
                    consumer_auto_offset_reset="earliest")
    raw = app.topic(s.raw_topic, value_type=bytes, value_serializer="raw")
    logs = app.topic(s.logs_topic, value_type=bytes, value_serializer="raw")

    @app.agent(raw)
    async def one_by_one(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            hdr, r = decode_batch(value)
            h = r["hdr"][0]
            rec = {"HostName": hdr.node, "HostPID": int(h["host_pid"]), "PID": int(h["pid"]),
                   "UID": int(h["uid"]), "Operation": "File", "Resource": r["path"][0].decode(),
                   "Timestamp": (hdr.boot_wall_ns + int(h["ktime_ns"])) // 10**9}
            await logs.send(key=hdr.node.encode(), value=orjson.dumps(rec))
            if store is not None:  # rows in inserts of 1,000 (or each second): one per event runs ~40/s
                rows.append([hdr.boot_wall_ns + int(h["ktime_ns"]), hdr.node, rec["HostPID"], rec["PID"],
                             rec["UID"], "File", rec["Resource"], "ContainerLog", hdr.node, hdr.seq, 0])
                if len(rows) >= 1000 or time.monotonic() - last[0] > 1.0:
                    store.client.insert("events", rows, column_names=columns)
                    rows.clear()
                    last[0] = time.monotonic()

    worker = faust.Worker(app, loglevel="error", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


@dataclass
class RssSampler:
    """RSS of some processes once a second, from /proc, in a thread (the event loop stays paced)."""

    pids: dict[str, int]
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = {}
            for name, pid in self.pids.items():
                try:
                    now[name] = rss_mib(pid)
                except OSError:  # a ClickHouse killed on purpose
                    now[name] = 0.0
            self.samples.append((time.monotonic(), now))
            self._stop.wait(1.0)

    def between(self, name: str, t0: float, t1: float) -> list[float]:
        return [v[name] for t, v in self.samples if t0 <= t <= t1 and v.get(name)]


@dataclass
class ClickHouseServe:
    """`armorstream clickhouse serve` as its own process: the worker writes to it by URL, the bench
    polls it, and it can be killed and restarted on the same port and data directory."""

    path: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ClickHouseServe:
        self.proc = start([sys.executable, "-m", "armorstream.cli", "clickhouse", "serve", "--path",
                           str(self.path), "--listen", f"127.0.0.1:{self.port}"], self.log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text()[-2000:]
                    raise SystemExit(f"clickhouse serve did not start: {tail}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stored(self, node: str, after: int) -> dict[int, int] | None:
        """batch_seq -> event time (ns) of the raw batches of `node` above `after` that are queryable;
        None while the server is down. The ledger is written by the same insert as the events
        (a materialized view), so a batch there is a batch whose events can be queried."""
        q = ("SELECT batch_seq, toUnixTimestamp64Nano(min(Timestamp)) FROM ingested_batches "
             f"WHERE node = '{node}' AND batch_seq > {after} GROUP BY batch_seq FORMAT TabSeparated")
        url = f"{self.url}/?" + urllib.parse.urlencode({"database": "armorstream", "query": q})
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        return {int(a): int(b) for a, b in (line.split("\t") for line in body.splitlines())}


@dataclass
class PacedRun:
    """When each raw batch was produced and when it was first seen in ClickHouse (monotonic s)."""

    produced: dict[int, float] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)
    # poll wall time - stored event time: the same latency measured from the stored Timestamp
    by_event_time: dict[int, float] = field(default_factory=dict)

    def latencies(self, t0: float, t1: float, from_event_time: bool = False) -> list[float]:
        qs = [q for q, t in self.produced.items() if t0 <= t < t1 and q in self.seen]
        if from_event_time:
            return sorted(self.by_event_time[q] for q in qs)
        return sorted(self.seen[q] - self.produced[q] for q in qs)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def paced(s: StreamSettings, ch: ClickHouseServe | None, rate: int, per: int, secs: float,
                run: PacedRun, first_seq: int, on_tick: list[tuple[float, Callable[[], None]]]) -> int:
    """Produce `rate` events/s in batches of `per` for `secs`, each batch's event time its produce
    time; poll ClickHouse (if given) until every batch is queryable. `on_tick`: (seconds in, callable) hooks
    (kill / restart ClickHouse). Returns the next batch sequence number."""
    template = records(per, 0)
    interval = per / rate
    n = int(secs / interval)
    p = AIOKafkaProducer(bootstrap_servers=s.broker, linger_ms=0, max_request_size=8 << 20)
    await p.start()
    done = asyncio.Event()

    async def poll() -> None:
        after = first_seq - 1
        while ch is not None and not (done.is_set() and all(q in run.seen for q in run.produced)):
            got = await asyncio.to_thread(ch.stored, NODE, after)
            now, wall = time.monotonic(), time.time_ns()
            for q, ts in (got or {}).items():
                if q not in run.seen:
                    run.seen[q] = now
                    run.by_event_time[q] = (wall - ts) / 1e9
            while after + 1 in run.seen:
                after += 1
            await asyncio.sleep(0.1)

    poller = asyncio.create_task(poll())
    hooks = sorted(on_tick, key=lambda h: h[0])
    running: list[asyncio.Task[None]] = []
    try:
        t0 = time.monotonic()
        for k in range(n):
            while hooks and time.monotonic() - t0 >= hooks[0][0]:  # in a thread: the load goes on
                running.append(asyncio.create_task(asyncio.to_thread(hooks.pop(0)[1])))
            await asyncio.sleep(max(0.0, t0 + k * interval - time.monotonic()))
            seq = first_seq + k
            r = template.copy()
            r["hdr"]["ktime_ns"] += seq  # distinct, ordered
            # event time = boot_wall_ns + ktime_ns = now: the Timestamp stored is the produce time
            boot = time.time_ns() - int(r["hdr"]["ktime_ns"][0])
            run.produced[seq] = time.monotonic()
            batch = encode_batch(Kind.FILE, r.tobytes(), node=NODE, seq=seq, boot_wall_ns=boot)
            await p.send(s.raw_topic, batch, key=NODE.encode())
        for _, hook in hooks:
            await asyncio.to_thread(hook)
        for t in running:
            await t
        await p.flush()
        done.set()
        await asyncio.wait_for(poller, 120)
    finally:
        poller.cancel()
        await p.stop()
    return first_seq + n


@dataclass
class LatencyResult:
    events: int
    rate_achieved: float
    lat: list[float]
    rss: list[float]
    rss_outage: list[float]
    rss_after: list[float]
    ch_rss: list[float]
    embedded_rss: list[float]
    outage_batches: int
    outage_max_lat: float
    catch_up_s: float
    skew_ms: float


def latency_phase(b: TansuBroker, a: argparse.Namespace) -> LatencyResult:
    s = StreamSettings(broker=b.bootstrap, app_id="bench-latency", raw_topic="lat.raw",
                       logs_topic="lat.logs", alerts_topic="lat.alerts", dead_letter_topic="lat.dlq",
                       partitions=1, siem_partitions=1)
    asyncio.run(ensure_topics(s))
    asyncio.run(control(s))
    store = a.workdir / "lat-ch"
    shutil.rmtree(store, ignore_errors=True)
    ch = ClickHouseServe(store, a.workdir / "lat-clickhouse.log").start()
    cmd = [sys.executable, "-m", "armorstream.cli", "stream", "--broker", b.bootstrap, "--partitions", "1",
           "--siem-partitions", "1", "--no-create-topics", "--app-id", s.app_id, "--raw-topic", s.raw_topic,
           "--logs-topic", s.logs_topic, "--alerts-topic", s.alerts_topic, "--dead-letter-topic",
           s.dead_letter_topic, "--clickhouse", ch.url, *take_max_args(a),
           *os.environ.get("BENCH_WORKER_ARGS", "").split()]  # e.g. "--log-level debug": step timings
    w = start(cmd, a.workdir / "lat-stream.log")
    try:
        assert ch.proc is not None
        warm = PacedRun()
        asyncio.run(paced(s, ch, a.batch, a.batch, 1.0, warm, 0, []))  # one batch: worker up
        run = PacedRun()
        phases: list[tuple[float, Callable[[], None]]] = []
        t_kill = a.latency_secs + 2.0
        t_back = t_kill + a.outage_secs
        total = a.latency_secs + (4.0 + a.outage_secs + 6.0 if a.outage_secs else 0.0)
        marks: dict[str, float] = {}

        def kill() -> None:
            marks["kill"] = time.monotonic()
            ch.kill()

        def back() -> None:
            ch.start()
            marks["back"] = time.monotonic()
            assert ch.proc is not None
            sampled["clickhouse"] = ch.proc.pid

        if a.outage_secs:
            phases = [(t_kill, kill), (t_back, back)]
        sampled = {"worker": w.pid, "clickhouse": ch.proc.pid}
        with RssSampler(sampled) as rss:
            t0 = time.monotonic()
            asyncio.run(paced(s, ch, a.rate, a.batch, total, run, 1, phases))
            t_end = time.monotonic()
        steady_end = t0 + a.latency_secs
        lat = run.latencies(t0, steady_end)
        out_lat = run.latencies(marks.get("kill", t_end), marks.get("back", t_end))
        n_steady = sum(1 for t in run.produced.values() if t0 <= t < steady_end)
        sent_span = max(t for t in run.produced.values() if t < steady_end) - t0
        down_from, down_to = marks.get("kill", t_end), marks.get("back", t_end)
        down = [q for q, t in run.produced.items() if down_from <= t < down_to]
        catch = max((run.seen[q] - marks["back"] for q in down), default=0.0) if "back" in marks else 0.0
        skew = run.latencies(t0, steady_end, from_event_time=True)
        return LatencyResult(
            events=n_steady * a.batch, rate_achieved=n_steady * a.batch / max(sent_span, 1e-9), lat=lat,
            rss=rss.between("worker", t0, steady_end),
            rss_outage=rss.between("worker", marks.get("kill", t_end), marks.get("back", t_end)),
            rss_after=rss.between("worker", marks.get("back", t_end), t_end),
            ch_rss=rss.between("clickhouse", t0, steady_end), outage_batches=len(out_lat),
            outage_max_lat=max(out_lat, default=0.0), catch_up_s=catch, skew_ms=pct(skew, 50) * 1000,
            embedded_rss=[])
    finally:
        stop(w)
        ch.kill()


def embedded_memory_phase(b: TansuBroker, a: argparse.Namespace) -> list[float]:
    """RSS of a worker with its embedded chdb (the default store, which the bench cannot poll: chdb
    locks its directory) at the same paced rate; the logs topic shows it kept up."""
    s = StreamSettings(broker=b.bootstrap, app_id="bench-embedded", raw_topic="emb.raw",
                       logs_topic="emb.logs", alerts_topic="emb.alerts", dead_letter_topic="emb.dlq",
                       partitions=1, siem_partitions=1)
    asyncio.run(ensure_topics(s))
    store = a.workdir / "emb-ch"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "armorstream.cli", "stream", "--broker", b.bootstrap, "--partitions", "1",
           "--siem-partitions", "1", "--no-create-topics", "--app-id", s.app_id, "--raw-topic", s.raw_topic,
           "--logs-topic", s.logs_topic, "--alerts-topic", s.alerts_topic, "--dead-letter-topic",
           s.dead_letter_topic, "--clickhouse", f"chdb:{store}", *take_max_args(a)]
    w = start(cmd, a.workdir / "emb-stream.log")
    try:
        # warm-up as the throughput phase does (one batch, wait for its log); the control
        # records are already on the shared control topics
        asyncio.run(run_load(s, [], 0, batches(1, 1)[0]))
        with RssSampler({"worker": w.pid}) as rss:
            t0 = time.monotonic()
            n = asyncio.run(paced(s, None, a.rate, a.batch, a.embedded_secs, PacedRun(), 1, []))
            t_sent = time.monotonic()
            asyncio.run(wait_logs(s, 1 + (n - 1) * a.batch))  # the warm-up's and every paced event's
            t_end = time.monotonic()
        if PROGRESS:
            print(f"  embedded: logs caught up {t_end - t_sent:.1f} s after the paced load ended")
        return rss.between("worker", t0, t_end)
    finally:
        stop(w)


async def wait_logs(s: StreamSettings, total: int, timeout: float = 120.0, exact: bool = False) -> None:
    c = AIOKafkaConsumer(s.logs_topic, bootstrap_servers=s.broker, group_id=None,
                         auto_offset_reset="earliest", fetch_max_bytes=64 << 20,
                         max_partition_fetch_bytes=32 << 20, fetch_max_wait_ms=50)
    await c.start()
    try:
        seen, deadline = 0, time.monotonic() + timeout
        while seen < total:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {seen} of {total} logs after {timeout:.0f} s")
            seen += sum(len(m) for m in (await c.getmany(timeout_ms=200, max_records=100_000)).values())
        if exact:
            more = sum(len(m) for m in (await c.getmany(timeout_ms=500)).values())
            if seen + more != total:
                raise SystemExit(f"{s.logs_topic}: a consumer read {seen + more} records, the header count "
                                 f"said {total}")
    finally:
        await c.stop()


def paced_phases(b: TansuBroker, a: argparse.Namespace) -> LatencyResult:
    r = latency_phase(b, a)
    if a.embedded_secs:
        r.embedded_rss = embedded_memory_phase(b, a)
    return r


def take_max_args(a: argparse.Namespace) -> list[str]:
    return ["--take-max", str(a.take_max)]


def cli_take_max() -> int:
    """`armorstream stream`'s own --take-max default: the bench measures what a user runs."""
    from armorstream.stream_cmd import stream

    return next(int(str(p.default)) for p in stream.params if p.name == "take_max")


def print_latency(r: LatencyResult, a: argparse.Namespace, naive_rate: float | None) -> None:
    def mib(xs: list[float]) -> str:
        return f"start {xs[0]:.0f}, peak {max(xs):.0f}, end {xs[-1]:.0f} MiB" if xs else "no samples"

    ms = [x * 1000 for x in r.lat]
    print(f"latency, paced {a.rate:,} events/s ({a.batch} events/message, take-max {a.take_max}, "
          f"ClickHouse by URL): {r.events:,} events at {r.rate_achieved:,.0f} ev/s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  produce -> queryable in ClickHouse: p50 {pct(ms, 50):,.0f} ms, p99 {pct(ms, 99):,.0f} ms, "
          f"max {max(ms, default=float('nan')):,.0f} ms (target p99 <= 2,000 ms; polled every 100 ms; "
          f"from the stored event time: p50 {r.skew_ms:,.0f} ms)")
    if naive_rate is not None:
        print(f"  naive faust at that rate: cannot keep up ({naive_rate:,.0f} ev/s < {a.rate:,}): "
              "its latency grows without bound")
    print(f"  worker RSS (target < 1,024 MiB, flat): {mib(r.rss)}; "
          f"the clickhouse serve process: {mib(r.ch_rss)}")
    if r.embedded_rss:
        print(f"  worker with its embedded chdb (the default store; not pollable from outside) "
              f"at the same rate for {a.embedded_secs:.0f} s: RSS {mib(r.embedded_rss)}")
    if a.outage_secs:
        print(f"  ClickHouse killed for {a.outage_secs:.0f} s under the same load: worker RSS "
              f"{mib(r.rss_outage)}; after its restart {mib(r.rss_after)}")
        print(f"  {r.outage_batches} batches produced while it was down: all queryable {r.catch_up_s:.1f} s "
              f"after the restart (their max latency {r.outage_max_lat:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--naive-events", type=int, default=2000)
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per envelope")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/armorstream-bench-stream"))
    ap.add_argument("--no-clickhouse", action="store_true",
                    help="armorstream without its chdb history (SIEM topics only)")
    ap.add_argument("--serve", action="store_true",
                    help="armorstream writes by URL to `armorstream clickhouse serve` (chdb in its own "
                         "process), as `armorstream up` runs it, instead of chdb inside the worker")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="SVG",
                    help="sample the armorstream worker with py-spy (collapsed stacks)")
    ap.add_argument("--take-max", type=int, default=None, help="the worker's --take-max (default: the CLI's)")
    ap.add_argument("--latency", action="store_true", help="only the paced latency and memory phase")
    ap.add_argument("--no-latency", action="store_true", help="only the throughput phase")
    ap.add_argument("--rate", type=int, default=20_000, help="paced phase: events/s")
    ap.add_argument("--latency-secs", type=float, default=20.0, help="paced phase: seconds measured")
    ap.add_argument("--outage-secs", type=float, default=10.0,
                    help="then ClickHouse is down this long under the same load (0: no outage)")
    ap.add_argument("--embedded-secs", type=float, default=10.0,
                    help="then a worker with embedded chdb gets that rate this long, for its RSS (0: skip)")
    a = ap.parse_args()
    a.take_max = a.take_max or cli_take_max()
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.latency:
        with TansuBroker() as b:
            print_latency(paced_phases(b, a), a, None)
        return
    with TansuBroker() as b:
        cand = StreamSettings(broker=b.bootstrap, partitions=1, siem_partitions=1)
        asyncio.run(ensure_topics(cand))
        asyncio.run(control(cand))
        naive: dict[str, float] = {}
        for name in ("naive", "naive-ch"):
            base = StreamSettings(broker=b.bootstrap, raw_topic=f"{name}.raw", logs_topic=f"{name}.logs",
                                  alerts_topic=f"{name}.alerts", partitions=1, siem_partitions=1)
            asyncio.run(ensure_topics(base))
            env = {"BENCH_BROKER": b.bootstrap, "BENCH_RAW": base.raw_topic, "BENCH_LOGS": base.logs_topic,
                   "BENCH_NAIVE_CH": ""}
            if name == "naive-ch":
                env["BENCH_NAIVE_CH"] = str(a.workdir / "naive-ch")
                shutil.rmtree(env["BENCH_NAIVE_CH"], ignore_errors=True)
            os.environ.update(env)
            w = start([sys.executable, __file__, "--naive-worker"], a.workdir / f"{name}.log")
            try:
                naive_s, _ = asyncio.run(run_load(base, batches(a.naive_events, 1), a.naive_events,
                                                  batches(1, 1)[0]))
                naive[name] = a.naive_events / naive_s
            finally:
                stop(w)
        # BENCH_PROFILE=1: profile the worker (cProfile) and print progress marks
        prof = ["-m", "cProfile", "-o", str(a.workdir / "stream.prof")]
        if not os.environ.get("BENCH_PROFILE"):
            prof = []
        cmd = [sys.executable, *prof, "-m", "armorstream.cli", "stream", "--broker", b.bootstrap,
               "--partitions", "1", "--siem-partitions", "1", "--no-create-topics", *take_max_args(a),
               *os.environ.get("BENCH_WORKER_ARGS", "").split()]  # e.g. "--siem-compression none"
        served = None
        if not a.no_clickhouse:
            store = a.workdir / "ch"
            shutil.rmtree(store, ignore_errors=True)
            if a.serve:
                served = ClickHouseServe(store, a.workdir / "clickhouse-serve.log").start()
                cmd += ["--clickhouse", served.url]
            else:
                cmd += ["--clickhouse", f"chdb:{store}"]
        if a.py_spy:
            spy = Path(sys.executable).parent / "py-spy"
            cmd = [str(spy), "record", "--nonblocking", "-r", "100", "-f", "raw",
                   "-o", str(a.py_spy.resolve()), *os.environ.get("BENCH_SPY_ARGS", "").split(), "--", *cmd]
        w = start(cmd, a.workdir / "stream.log")
        try:
            msgs = batches(a.events, a.batch)
            assert b.proc is not None
            pids = {"armorstream worker": w.pid, "tansu broker": b.proc.pid}
            if served is not None and served.proc is not None:
                pids["clickhouse serve"] = served.proc.pid
            cand_s, cpu = asyncio.run(run_load(cand, msgs, a.events, batches(1, 1)[0], pids))
            rss, peak = rss_mib(w.pid), rss_mib(w.pid, "VmHWM")
            if served is not None and served.proc is not None:
                print(f"clickhouse serve: RSS {rss_mib(served.proc.pid):.0f} MiB "
                      f"(peak {rss_mib(served.proc.pid, 'VmHWM'):.0f} MiB)")
        finally:
            stop(w, signal.SIGINT if a.py_spy else signal.SIGTERM)
            if served is not None:
                served.kill()
        lat = None if a.no_latency else paced_phases(b, a)
    cand_rate = a.events / cand_s
    naive_rate = naive["naive-ch"]
    alone = processing_only(batches(a.events, a.batch), a.events, a.take_max)
    cand_name = f"armorstream, {a.batch} events/message" + (
        "" if a.no_clickhouse else " + chdb by URL" if a.serve else " + chdb")
    for name, n, rate in (("naive faust + chdb, 1 event/message", a.naive_events, naive_rate),
                          ("naive faust (Kafka only)", a.naive_events, naive["naive"]),
                          (cand_name, a.events, cand_rate)):
        print(f"{name:<40} {n:>8} events in {n / rate:6.2f} s = {rate:>10,.0f} ev/s")
    print(f"ratio: {cand_rate / naive_rate:.1f}x the naive pipeline into chdb (target >= 100x); "
          f"{cand_rate / naive['naive']:.1f}x the Kafka-only one")
    print(f"CPU seconds while armorstream ran ({cand_s:.2f} s on {os.cpu_count()} cores): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if not k.startswith(" ")))
    print("  the worker's threads: " + ", ".join(f"{k.strip()} {v:.2f}" for k, v in cpu.items()
                                                  if k.startswith(" ")))
    worker_cpu = cpu["armorstream worker"]
    print(f"worker: {a.events / worker_cpu:,.0f} events per CPU-second (its rate with a core of its own), "
          f"RSS {rss:.0f} MiB (peak {peak:.0f} MiB)" + (" [py-spy's, not the worker's]" if a.py_spy else ""))
    print(f"(armorstream's per-batch processing alone, no Kafka: {alone:,.0f} ev/s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if lat is not None:
        print_latency(lat, a, naive_rate)


if __name__ == "__main__":
    if sys.argv[1:] == ["--naive-worker"]:
        naive_worker()
    else:
        main()
