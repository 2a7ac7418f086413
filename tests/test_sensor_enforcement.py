"""The sensor enforces what the control topics bind to a container, and keeps enforcing
without the broker and across a kill -9 (real kernel, real tansu, the real `armorstream sensor`).

The test container: a kubelet-named cgroup (so the sensor's identity finds its container
id), a `sleep` in it chrooted into a bind mount of / (its own mount, which is the one the
fanotify backend marks), and commands run the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from enforcer.control import (
    BindingRecord,
    ContainerRecord,
    ControlTopics,
    ControlView,
    NamespaceRecord,
    PolicyRecord,
    encode,
    encode_key,
    policy_key,
)
from enforcer.envelope import decode_batch
from enforcer.fanotify import CGROUP2_ROOT, fanotify_available
from enforcer.records import Flag, Kind
from sensor.enforcement_agent import ControlCache
from tests.conftest import need, need_root

ROOT = Path(__file__).resolve().parent.parent
NETBLOCK = ROOT / "bpf" / ".output" / "netblock.bpf.o"
NS = "enf-test"

RAW = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()"
UDP = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()"


def test_control_cache_round_trip(tmp_path: Path) -> None:
    view = ControlView()
    t = view.topics
    pol = PolicyRecord("KubeArmorPolicy", NS, "p", {"kind": "KubeArmorPolicy", "spec": {"x": [1]}}, "f.yaml")
    view.apply(t.policies, encode_key(pol.key), encode(pol))
    view.apply(t.bindings, b"c1", encode(BindingRecord("c1", (pol.key,))))
    view.apply(t.namespaces, NS.encode(), encode(NamespaceRecord(NS, {"a": "b"}, file_posture="block")))
    cache = ControlCache(tmp_path / "state" / "control.json")
    cache.save(view)
    again = ControlView()
    assert cache.load(again) == 3
    assert again.tables == view.tables
    (tmp_path / "state" / "control.json").write_bytes(b"{not json")
    assert cache.load(ControlView()) == 0  # corrupt: reported and ignored, never a crash


@dataclass
class Box:
    """A test container: kubelet-named cgroup, a root of its own, a pause process."""

    cgroup: Path
    root: Path
    files: Path  # host directory (also visible in the box at the same path)
    container_id: str
    pause: subprocess.Popen[bytes]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec chroot {self.root} "$@"'
        return subprocess.run(["/bin/sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                              timeout=20, check=False)  # fmt: skip

    def denied(self, *argv: str) -> bool:
        r = self.run(*argv)
        if r.returncode == 0:
            return False
        assert "Operation not permitted" in r.stderr or "PermissionError" in r.stderr, r.stderr
        return True


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    need_root()
    need(NETBLOCK.exists(), f"{NETBLOCK} not built (make -C bpf)")
    need(fanotify_available() is None, f"fanotify permission events: {fanotify_available()}")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    pod = uuid.uuid4()
    base = Path(CGROUP2_ROOT) / f"astest-enf-{os.getpid()}"
    cg = base / f"kubepods-pod{str(pod).replace('-', '_')}.slice" / f"cri-containerd-{cid}.scope"
    cg.mkdir(parents=True)
    files = tmp_path / "files"
    files.mkdir()
    for name in ("blocked", "allowed"):
        shutil.copy2("/bin/true", files / name)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "--rbind", "/", str(root)], check=True)
    enter = f"echo $$ > {cg}/cgroup.procs && exec chroot {root} sleep 600"
    pause = subprocess.Popen(["/bin/sh", "-c", enter])
    try:
        deadline = time.monotonic() + 5
        while not (cg / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Box(cg, root, files, cid, pause)
    finally:
        pause.kill()
        pause.wait()
        subprocess.run(["umount", "-l", str(root)], check=False)
        for d in (cg, cg.parent, base):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


async def publish(bootstrap: str, box: Box) -> None:
    t = ControlTopics()
    doc: dict[str, Any] = {
        "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorPolicy",
        "metadata": {"name": "block-raw-and-blocked", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "enf"}},
            "process": {"matchPaths": [{"path": str(box.files / "blocked")}]},
            "capabilities": {"matchCapabilities": [{"capability": "net_raw"}]},
            "action": "Block",
        },
    }  # fmt: skip
    key = policy_key("KubeArmorPolicy", NS, "block-raw-and-blocked")
    records = [
        (t.namespaces, NS, NamespaceRecord(NS)),
        (t.containers, box.container_id, ContainerRecord(box.container_id, "containerd", NS, "enf-pod", "uid",
                                                         "app", "img", "enf-node", {"app": "enf"})),
        (t.policies, key, PolicyRecord("KubeArmorPolicy", NS, "block-raw-and-blocked", doc, "test")),
        (t.bindings, box.container_id, BindingRecord(box.container_id, (key,))),
    ]  # fmt: skip
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await p.start()
    try:
        for topic, k, rec in records:  # one record per batch (tansu's end offsets)
            await p.send_and_wait(topic, encode(rec), key=encode_key(k))
    finally:
        await p.stop()


async def blocked_records(bootstrap: str, want: set[int], timeout: float = 20) -> set[int]:
    """Kinds of raw records flagged AS_F_BLOCKED seen on the raw topic."""
    c = AIOKafkaConsumer("armorstream.raw", bootstrap_servers=bootstrap, group_id=None,
                         auto_offset_reset="earliest", metadata_max_age_ms=1000)  # fmt: skip
    await c.start()
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not want <= seen:
            for msgs in (await c.getmany(timeout_ms=500)).values():
                for m in msgs:
                    hdr, arr = decode_batch(m.value)
                    if hdr.kind in (Kind.EXEC, Kind.NET) and len(arr):
                        flags = np.asarray(arr["hdr"]["flags"])
                        if ((flags & Flag.BLOCKED) != 0).any():
                            seen.add(int(hdr.kind))
    finally:
        await c.stop()
    return seen


class Sensor:
    def __init__(self, box: Box, tmp: Path, pins: Path) -> None:
        self.argv = [sys.executable, "-m", "armorstream.cli", "sensor", "--node-name", "enf-node",
                     "--watch-cgroup", str(box.cgroup), "--visibility", "process",
                     "--spool-dir", str(tmp / "spool"), "--state-dir", str(tmp / "state"),
                     "--pin-dir", str(pins), "--refresh-interval", "0.5"]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "sensor.log"

    def start(self, broker: str) -> None:
        self.log.write_text("")
        with self.log.open("a") as out:
            self.proc = subprocess.Popen([*self.argv, "--broker", broker], stdout=out,
                                         stderr=subprocess.STDOUT,
                                         cwd=ROOT)  # fmt: skip
        deadline = time.monotonic() + 60
        while "ready\n" not in self.log.read_text():
            assert self.proc.poll() is None, f"sensor exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def eventually(check: Any, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.kernel
@pytest.mark.root
def test_sensor_enforces_bound_policy_without_broker_and_after_kill(box: Box, broker: Any,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    from sensor.enforce import unpin_all

    pins = Path(f"/sys/fs/bpf/astest-enf-{os.getpid()}")
    sensor = Sensor(box, tmp_path, pins)
    blocked, allowed = str(box.files / "blocked"), str(box.files / "allowed")
    py = sys.executable
    try:
        assert not box.denied(blocked) and not box.denied(py, "-c", RAW)  # nothing enforced yet
        sensor.start(broker.bootstrap)
        asyncio.run(publish(broker.bootstrap, box))
        assert eventually(lambda: box.denied(blocked)), sensor.log.read_text()
        assert box.denied(py, "-c", RAW)
        assert not box.denied(allowed) and not box.denied(py, "-c", UDP)  # neighbours pass
        assert not subprocess.run([py, "-c", RAW], capture_output=True).returncode  # the host is not the box
        # The denials reached the raw topic as records flagged AS_F_BLOCKED.
        assert asyncio.run(blocked_records(broker.bootstrap, {Kind.EXEC, Kind.NET})) == {Kind.EXEC, Kind.NET}
        assert (tmp_path / "state" / "control.json").exists()

        broker.stop()  # the broker goes away: enforcement does not depend on it
        time.sleep(1)
        assert box.denied(blocked) and box.denied(py, "-c", RAW)
        assert not box.denied(allowed)

        sensor.kill()  # kill -9: pinned maps and links keep the kernel rules in force
        assert box.denied(py, "-c", RAW)
        sensor.start("127.0.0.1:1")  # no broker at all: rules come from the local cache
        assert eventually(lambda: box.denied(blocked), 10), sensor.log.read_text()
        assert box.denied(py, "-c", RAW)
        assert not box.denied(allowed) and not box.denied(py, "-c", UDP)
    finally:
        sensor.kill()
        unpin_all(pins / "enforce")
        if pins.exists():
            shutil.rmtree(pins, ignore_errors=True)
