"""Controller at scale: resident memory and time to the first full snapshot.

The fake API server (tests/fakekube.py) runs in this process; the controller runs as
`armorstream controller` in a child process, so its memory is its own. Baseline and
candidate are measured in the same run: the controller against an empty cluster,
then against N pods in M namespaces with P policies. After the first snapshot the
server expires every watch R times (410 Gone -> full re-list) to show whether memory
grows across re-lists.

    .venv/bin/python bench/controller_scale.py            # short: 2,000 pods (a few seconds)
    .venv/bin/python bench/controller_scale.py --full     # 10,000 pods, 500 namespaces, 1,000 policies
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from armorstream.embedded_broker import TansuBroker
from enforcer.control import SNAPSHOT_KEY, ControlTopics, SnapshotMarker, decode
from tests.fakekube import FakeKube, make_namespace, make_node, make_pod, make_policy


def populate(kube: FakeKube, pods: int, namespaces: int, policies: int, nodes: int) -> int:
    """Create the cluster; returns the JSON size of all objects (bytes)."""
    size = 0

    def add(plural: str, obj: dict) -> None:
        nonlocal size
        size += len(json.dumps(kube.create(plural, obj)))

    for n in range(nodes):
        add("nodes", make_node(f"node-{n}"))
    for i in range(namespaces):
        add("namespaces", make_namespace(f"ns-{i}", labels={"team": f"t{i % 7}"}))
    for p in range(pods):
        ns = f"ns-{p % namespaces}"
        app = f"app-{p % 5}"
        add("pods", make_pod(ns, f"{app}-{p:05d}", labels={"app": app, "pod-template-hash": "abc12"},
                             containers=[("main", "nginx:1.27", f"{p:064x}")], node=f"node-{p % nodes}",
                             owner=("ReplicaSet", f"{app}-abc12")))
    csps, hsps = max(1, policies // 20), max(1, policies // 100)
    for k in range(policies - csps - hsps):
        add(*make_policy({"apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorPolicy",
                          "metadata": {"name": f"ksp-{k}", "namespace": f"ns-{k % namespaces}"},
                          "spec": {"selector": {"matchLabels": {"app": f"app-{k % 5}"}},
                                   "file": {"matchPaths": [{"path": f"/etc/secret-{k}"}]},
                                   "action": "Block"}}))
    for k in range(csps):
        add(*make_policy({"apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorClusterPolicy",
                          "metadata": {"name": f"csp-{k}"},
                          "spec": {"selector": {"matchExpressions": [
                              {"key": "namespace", "operator": "NotIn", "values": [f"ns-{k}"]}]},
                              "process": {"matchPaths": [{"path": f"/usr/bin/tool-{k}"}]},
                              "action": "Block"}}))
    for k in range(hsps):
        add(*make_policy({"apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorHostPolicy",
                          "metadata": {"name": f"hsp-{k}"},
                          "spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": f"node-{k}"}},
                                   "file": {"matchPaths": [{"path": "/etc/shadow"}]}, "action": "Block"}}))
    return size


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def snapshots_seen(bootstrap: str, topics: ControlTopics, want: int, timeout: float) -> float:
    """Wait until `want` complete snapshots of the bindings topic (the last one published) arrived."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_bytes=64 << 20)
    await consumer.start()
    deadline = time.monotonic() + timeout
    try:
        while topics.bindings not in await consumer.topics():
            if time.monotonic() > deadline:
                raise TimeoutError("bindings topic never appeared")
            await asyncio.sleep(0.1)
        consumer.assign([TopicPartition(topics.bindings, 0)])
        seen = 0
        while seen < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw {seen} of {want} snapshots")
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                for m in msgs:
                    if m.key == SNAPSHOT_KEY.encode():
                        rec = decode(m.value)
                        if isinstance(rec, SnapshotMarker) and rec.phase == "end":
                            seen += 1
        return time.monotonic()
    finally:
        await consumer.stop()


def measure(broker: TansuBroker, kube: FakeKube, prefix: str, relists: int,
            timeout: float) -> dict[str, float]:
    topics = ControlTopics(prefix)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "armorstream.cli", "controller", "--api-server", kube.url,
         "--broker", broker.bootstrap, "--topic-prefix", prefix, "--snapshot-interval", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t1 = asyncio.run(snapshots_seen(broker.bootstrap, topics, 1, timeout))
        out = {"first_snapshot_s": t1 - t0}
        out["rss_mib"], out["peak_mib"] = rss_mib(proc.pid)
        for _ in range(relists):
            lists = kube.count("GET", "/api/v1/pods", watch=False)
            kube.expire_watches()
            while kube.count("GET", "/api/v1/pods", watch=False) == lists:
                time.sleep(0.05)
            time.sleep(1.0)  # let the re-list be folded in
        out["rss_after_relists_mib"], _ = rss_mib(proc.pid)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="10,000 pods / 500 namespaces / 1,000 policies")
    ap.add_argument("--relists", type=int, default=2)
    a = ap.parse_args()
    pods, namespaces, policies, nodes = (10_000, 500, 1_000, 50) if a.full else (2_000, 100, 200, 10)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    broker = TansuBroker().start()
    try:
        empty = FakeKube(bookmark_interval=5).start()
        try:
            base = measure(broker, empty, "base.", a.relists, 60)
        finally:
            empty.stop()
        kube = FakeKube(bookmark_interval=5).start()
        try:
            t = time.monotonic()
            size = populate(kube, pods, namespaces, policies, nodes)
            print(f"cluster: {pods} pods, {namespaces} namespaces, {policies} policies, {nodes} nodes; "
                  f"objects {size / 2**20:.1f} MiB of JSON (created in {time.monotonic() - t:.1f}s)")
            cand = measure(broker, kube, "scale.", a.relists, 600)
        finally:
            kube.stop()
    finally:
        broker.stop()
    print(f"{'':24}{'empty cluster':>16}{'scale':>16}")
    for k, label in (("first_snapshot_s", "first snapshot (s)"), ("rss_mib", "RSS (MiB)"),
                     ("peak_mib", "peak RSS (MiB)"),
                     ("rss_after_relists_mib", f"RSS after {a.relists} relists")):
        print(f"{label:24}{base[k]:16.1f}{cand[k]:16.1f}")
    per_obj = (cand["rss_mib"] - base["rss_mib"]) * 1024 / max(1, pods + namespaces + policies)
    print(f"memory over baseline: {cand['rss_mib'] - base['rss_mib']:.1f} MiB "
          f"({per_obj:.2f} KiB per object; {cand['rss_mib'] / base['rss_mib']:.2f}x the empty controller); "
          f"re-list growth {cand['rss_after_relists_mib'] - cand['rss_mib']:+.1f} MiB")


if __name__ == "__main__":
    main()
