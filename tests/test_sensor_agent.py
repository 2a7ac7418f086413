"""The sensor agent end to end: real kernel, real cgroups named like kubelet + containerd,
real tansu broker. Processes run in a test "container"; the raw topic must hold exactly
their exec events, with the right container identity, paths, argv and uid.

Each test ends on a marker exec inside the watched cgroup, never on a sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from enforcer import records
from enforcer.envelope import BatchHeader, decode_batch
from enforcer.records import EXIT_DTYPE, Kind, Visibility
from tests.conftest import ROOT, need, need_cgroup2, need_root, need_tool

TOPIC = "armorstream.raw"


# ---- pure: splitting a drained batch by cgroup ---------------------------------------------
def exits(cgroups: list[int]) -> bytes:
    recs = np.zeros(len(cgroups), EXIT_DTYPE)
    h = recs["hdr"]
    h["kind"], h["size"] = Kind.EXIT, EXIT_DTYPE.itemsize
    h["cgroup_id"] = cgroups
    h["ktime_ns"] = np.arange(len(cgroups))  # ring order
    return recs.tobytes()


def test_split_by_cgroup_keeps_ring_order_per_cgroup() -> None:
    from sensor.agent import split_by_cgroup

    raw = exits([7, 3, 7, 7, 9, 3, 7])
    parts = split_by_cgroup(Kind.EXIT, raw, max_records=2)
    got = [(cg, np.frombuffer(b, EXIT_DTYPE)["hdr"]["ktime_ns"].tolist(), n) for cg, b, n in parts]
    assert got == [(3, [1, 5], 2), (7, [0, 2], 2), (7, [3, 6], 2), (9, [4], 1)]
    for cg, b, _ in parts:
        assert set(np.frombuffer(b, EXIT_DTYPE)["hdr"]["cgroup_id"].tolist()) == {cg}
    one = exits([5] * 4)
    assert split_by_cgroup(Kind.EXIT, one, 10) == [(5, one, 4)]  # one container: the bytes as drained
    assert split_by_cgroup(Kind.EXIT, b"", 10) == []


def test_cli_rejects_bad_visibility_without_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "armorstream.cli", "sensor", "--visibility", "process,disk"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "'disk': use any of process, file, network, capabilities or none" in r.stderr
    assert "Traceback" not in r.stderr


# ---- the kernel and the broker -------------------------------------------------------------
@dataclass
class Container:
    cgroup: Path
    cgroup_id: int
    container_id: str
    pod_uid: str
    pin_dir: Path



def remove_tree(top: Path) -> None:
    if top.exists():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        top.rmdir()


@pytest.fixture
def container() -> Iterator[Container]:
    need_root()
    need_tool("clang")
    need_tool("bpftool")
    need(Path("/sys/kernel/btf/vmlinux").exists(), "needs kernel BTF at /sys/kernel/btf/vmlinux")
    root = need_cgroup2()
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), ".output/process.bpf.o"], check=True)
    run = uuid.uuid4().hex
    uid, cid = str(uuid.uuid4()), run + uuid.uuid4().hex
    top = root / f"as-test-{run[:8]}"
    # kubelet (systemd driver) + containerd naming
    cg = top / "kubepods.slice" / "kubepods-burstable.slice" / \
        f"kubepods-burstable-pod{uid.replace('-', '_')}.slice" / f"cri-containerd-{cid}.scope"
    cg.mkdir(parents=True)
    pin = Path("/sys/fs/bpf") / f"armorstream-test-{run[:12]}"
    try:
        yield Container(cg, cg.stat().st_ino, cid, uid, pin)
    finally:
        for p in sorted(pin.rglob("*"), reverse=True) if pin.exists() else []:
            p.rmdir() if p.is_dir() else p.unlink()
        if pin.exists():
            pin.rmdir()
        remove_tree(top)


def run_in(cgroup: Path, cwd: Path, *argv: str) -> None:
    script = 'echo $$ > "$0/cgroup.procs" && cd "$1" && shift && exec "$@"'
    subprocess.run(["sh", "-c", script, str(cgroup), str(cwd), *argv], check=True)


Msg = tuple[bytes, BatchHeader, np.ndarray]


async def consume_until(bootstrap: str, done: Callable[[list[Msg]], bool], timeout: float = 20.0,
                        ) -> list[Msg]:  # fmt: skip
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                request_timeout_ms=3000, retry_backoff_ms=50)  # fmt: skip
    await consumer.start()
    got: list[Msg] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(got):
            assert time.monotonic() < deadline, f"timed out; got {len(got)} messages"
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                for m in batch:
                    assert m.key is not None and m.value is not None
                    hdr, recs = decode_batch(m.value)
                    got.append((m.key, hdr, recs))
    finally:
        await consumer.stop()
    return got


async def consume_raw(bootstrap: str, topic: str, done: Callable[[list[tuple[bytes, bytes | None]]], bool],
                      timeout: float = 20.0) -> list[tuple[bytes, bytes | None]]:  # fmt: skip
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                request_timeout_ms=3000, retry_backoff_ms=50)  # fmt: skip
    await consumer.start()
    got: list[tuple[bytes, bytes | None]] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(got):
            assert time.monotonic() < deadline, f"timed out on {topic}; got {got}"
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                got.extend((m.key or b"", m.value) for m in batch)
    finally:
        await consumer.stop()
    return got


def execs_of(msgs: list[Msg], cgroup_id: int) -> np.ndarray:
    ex = [r for _, h, r in msgs if h.kind == Kind.EXEC]
    if not ex:
        return np.zeros(0, records.EXEC_DTYPE)
    allx = np.concatenate(ex)
    mine: np.ndarray = allx[allx["hdr"]["cgroup_id"] == cgroup_id]
    return mine


def has_marker(cgroup_id: int, marker: str) -> Callable[[list[Msg]], bool]:
    return lambda msgs: any(marker in av for av in records.argv(execs_of(msgs, cgroup_id)))


def check_keys(msgs: list[Msg], node: str) -> None:
    """Every message is one cgroup's, keyed by it; (node, seq) never repeats."""
    for key, hdr, recs in msgs:
        assert hdr.node == node
        assert set(recs["hdr"]["cgroup_id"].tolist()) == {int.from_bytes(key, "little")}
    seqs = [h.seq for _, h, _ in msgs]
    assert len(seqs) == len(set(seqs))


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_agent_ships_container_execs_with_identity(container: Container, broker: object,
                                                   tmp_path: Path) -> None:  # fmt: skip
    from sensor.agent import Agent, AgentConfig
    from sensor.identity import CgroupIndex, Resolver

    need_tool("setpriv")
    need_tool("unshare")
    bootstrap: str = broker.bootstrap  # type: ignore[attr-defined]
    work = tmp_path / "work dir"
    work.mkdir()
    tag, outside = f"arg-{uuid.uuid4().hex[:8]}", f"outside-{uuid.uuid4().hex[:8]}"
    marker = f"marker-{uuid.uuid4().hex}"
    cfg = AgentConfig(broker=bootstrap, node="node-t", spool_dir=tmp_path / "spool",
                      pin_dir=container.pin_dir, visibility=Visibility.PROCESS,
                      watch_cgroups=(container.cgroup,), poll_interval_s=0.02, request_timeout_ms=3000,
                      runtime="containerd")  # fmt: skip

    async def scenario() -> tuple[object, list[Msg], dict[str, int]]:
        agent = Agent(cfg)
        report = await agent.start()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.to_thread(subprocess.run, ["/bin/true", outside], check=True)
            await asyncio.to_thread(run_in, container.cgroup, work, "setpriv", "--reuid=65534",
                                    "--regid=65534", "--clear-groups", "/bin/true", tag, "two words",
                                    "")  # fmt: skip
            await asyncio.to_thread(run_in, container.cgroup, work, "unshare", "--pid", "--fork", "--mount",
                                    "--uts", "/bin/true", "in-ns", tag)  # fmt: skip
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "/bin/true", marker)
            msgs = await consume_until(bootstrap, has_marker(container.cgroup_id, marker))
        finally:
            stop.set()
            await task
            await agent.stop()
        return report, msgs, agent.metrics.snapshot()

    report, msgs, snap = asyncio.run(scenario())

    lines = "\n".join(report.lines())  # type: ignore[attr-defined]
    assert "monitor process      attached" in lines
    assert container.container_id[:12] in lines and container.pod_uid in lines
    assert report.connected  # type: ignore[attr-defined]

    check_keys(msgs, "node-t")
    keys = {int.from_bytes(k, "little") for k, _, _ in msgs}
    assert keys == {container.cgroup_id}  # nothing from outside the container
    # The key resolves to the container that ran the processes.
    ident = Resolver(CgroupIndex(), default_runtime="containerd").resolve(container.cgroup_id)
    assert ident is not None
    assert (ident.container_id, ident.pod_uid, ident.qos, ident.runtime) == (
        container.container_id, container.pod_uid, "burstable", "containerd")

    ex = execs_of(msgs, container.cgroup_id)
    argvs = records.argv(ex)
    assert all(outside not in av for av in argvs)
    assert argvs == [
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/true", tag, "two words", ""],
        ["/bin/true", tag, "two words", ""],
        ["unshare", "--pid", "--fork", "--mount", "--uts", "/bin/true", "in-ns", tag],
        ["/bin/true", "in-ns", tag],
        ["/bin/true", marker],
    ]
    true_path = os.path.realpath("/bin/true")
    assert records.text(ex["path"])[1::2] == [true_path, true_path]
    assert records.text(ex["cwd"]) == [str(work)] * 4 + ["/"]
    h = ex["hdr"]
    assert h["uid"].tolist() == [0, 65534, 0, 0, 0]
    assert int(h["pid"][3]) == 1  # pid 1 of the unshared pid namespace
    assert int(h["pid_ns"][3]) != int(h["pid_ns"][2]) and int(h["mnt_ns"][3]) != int(h["mnt_ns"][2])
    assert snap["events_seen"] >= len(ex) and snap["events_dropped_kernel"] == 0
    assert snap["events_dropped_user"] == 0


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_agent_finds_new_containers_and_forgets_gone_ones(container: Container, broker: object,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """Container mode: a container cgroup created after start is watched at the next refresh;
    once removed, it leaves the kernel's watched set."""
    from sensor.agent import Agent, AgentConfig

    bootstrap: str = broker.bootstrap  # type: ignore[attr-defined]
    late_cid = uuid.uuid4().hex * 2
    late = container.cgroup.parent / f"cri-containerd-{late_cid}.scope"
    cfg = AgentConfig(broker=bootstrap, node="node-t", spool_dir=tmp_path / "spool",
                      pin_dir=container.pin_dir, visibility=Visibility.PROCESS, poll_interval_s=0.02,
                      refresh_interval_s=0.1, request_timeout_ms=3000)  # fmt: skip
    marker = f"marker-{uuid.uuid4().hex}"

    async def scenario() -> tuple[list[Msg], dict[int, int], dict[int, int]]:
        agent = Agent(cfg)
        await agent.start()
        assert container.cgroup_id in agent.watched and agent.identities[container.cgroup_id] is not None
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            late.mkdir()
            late_id = late.stat().st_ino
            deadline = time.monotonic() + 5
            while late_id not in agent.watched:
                assert time.monotonic() < deadline, "new container cgroup never watched"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(run_in, late, Path("/"), "/bin/true", marker)
            msgs = await consume_until(bootstrap, has_marker(late_id, marker))
            with_late = dict(agent.watched)
            late.rmdir()
            while late_id in agent.watched:
                assert time.monotonic() < deadline + 5, "removed cgroup still watched"
                await asyncio.sleep(0.02)
            pinned = agent.monitors["process"].watched  # type: ignore[attr-defined]
            kernel = {int.from_bytes(k, "little"): 1 for k in pinned.keys()}  # noqa: SIM118  # a BPF map
        finally:
            stop.set()
            await task
            await agent.stop()
        return msgs, with_late, kernel

    msgs, with_late, kernel = asyncio.run(scenario())
    late_id = max(with_late)  # created last: the highest kernfs id
    assert records.argv(execs_of(msgs, late_id)) == [["/bin/true", marker]]
    assert container.cgroup_id in kernel and late_id not in kernel
    check_keys(msgs, "node-t")

    # The stream's cgroup index: the new container, then its tombstone.
    late_key = f"node-t/{late_id}".encode()
    def tombstoned(got: list[tuple[bytes, bytes | None]]) -> bool:
        return any(k == late_key and v is None for k, v in got)

    index = asyncio.run(consume_raw(bootstrap, "armorstream.control.cgroups", tombstoned))
    mine = [(k, v) for k, v in index if k == late_key]
    assert [v is None for _, v in mine] == [False, True]
    rec = orjson.loads(mine[0][1])  # type: ignore[arg-type]
    assert (rec["v"], rec["type"], rec["node"], rec["cgroup_id"], rec["container_id"]) == (
        1, "cgroup", "node-t", late_id, late_cid)
    first = [orjson.loads(v) for k, v in index if k == f"node-t/{container.cgroup_id}".encode() and v]
    assert [r["container_id"] for r in first] == [container.container_id]
    assert first[0]["pod_uid"] == container.pod_uid


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_sensor_command_reports_ships_and_stops_cleanly(container: Container, broker: object,
                                                        tmp_path: Path) -> None:  # fmt: skip
    bootstrap: str = broker.bootstrap  # type: ignore[attr-defined]
    exe = Path(sys.executable).parent / "armorstream"
    need(exe.exists(), f"armorstream entry point not installed at {exe}")
    proc = subprocess.Popen(
        [str(exe), "sensor", "--broker", bootstrap, "--node-name", "node-cli", "--visibility", "process",
         "--watch-cgroup", str(container.cgroup), "--spool-dir", str(tmp_path / "spool"),
         "--pin-dir", str(container.pin_dir), "--metrics-port", "0", "--poll-interval", "0.02"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        err: list[str] = []
        deadline = time.monotonic() + 30
        while not any(line.strip() == "ready" for line in err):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(err)
            err.append(proc.stderr.readline())
        marker = f"marker-{uuid.uuid4().hex}"
        run_in(container.cgroup, Path("/"), "/bin/true", marker)
        msgs = asyncio.run(consume_until(bootstrap, has_marker(container.cgroup_id, marker)))
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "monitor process      attached" in out
    assert f"{container.cgroup_id}" in out and container.container_id[:12] in out
    assert "metrics         http://" in out
    assert "Traceback" not in rest and "stopped:" in rest
    check_keys(msgs, "node-cli")
    assert records.argv(execs_of(msgs, container.cgroup_id)) == [["/bin/true", marker]]


@pytest.mark.root
@pytest.mark.kernel
def test_agent_spools_while_the_broker_is_away(container: Container, tmp_path: Path) -> None:
    """No broker at all: the start-up report says so, and the container's events wait in the spool."""
    from armorstream.embedded_broker import free_port
    from sensor.agent import Agent, AgentConfig
    from sensor.spool import Spool, SpoolConfig

    marker = f"marker-{uuid.uuid4().hex}"
    spool_dir = tmp_path / "spool"
    cfg = AgentConfig(broker=f"127.0.0.1:{free_port()}", node="node-s", spool_dir=spool_dir,
                      pin_dir=container.pin_dir, visibility=Visibility.PROCESS,
                      watch_cgroups=(container.cgroup,), poll_interval_s=0.02, request_timeout_ms=500,
                      flush_timeout_s=1.0)  # fmt: skip

    async def scenario() -> tuple[object, dict[str, int]]:
        agent = Agent(cfg)
        report = await agent.start()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "/bin/true", marker)
            deadline = time.monotonic() + 10
            while agent.metrics.counters.events_spooled < 2:  # its exec and its exit
                assert time.monotonic() < deadline, agent.metrics.snapshot()
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
            await agent.stop()
        return report, agent.metrics.snapshot()

    report, snap = asyncio.run(scenario())
    assert not report.connected  # type: ignore[attr-defined]
    assert "not reachable: spooling" in "\n".join(report.lines())  # type: ignore[attr-defined]
    assert snap["events_shipped"] == 0 and snap["events_dropped_user"] == 0
    with Spool(SpoolConfig(spool_dir)) as spool:
        entries = spool.read(max_entries=1000)
    assert sum(e.events for e in entries) == snap["events_spooled"]
    execs = [decode_batch(e.value)[1] for e in entries if decode_batch(e.value)[0].kind == Kind.EXEC]
    assert [av for r in execs for av in records.argv(r)] == [["/bin/true", marker]]
    assert all(e.key == container.cgroup_id.to_bytes(8, "little") for e in entries)


WORKLOAD = """
import os, socket, sys
os.chdir(sys.argv[1])
open("./data file.txt").read()                      # relative path: must arrive absolute
try:
    open("missing-" + sys.argv[3])
except FileNotFoundError:
    pass
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
c.connect(("127.0.0.1", int(sys.argv[2])))
c.close()
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
"""


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_agent_ships_files_network_and_capabilities(container: Container, broker: object,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """All four monitors: the container opens a file by a relative path, connects on loopback and
    makes a raw socket; the raw topic holds exactly those file and network events."""
    import errno
    import socket

    from sensor.agent import Agent, AgentConfig

    need_tool("unshare")
    bootstrap: str = broker.bootstrap  # type: ignore[attr-defined]
    work = tmp_path / f"work-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    (work / "data file.txt").write_text("x")
    tag = uuid.uuid4().hex[:8]
    marker = f"marker-{uuid.uuid4().hex}"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cfg = AgentConfig(broker=bootstrap, node="node-f", spool_dir=tmp_path / "spool",
                      pin_dir=container.pin_dir, watch_cgroups=(container.cgroup,), poll_interval_s=0.02,
                      request_timeout_ms=3000)  # fmt: skip

    async def scenario() -> tuple[object, list[Msg]]:
        agent = Agent(cfg)
        report = await agent.start()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "unshare", "--pid", "--fork",
                                    "--mount", "--uts", sys.executable, "-I", "-S", "-c", WORKLOAD, str(work),
                                    str(port), tag)  # fmt: skip
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "/bin/true", marker)
            # Each kind has its own ring buffer and batches: the marker's exec can be shipped
            # before the workload's file, network or capability records. Wait for those too.
            attached = {m.name for m in report.monitors if m.attached}  # type: ignore[attr-defined]
            want = {Kind.NET: 3 if "network" in attached else 0,
                    Kind.CAP: 1 if "capabilities" in attached else 0}
            marked = has_marker(container.cgroup_id, marker)

            last_open = f"missing-{tag}"  # the workload's last file event

            def complete(got: list[Msg]) -> bool:
                opened = (p for _, h, r in got if h.kind == Kind.FILE for p in records.text(r["path"]))
                counts = {kind: sum(len(r) for _, h, r in got if h.kind == kind) for kind in want}
                return (marked(got) and any(last_open in p for p in opened)
                        and all(counts[kind] >= n for kind, n in want.items()))

            msgs = await consume_until(bootstrap, complete)
        finally:
            stop.set()
            await task
            await agent.stop()
        return report, msgs

    try:
        report, msgs = asyncio.run(scenario())
    finally:
        listener.close()
    statuses = {m.name: m for m in report.monitors}  # type: ignore[attr-defined]
    need(statuses["file"].attached and statuses["network"].attached,
         f"file/network monitors not attached: {statuses}")  # fmt: skip
    check_keys(msgs, "node-f")
    assert {int.from_bytes(k, "little") for k, _, _ in msgs} == {container.cgroup_id}

    ex = execs_of(msgs, container.cgroup_id)
    py = ex[[av[:1] == [sys.executable] for av in records.argv(ex)]]
    assert len(py) == 1
    py_pid = int(py["hdr"]["host_pid"][0])
    assert int(py["hdr"]["pid"][0]) == 1  # pid 1 of its namespace

    def of_kind(kind: int) -> np.ndarray:
        parts = [r for _, h, r in msgs if h.kind == kind]
        allr = np.concatenate(parts) if parts else np.zeros(0, records.DTYPES[kind])
        mine: np.ndarray = allr[allr["hdr"]["host_pid"] == py_pid]
        return mine

    files = of_kind(Kind.FILE)
    paths = records.text(files["path"])
    mine = [(p, int(r)) for p, r in zip(paths, files["hdr"]["ret"].tolist(), strict=True) if str(work) in p]
    assert [p for p, _ in mine] == [f"{work}/data file.txt", f"{work}/missing-{tag}"]
    assert mine[0][1] >= 0 and mine[1][1] == -errno.ENOENT

    net = of_kind(Kind.NET)
    ops = [(records.NetOp(int(n["op"])).name, int(n["family"]), int(n["type"]) & 0xF, int(n["dport"]))
           for n in net]  # fmt: skip
    assert ops == [
        ("SOCKET", socket.AF_INET, socket.SOCK_STREAM, 0),
        ("CONNECT", socket.AF_INET, socket.SOCK_STREAM, port),
        ("SOCKET", socket.AF_INET, socket.SOCK_RAW, 0),
    ]
    connect = net[1]
    assert records.ip_strings(net["family"][1:2], net["daddr"][1:2]) == ["127.0.0.1"]
    assert int(connect["hdr"]["ret"]) == 0
    if statuses["capabilities"].attached:
        caps = of_kind(Kind.CAP)
        assert 13 in caps["cap"].tolist()  # CAP_NET_RAW for the raw socket


class SensorProc:
    """`armorstream sensor` as a subprocess: waits for "ready", knows its metrics URL."""

    def __init__(self, *args: str) -> None:
        exe = Path(sys.executable).parent / "armorstream"
        need(exe.exists(), f"armorstream entry point not installed at {exe}")
        cmd = [str(exe), "sensor", "--metrics-port", "0", "--metrics-addr", "127.0.0.1",
               "--poll-interval", "0.02"]  # fmt: skip
        self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.report: list[str] = []
        deadline = time.monotonic() + 30
        while not self.report or not self.report[-1].lstrip().startswith("metrics"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"sensor did not start: {self.kill()}")
            self.report.append(self.proc.stdout.readline())
        url = self.report[-1].split()[-1]
        assert url.startswith("http://"), self.report
        self.metrics_url = url

    def counter(self, name: str) -> float:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f"armorstream_sensor_{name}_total"):
                    return float(line.split()[-1])
        return 0.0

    def kill(self) -> str:
        """SIGKILL; returns what it wrote to stderr (and closes the pipes)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate()[1]


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_sigkill_then_restart_loses_nothing_spooled(container: Container, tmp_path: Path) -> None:
    """Broker away: the sensor spools; SIGKILL; the broker comes up; a new sensor on the same
    spool and pins replays the spooled events once, before anything newer from that container."""
    from armorstream.embedded_broker import BrokerError, TansuBroker, free_port

    port = free_port()
    common = ["--broker", f"127.0.0.1:{port}", "--node-name", "node-k", "--visibility", "process",
              "--watch-cgroup", str(container.cgroup), "--spool-dir", str(tmp_path / "spool"),
              "--pin-dir", str(container.pin_dir)]  # fmt: skip
    before = f"spooled-{uuid.uuid4().hex}"
    marker = f"marker-{uuid.uuid4().hex}"
    first = SensorProc(*common)
    try:
        assert any("not reachable: spooling" in line for line in first.report), first.report
        run_in(container.cgroup, Path("/"), "/bin/true", before)
        deadline = time.monotonic() + 10
        while first.counter("events_spooled") < 2:  # the exec and its exit
            assert time.monotonic() < deadline, "nothing spooled"
            time.sleep(0.02)
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL

    try:
        broker = TansuBroker(port=port).start()
    except BrokerError as e:
        need(False, str(e))
        raise
    second = None
    try:
        second = SensorProc(*common)
        run_in(container.cgroup, Path("/"), "/bin/true", marker)
        msgs = asyncio.run(consume_until(broker.bootstrap, has_marker(container.cgroup_id, marker)))
        replayed = second.counter("events_replayed")
    finally:
        if second is not None:
            second.kill()
        broker.stop()
    seen: set[int] = set()
    deduped = []
    for m in msgs:  # delivery is at-least-once: consumers drop repeats by (node, seq)
        if m[1].seq not in seen:
            seen.add(m[1].seq)
            deduped.append(m)
    argvs = records.argv(execs_of(deduped, container.cgroup_id))
    assert argvs == [["/bin/true", before], ["/bin/true", marker]]
    assert replayed >= 2
    check_keys(msgs, "node-k")


async def publish_control(bootstrap: str, records_: list[object]) -> None:
    """Control records as the controller publishes them (one record per produce batch)."""
    from aiokafka import AIOKafkaProducer

    from enforcer.control import ContainerRecord, ControlTopics, NamespaceRecord, encode, encode_key

    topics = ControlTopics()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for rec in records_:
            if isinstance(rec, ContainerRecord):
                topic, key = topics.containers, rec.container_id
            else:
                assert isinstance(rec, NamespaceRecord)
                topic, key = topics.namespaces, rec.name
            await producer.send_and_wait(topic, encode(rec), key=encode_key(key))
    finally:
        await producer.stop()


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.broker
def test_namespace_visibility_annotation_decides_what_is_watched(container: Container, broker: object,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    """kubearmor-visibility from the control topics: "none" unwatches a namespace's containers,
    "process" watches for processes only, and a changed annotation applies while running."""
    from enforcer.control import ContainerRecord, NamespaceRecord
    from sensor.agent import Agent, AgentConfig

    bootstrap: str = broker.bootstrap  # type: ignore[attr-defined]
    loud_cid = uuid.uuid4().hex * 2
    loud = container.cgroup.parent / f"cri-containerd-{loud_cid}.scope"
    loud.mkdir()
    loud_id = loud.stat().st_ino
    quiet_id = container.cgroup_id

    def pod(cid: str, ns: str) -> ContainerRecord:
        return ContainerRecord(container_id=cid, runtime="containerd", namespace=ns, pod=f"pod-{ns}",
                               pod_uid=container.pod_uid, container="app", image="busybox",
                               node="node-v")  # fmt: skip

    cfg = AgentConfig(broker=bootstrap, node="node-v", spool_dir=tmp_path / "spool",
                      pin_dir=container.pin_dir, visibility=Visibility.PROCESS | Visibility.FILE,
                      watch_cgroups=(container.cgroup, loud), poll_interval_s=0.02, refresh_interval_s=0.1,
                      request_timeout_ms=3000, namespace_visibility=True)  # fmt: skip
    hidden, marker, later = (f"{w}-{uuid.uuid4().hex}" for w in ("hidden", "marker", "later"))

    async def wait_watched(agent: Agent, want: dict[int, int]) -> None:
        deadline = time.monotonic() + 10
        while {c: agent.watched.get(c) for c in want} != want:
            assert time.monotonic() < deadline, f"watched {agent.watched}, want {want}"
            await asyncio.sleep(0.02)

    async def scenario() -> tuple[list[Msg], dict[int, int], dict[int, int]]:
        await publish_control(bootstrap, [
            pod(container.container_id, "quiet"), pod(loud_cid, "loud"),
            NamespaceRecord(name="quiet", visibility="none"),
            NamespaceRecord(name="loud", visibility="process"),
        ])  # fmt: skip
        agent = Agent(cfg)
        await agent.start()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_watched(agent, {quiet_id: None, loud_id: int(Visibility.PROCESS)})  # type: ignore[dict-item]
            first = dict(agent.watched)
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "/bin/true", hidden)
            await asyncio.to_thread(run_in, loud, Path("/"), "/bin/true", marker)
            await consume_until(bootstrap, has_marker(loud_id, marker))
            await publish_control(bootstrap, [NamespaceRecord(name="quiet", visibility="process,file")])
            await wait_watched(agent, {quiet_id: int(Visibility.PROCESS | Visibility.FILE)})
            second = dict(agent.watched)
            await asyncio.to_thread(run_in, container.cgroup, Path("/"), "/bin/true", later)
            # The exec and the opens of its loader travel in envelopes of their own kinds.
            msgs = await consume_until(bootstrap, lambda got: has_marker(quiet_id, later)(got) and any(
                h.kind == Kind.FILE and quiet_id in r["hdr"]["cgroup_id"] for _, h, r in got))  # fmt: skip
        finally:
            stop.set()
            await task
            await agent.stop()
            loud.rmdir()
        return msgs, first, second

    msgs, first, second = asyncio.run(scenario())
    assert quiet_id not in first and first[loud_id] == Visibility.PROCESS
    assert second[quiet_id] == Visibility.PROCESS | Visibility.FILE
    assert records.argv(execs_of(msgs, quiet_id)) == [["/bin/true", later]]  # nothing while "none"
    assert records.argv(execs_of(msgs, loud_id)) == [["/bin/true", marker]]
    file_cgroups = {int(c) for _, h, r in msgs if h.kind == Kind.FILE for c in r["hdr"]["cgroup_id"]}
    assert loud_id not in file_cgroups  # "process" only
    assert quiet_id in file_cgroups  # /bin/true's loader opens files once "file" is on
