"""Stream throughput: the naive Faust pipeline (one event per Kafka message, an await per
event) vs armorstream's stream (envelopes of many records, per-batch processing), in one run,
on one tansu broker, with the same generated FILE events of several pods. Both end when the
last Log record is on the logs topic; armorstream also writes every event to chdb (its
history) unless --no-clickhouse, while the baseline writes no history: the ratio is
conservative.

    .venv/bin/python bench/stream_throughput.py [--naive-events 2000] [--events 200000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armorstream.embedded_broker import TansuBroker  # noqa: E402
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_load(s: StreamSettings, msgs: list[bytes], want: int, warm: bytes,
                   pids: dict[str, int] | None = None) -> tuple[float, dict[str, float]]:
    """Send a warm-up message, wait for its log, then time `msgs` until `want` more logs exist.
    Returns the seconds and the CPU seconds each of `pids` used meanwhile."""
    p = AIOKafkaProducer(bootstrap_servers=s.broker, linger_ms=5, max_batch_size=1 << 20,
                         max_request_size=8 << 20)
    c = AIOKafkaConsumer(s.logs_topic, bootstrap_servers=s.broker, group_id=None,
                         auto_offset_reset="earliest", fetch_max_bytes=64 << 20,
                         max_partition_fetch_bytes=32 << 20, fetch_max_wait_ms=50)  # tansu holds each fetch
    await p.start()
    await c.start()
    try:
        await p.send_and_wait(s.raw_topic, warm, key=NODE.encode())
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 1:
            if time.monotonic() > deadline:
                raise SystemExit("worker did not start")
            seen += sum(len(m) for m in (await c.getmany(timeout_ms=200)).values())
        pids = {**(pids or {}), "bench (producer + consumer)": os.getpid()}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        for m in msgs:
            await p.send(s.raw_topic, m, key=NODE.encode())
        await p.flush()
        if PROGRESS:
            print(f"  produced {len(msgs)} messages in {time.perf_counter() - t0:.2f} s")
        target = seen + want
        marks = [seen + want // 10 * k for k in range(1, 11)]
        while seen < target:
            seen += sum(len(m) for m in (await c.getmany(timeout_ms=200, max_records=100_000)).values())
            while marks and seen >= marks[0] and PROGRESS:
                print(f"  {marks.pop(0) - target + want} logs at {time.perf_counter() - t0:.2f} s")
        secs = time.perf_counter() - t0
        return secs, {k: cpu_s(p) - cpu0[k] for k, p in pids.items()}
    finally:
        await c.stop()
        await p.stop()


def processing_only(msgs: list[bytes], events: int) -> float:
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
    for i in range(0, len(msgs), 64):  # steps of --take-max messages, as the worker takes them
        p.process_many([RawMessage(m) for m in msgs[i : i + 64]])
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
    """The baseline: one event per message, decoded, formatted and sent with an await each."""
    import faust
    import orjson

    from enforcer.envelope import decode_batch

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

    worker = faust.Worker(app, loglevel="error", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--naive-events", type=int, default=2000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per envelope")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/armorstream-bench-stream"))
    ap.add_argument("--no-clickhouse", action="store_true",
                    help="armorstream without its chdb history (SIEM topics only)")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="SVG",
                    help="sample the armorstream worker with py-spy (collapsed stacks)")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    with TansuBroker() as b:
        base = StreamSettings(broker=b.bootstrap, raw_topic="naive.raw", logs_topic="naive.logs",
                              alerts_topic="naive.alerts", partitions=1, siem_partitions=1)
        cand = StreamSettings(broker=b.bootstrap, partitions=1, siem_partitions=1)
        asyncio.run(ensure_topics(base))
        asyncio.run(ensure_topics(cand))
        asyncio.run(control(cand))

        env = {"BENCH_BROKER": b.bootstrap, "BENCH_RAW": base.raw_topic, "BENCH_LOGS": base.logs_topic}
        os.environ.update(env)
        w = start([sys.executable, __file__, "--naive-worker"], a.workdir / "naive.log")
        try:
            naive_msgs = batches(a.naive_events, 1)
            naive_s, _ = asyncio.run(run_load(base, naive_msgs, a.naive_events, batches(1, 1)[0]))
        finally:
            stop(w)
        # BENCH_PROFILE=1: profile the worker (cProfile) and print progress marks
        prof = ["-m", "cProfile", "-o", str(a.workdir / "stream.prof")]
        if not os.environ.get("BENCH_PROFILE"):
            prof = []
        cmd = [sys.executable, *prof, "-m", "armorstream.cli", "stream", "--broker", b.bootstrap,
               "--partitions", "1", "--siem-partitions", "1", "--no-create-topics", "--take-max", "64"]
        if not a.no_clickhouse:
            store = a.workdir / "ch"
            shutil.rmtree(store, ignore_errors=True)
            cmd += ["--clickhouse", f"chdb:{store}"]
        if a.py_spy:
            spy = Path(sys.executable).parent / "py-spy"
            cmd = [str(spy), "record", "--nonblocking", "-r", "100", "-f", "raw",
                   "-o", str(a.py_spy.resolve()), "--", *cmd]
        w = start(cmd, a.workdir / "stream.log")
        try:
            msgs = batches(a.events, a.batch)
            assert b.proc is not None
            pids = {"armorstream worker": w.pid, "tansu broker": b.proc.pid}
            cand_s, cpu = asyncio.run(run_load(cand, msgs, a.events, batches(1, 1)[0], pids))
            rss, peak = rss_mib(w.pid), rss_mib(w.pid, "VmHWM")
        finally:
            stop(w, signal.SIGINT if a.py_spy else signal.SIGTERM)
    naive_rate, cand_rate = a.naive_events / naive_s, a.events / cand_s
    alone = processing_only(batches(a.events, a.batch), a.events)
    cand_name = f"armorstream, {a.batch} events/message" + ("" if a.no_clickhouse else " + chdb")
    for name, n, secs, rate in (("naive faust, 1 event/message", a.naive_events, naive_s, naive_rate),
                                (cand_name, a.events, cand_s, cand_rate)):
        print(f"{name:<36} {n:>8} events in {secs:6.2f} s = {rate:>10,.0f} ev/s")
    print(f"ratio: {cand_rate / naive_rate:.1f}x (target >= 100x)")
    print(f"CPU seconds while armorstream ran ({cand_s:.2f} s on {os.cpu_count()} cores): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    worker_cpu = cpu["armorstream worker"]
    print(f"worker: {a.events / worker_cpu:,.0f} events per CPU-second (its rate with a core of its own), "
          f"RSS {rss:.0f} MiB (peak {peak:.0f} MiB)" + (" [py-spy's, not the worker's]" if a.py_spy else ""))
    print(f"(armorstream's per-batch processing alone, no Kafka: {alone:,.0f} ev/s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--naive-worker"]:
        naive_worker()
    else:
        main()
