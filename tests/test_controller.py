"""The controller end to end: real `kubernetes` client -> fake API server, real tansu broker.

A consumer reads the control topics from the beginning, keeps every message it saw and
folds them into a ControlView; tests assert on both (exact records, tombstones, and no
duplicate publication after re-lists and reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kubernetes import client

from controller.directory import DirectorySource
from controller.publish import Publisher
from controller.run import Controller
from controller.state import ClusterState
from controller.watch import KubeSource
from enforcer.control import (
    SNAPSHOT_KEY,
    BindingRecord,
    ContainerRecord,
    ControlTopics,
    ControlView,
    NamespaceRecord,
    NodeRecord,
    Owner,
    SnapshotMarker,
    decode,
    encode,
    encode_key,
)
from enforcer.karmor_log import Event
from enforcer.matcher import Matcher
from enforcer.policy.model import Operation
from enforcer.policy.parse import parse_policy
from enforcer.workload import Workload
from tests.fakekube import FakeKube, make_namespace, make_node, make_pod, make_policy

pytestmark = [pytest.mark.broker]

KSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorPolicy",
    "metadata": {"name": "audit-passwd", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "web"}},
             "file": {"matchPaths": [{"path": "/etc/passwd"}]}, "action": "Audit"},
}
CSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorClusterPolicy",
    "metadata": {"name": "block-apt"},
    "spec": {"severity": 8, "selector": {"matchExpressions": [
        {"key": "namespace", "operator": "NotIn", "values": ["kube-system"]}]},
        "process": {"matchPaths": [{"path": "/usr/bin/apt"}]}, "action": "Block"},
}
HSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorHostPolicy",
    "metadata": {"name": "host-shadow"},
    "spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "node-1"}},
             "file": {"matchPaths": [{"path": "/etc/shadow"}]}, "action": "Block"},
}
CID = "1" * 64


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube(bookmark_interval=0.3).start()
    try:
        yield k
    finally:
        k.stop()


@dataclass
class Harness:
    """A running controller plus a consumer of its topics."""

    source: Any
    bootstrap: str
    snapshot_interval: float = 3600.0
    topics: ControlTopics = field(default_factory=lambda: ControlTopics(prefix=f"t{time.time_ns()}."))
    view: ControlView = field(init=False)
    messages: list[tuple[str, str, Any]] = field(default_factory=list)  # (table, key, record or None)
    controller: Controller = field(init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.view = ControlView(self.topics)
        local = "node-1" if isinstance(self.source, DirectorySource) else None
        self.controller = Controller(self.source, Publisher(self.bootstrap, self.topics),
                                     ClusterState(self.source.resources, local_node=local),
                                     snapshot_interval=self.snapshot_interval)

    async def __aenter__(self) -> Harness:
        await self.controller.publisher.ensure_topics()
        self._tasks = [asyncio.create_task(self.controller.run()), asyncio.create_task(self._consume())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.controller.stop()
        await asyncio.wait_for(self._tasks[0], 10)
        self._tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks[1]

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(t, 0) for t in self.topics.all()])
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                for tp, msgs in batches.items():
                    for m in msgs:
                        self.view.apply(tp.topic, m.key, m.value)
                        key = m.key.decode()
                        self.messages.append((self.topics.table_of(tp.topic), key, decode(m.value)))
        finally:
            await consumer.stop()

    async def until(self, what: Callable[[], object], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; view={self.view.tables}")
            await asyncio.sleep(0.05)

    def deltas(self, since: int) -> list[tuple[str, str, Any]]:
        """Messages after index `since`, snapshots left out."""
        out, in_snapshot = [], False
        for table, key, rec in self.messages[since:]:
            if key == SNAPSHOT_KEY:
                assert isinstance(rec, SnapshotMarker)
                in_snapshot = rec.phase == "begin"
                continue
            if not in_snapshot:
                out.append((table, key, rec))
        return out

    async def settle(self, seconds: float = 0.8) -> None:
        """Let anything still in flight arrive (used only before asserting that nothing more came)."""
        await asyncio.sleep(seconds)


def kube_harness(kube: FakeKube, broker: Any, **kw: Any) -> Harness:
    api = client.ApiClient(kube.client_configuration())
    return Harness(KubeSource(api, watch_timeout=30), broker.bootstrap, **kw)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_creates_updates_deletes_of_every_kind_reach_the_topics(kube: FakeKube, broker: Any) -> None:
    kube.create("namespaces", make_namespace("shop"))
    kube.create("nodes", make_node("node-1"))
    kube.create("pods", make_pod("shop", "web-5f7c9-x1", labels={"app": "web", "pod-template-hash": "5f7c9"},
                                 containers=[("nginx", "nginx:1.27", CID)],
                                 owner=("ReplicaSet", "web-5f7c9")))

    async def scenario() -> None:
        async with kube_harness(kube, broker) as h:
            await h.until(lambda: h.view.snapshots_applied == 5)
            v = h.view
            assert v.containers == {CID: ContainerRecord(
                container_id=CID, runtime="containerd", namespace="shop", pod="web-5f7c9-x1",
                pod_uid=kube.get("pods", "web-5f7c9-x1", "shop")["metadata"]["uid"], container="nginx",
                image="nginx:1.27", node="node-1", labels={"app": "web", "pod-template-hash": "5f7c9"},
                owner=Owner("Deployment", "web", "shop"))}
            assert v.namespaces == {"shop": NamespaceRecord("shop", {"kubernetes.io/metadata.name": "shop"})}
            assert v.nodes == {"node-1": NodeRecord("node-1", {"kubernetes.io/hostname": "node-1"})}
            assert v.policies == {} and v.bindings == {}
            mark = len(h.messages)

            # All three policy kinds: records and bindings appear.
            for doc in (KSP, CSP, HSP):
                kube.create(*make_policy(doc))
            await h.until(lambda: len(v.policies) == 3 and len(v.bindings) == 2)
            assert v.bindings == {
                CID: BindingRecord(CID, ("KubeArmorClusterPolicy/block-apt",
                                         "KubeArmorPolicy/shop/audit-passwd")),
                "node/node-1": BindingRecord("node/node-1", ("KubeArmorHostPolicy/host-shadow",)),
            }
            p = v.policies["KubeArmorPolicy/shop/audit-passwd"]
            assert p.document == KSP and p.source == "kubernetes"
            assert parse_policy(p.document).name == "audit-passwd"  # consumers can rebuild the model

            # Updates: namespace posture, pod labels (the KSP stops matching), policy spec.
            ns = kube.get("namespaces", "shop")
            ns["metadata"]["annotations"] = {"kubearmor-file-posture": "block"}
            kube.update("namespaces", ns)
            pod = kube.get("pods", "web-5f7c9-x1", "shop")
            pod["metadata"]["labels"]["app"] = "api"
            kube.update("pods", pod)
            csp = kube.get("kubearmorclusterpolicies", "block-apt")
            csp["spec"]["severity"] = 9
            kube.update("kubearmorclusterpolicies", csp)
            csp_key = "KubeArmorClusterPolicy/block-apt"
            await h.until(lambda: v.namespaces["shop"].file_posture == "block"
                          and v.containers[CID].labels["app"] == "api"
                          and v.policies[csp_key].document["spec"]["severity"] == 9)
            await h.until(lambda: v.bindings[CID].policies == ("KubeArmorClusterPolicy/block-apt",))

            # Deletes: tombstones for the records and for bindings that became empty.
            kube.delete("kubearmorclusterpolicies", "block-apt")
            kube.delete("kubearmorhostpolicies", "host-shadow")
            kube.delete("kubearmorpolicies", "audit-passwd", "shop")
            kube.delete("pods", "web-5f7c9-x1", "shop")
            kube.delete("namespaces", "shop")
            kube.delete("nodes", "node-1")
            await h.until(lambda: not any(v.tables.values()))
            await h.settle()
            tombstones = {(t, k) for t, k, r in h.deltas(mark) if r is None}
            assert tombstones == {
                ("policies", "KubeArmorClusterPolicy/block-apt"),
                ("policies", "KubeArmorHostPolicy/host-shadow"),
                ("policies", "KubeArmorPolicy/shop/audit-passwd"),
                ("containers", CID), ("namespaces", "shop"),
                ("nodes", "node-1"), ("bindings", CID), ("bindings", "node/node-1")}

    run(scenario())


def test_watch_gaps_410_and_dropped_connections_lose_and_duplicate_nothing(
        kube: FakeKube, broker: Any) -> None:
    kube.create("namespaces", make_namespace("shop"))
    kube.create("pods", make_pod("shop", "a", containers=[("c", "img", "a" * 64)]))
    kube.create("pods", make_pod("shop", "b", containers=[("c", "img", "b" * 64)]))

    async def scenario() -> None:
        async with kube_harness(kube, broker) as h:
            v = h.view
            await h.until(lambda: h.view.snapshots_applied == 5)
            watchers = {w.resource.plural: w for w in h.source.watchers}

            # 1. A gap: the watch misses a delete and a create, then history is compacted
            #    and the connection drops. Resuming gets 410 Gone; the re-list sends the difference.
            mark = len(h.messages)
            kube.hold_watches()
            kube.delete("pods", "a", "shop")
            kube.create("pods", make_pod("shop", "c", containers=[("c", "img", "c" * 64)]))
            kube.compact()
            kube.drop_watches()
            kube.hold_watches(False)
            await h.until(lambda: set(v.containers) == {"b" * 64, "c" * 64})
            await h.settle()
            assert watchers["pods"].stats["gone"] >= 1
            assert [(t, k, r is None) for t, k, r in h.deltas(mark)] == [
                ("containers", "a" * 64, True), ("containers", "c" * 64, False)]

            # 2. The API server expires open watches (ERROR 410): re-list, nothing changed, nothing sent.
            mark, lists = len(h.messages), watchers["pods"].stats["lists"]
            kube.expire_watches()
            await h.until(lambda: watchers["pods"].stats["lists"] > lists)
            await h.settle()
            assert h.deltas(mark) == []

            # 3. Connections cut mid-stream while changes happen: resume from the last version.
            mark, gone = len(h.messages), watchers["pods"].stats["gone"]
            for i in range(5):
                kube.create("pods", make_pod("shop", f"d{i}", containers=[("c", "img", f"{i:064x}")]))
                if i % 2 == 0:
                    kube.drop_watches()
            await h.until(lambda: len(v.containers) == 7)
            await h.settle()
            assert sorted(k for _, k, _ in h.deltas(mark)) == sorted(f"{i:064x}" for i in range(5))
            assert watchers["pods"].stats["errors"] >= 1 and watchers["pods"].stats["gone"] == gone

    run(scenario())


def test_cluster_policy_then_new_namespace_and_pod_kubearmor_2099(kube: FakeKube, broker: Any) -> None:
    kube.create(*make_policy(CSP))  # the cluster policy exists first

    async def scenario() -> None:
        async with kube_harness(kube, broker) as h:
            v = h.view
            await h.until(lambda: "KubeArmorClusterPolicy/block-apt" in v.policies)
            kube.create("namespaces", make_namespace("created-later"))
            kube.create("pods", make_pod("created-later", "web", labels={"app": "web"},
                                         containers=[("web", "nginx", CID)]))
            await h.until(lambda: CID in v.bindings)

            # A consumer computes the verdict from the topics alone: container -> pod metadata,
            # binding -> policy documents -> the matcher.
            c = v.containers[CID]
            policies = [parse_policy(p.document) for p in v.policies_for_container(CID)]
            assert [p.name for p in policies] == ["block-apt"]
            verdict = Matcher(policies).decide(
                Workload.container(c.namespace, c.labels, c.container, c.pod),
                Event(Operation.PROCESS, "/usr/bin/apt", process="/usr/bin/apt", source="/bin/bash"))
            assert (verdict.action, verdict.policy_name) == ("Block", "block-apt")

            # Excluded namespaces created later are not covered.
            kube.create("namespaces", make_namespace("kube-system"))
            kube.create("pods", make_pod("kube-system", "dns", containers=[("dns", "coredns", "2" * 64)]))
            await h.until(lambda: "2" * 64 in v.containers)
            await h.settle()
            assert "2" * 64 not in v.bindings

    run(scenario())


def test_invalid_policy_gets_an_event_and_is_not_published(
        kube: FakeKube, broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    bad = {**KSP, "metadata": {"name": "bad", "namespace": "shop"},
           "spec": {**KSP["spec"], "file": {"matchPaths": [{"path": "etc/passwd"}]}}}
    kube.create(*make_policy(bad))
    kube.create(*make_policy(KSP))

    async def scenario() -> None:
        async with kube_harness(kube, broker) as h:
            await h.until(lambda: h.view.snapshots_applied == 5 and kube.posted_events())
            assert list(h.view.policies) == ["KubeArmorPolicy/shop/audit-passwd"]
            [ev] = kube.posted_events()
            assert ev["involvedObject"]["kind"] == "KubeArmorPolicy"
            assert ev["involvedObject"]["name"] == "bad"
            uid = kube.get("kubearmorpolicies", "bad", "shop")["metadata"]["uid"]
            assert ev["involvedObject"]["uid"] == uid
            assert ev["metadata"]["namespace"] == "shop"
            assert ev["reason"] == "InvalidPolicy" and ev["type"] == "Warning"
            assert "spec.file.matchPaths[0].path" in ev["message"]

    with caplog.at_level(logging.ERROR, logger="armorstream.controller"):
        run(scenario())
    logged = [r.getMessage() for r in caplog.records]
    assert any("KubeArmorPolicy/shop/bad" in m and "spec.file.matchPaths[0].path" in m for m in logged)


def test_periodic_snapshots_let_a_late_consumer_drop_missed_deletes(kube: FakeKube, broker: Any) -> None:
    kube.create("namespaces", make_namespace("a"))
    kube.create("namespaces", make_namespace("b"))

    async def scenario() -> None:
        async with kube_harness(kube, broker, snapshot_interval=0.5) as h:
            await h.until(lambda: h.view.snapshots_applied >= 10)  # two rounds of five topics
            kube.delete("namespaces", "a")
            await h.until(lambda: set(h.view.namespaces) == {"b"})
            # A consumer that lost the tombstone (here: the messages without it) still converges
            # once a later snapshot arrives.
            late = ControlView(h.topics)
            n = h.view.snapshots_applied
            await h.until(lambda: h.view.snapshots_applied >= n + 5)
            for table, key, rec in h.messages:
                if rec is None:
                    continue  # drop every tombstone
                late.apply(getattr(h.topics, table), encode_key(key), encode(rec))
            assert set(late.namespaces) == {"b"}

    run(scenario())


def test_directory_mode_add_modify_delete(
        tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    import yaml

    (tmp_path / "ksp.yaml").write_text(yaml.safe_dump(KSP))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "host.yml").write_text(yaml.safe_dump(HSP))
    (tmp_path / "bad.yaml").write_text("apiVersion: security.kubearmor.com/v1\nkind: KubeArmorPolicy\n"
                                       "metadata:\n  name: bad\nspec:\n  selector: {}\n"
                                       "  file:\n    matchPaths:\n    - path: etc/passwd\n")

    async def scenario() -> None:
        async with Harness(DirectorySource(tmp_path, interval=0.1), broker.bootstrap) as h:
            v = h.view
            await h.until(lambda: v.snapshots_applied == 5)
            assert set(v.policies) == {"KubeArmorPolicy/shop/audit-passwd", "KubeArmorHostPolicy/host-shadow"}
            assert v.policies["KubeArmorPolicy/shop/audit-passwd"].source == str(tmp_path / "ksp.yaml")
            # Host policies apply to the local node.
            assert v.nodes == {"node-1": NodeRecord("node-1", {"kubernetes.io/hostname": "node-1"})}
            hsp_key = "KubeArmorHostPolicy/host-shadow"
            assert v.bindings == {"node/node-1": BindingRecord("node/node-1", (hsp_key,))}

            # add
            (tmp_path / "csp.yaml").write_text(yaml.safe_dump(CSP))
            await h.until(lambda: "KubeArmorClusterPolicy/block-apt" in v.policies)
            # modify
            changed = {**KSP, "spec": {**KSP["spec"], "action": "Block"}}
            (tmp_path / "ksp.yaml").write_text(yaml.safe_dump(changed))
            await h.until(lambda: v.policies["KubeArmorPolicy/shop/audit-passwd"].document == changed)
            # delete
            mark = len(h.messages)
            (tmp_path / "sub" / "host.yml").unlink()
            await h.until(lambda: "KubeArmorHostPolicy/host-shadow" not in v.policies)
            await h.settle(0.3)
            # Topics are read side by side, so compare without order across topics.
            assert sorted(h.deltas(mark)) == [("bindings", "node/node-1", None),
                                              ("policies", "KubeArmorHostPolicy/host-shadow", None)]

    with caplog.at_level(logging.ERROR, logger="armorstream.controller"):
        run(scenario())
    bad = [r.getMessage() for r in caplog.records if "bad.yaml" in r.getMessage()]
    assert len(bad) == 1 and ":9: spec.file.matchPaths[0].path" in bad[0], bad
