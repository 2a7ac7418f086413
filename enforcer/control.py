"""The control topics: names and record encodings, in one place.

The controller (Kubernetes or directory mode) publishes the cluster's state as keyed
records; the sensor and the stream fold them into local tables with `ControlView`.
Every value is a small JSON object with a version and a type tag; a delete is a
tombstone (value None). Because some brokers (tansu) never compact, the controller
also publishes a periodic full snapshot per topic, framed by two markers under the
reserved key `SNAPSHOT_KEY`; a consumer that sees a complete snapshot replaces its
table with it, which drops keys whose tombstones it missed.

Each control topic has one partition so the markers and the records stay in order.

Topics and keys:
  containers  container id (runtime prefix stripped)  -> ContainerRecord
  namespaces  namespace name                          -> NamespaceRecord
  nodes       node name                               -> NodeRecord
  policies    policy_key(kind, namespace, name)       -> PolicyRecord
  bindings    container id, or "node/<name>"          -> BindingRecord

A binding is the resolved answer to "which policies apply here", recomputed by the
controller whenever a pod, namespace, node or policy changes, so a cluster policy
created before a namespace still covers that namespace's pods (KubeArmor #2099).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from enforcer.errors import ArmorstreamError

__all__ = [
    "DEFAULT_PREFIX",
    "SNAPSHOT_KEY",
    "BindingRecord",
    "ContainerRecord",
    "ControlError",
    "ControlRecord",
    "ControlTopics",
    "ControlView",
    "NamespaceRecord",
    "NodeRecord",
    "Owner",
    "PolicyRecord",
    "SnapshotMarker",
    "decode",
    "decode_key",
    "encode",
    "encode_key",
    "node_binding_key",
    "policy_key",
]

VERSION: Final = 1
DEFAULT_PREFIX: Final = "armorstream."
SNAPSHOT_KEY: Final = "!snapshot"  # no container id, DNS name or policy key starts with '!'

# Namespace annotations KubeArmor reads (its docs: default posture and visibility).
FILE_POSTURE: Final = "kubearmor-file-posture"
NETWORK_POSTURE: Final = "kubearmor-network-posture"
CAPABILITIES_POSTURE: Final = "kubearmor-capabilities-posture"
VISIBILITY: Final = "kubearmor-visibility"


class ControlError(ArmorstreamError):
    """A control record that cannot be encoded or decoded; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ControlTopics:
    """Topic names under one prefix (several deployments can share a broker)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def containers(self) -> str:
        return f"{self.prefix}control.containers"

    @property
    def namespaces(self) -> str:
        return f"{self.prefix}control.namespaces"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}control.nodes"

    @property
    def policies(self) -> str:
        return f"{self.prefix}control.policies"

    @property
    def bindings(self) -> str:
        return f"{self.prefix}control.bindings"

    def all(self) -> tuple[str, ...]:
        return (self.containers, self.namespaces, self.nodes, self.policies, self.bindings)

    def table_of(self, topic: str) -> str:
        """The table name ("containers", ...) for one of these topics."""
        if not topic.startswith(f"{self.prefix}control."):
            raise ControlError(f"{topic!r} is not a control topic under prefix {self.prefix!r}")
        name = topic[len(self.prefix) + len("control."):]
        if name not in TABLES:
            raise ControlError(f"{topic!r} is not a control topic under prefix {self.prefix!r}")
        return name


TABLES: Final = ("containers", "namespaces", "nodes", "policies", "bindings")


def policy_key(kind: str, namespace: str | None, name: str) -> str:
    """`Kind/namespace/name` for namespaced policies, `Kind/name` for cluster-scoped ones."""
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


def node_binding_key(node: str) -> str:
    return f"node/{node}"


@dataclass(frozen=True, slots=True)
class Owner:
    """The workload owning a pod, as KubeArmor's Owner field shows it (Deployment, not ReplicaSet)."""

    ref: str  # kind: Deployment, StatefulSet, DaemonSet, Job, CronJob, Pod
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    container_id: str  # without the runtime prefix ("containerd://")
    runtime: str  # "containerd", "docker", "cri-o", ...
    namespace: str
    pod: str
    pod_uid: str
    container: str
    image: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    owner: Owner | None = None


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # Default posture per kind from the kubearmor-*-posture annotations ("audit", "block"),
    # None when the namespace does not set one (the global default applies).
    file_posture: str | None = None
    network_posture: str | None = None
    capabilities_posture: str | None = None
    visibility: str | None = None  # kubearmor-visibility, e.g. "process,file,network"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """A validated policy: its document (apiVersion, kind, metadata, spec) plus provenance."""

    kind: str
    namespace: str | None
    name: str
    document: Mapping[str, Any]
    source: str  # "kubernetes" or the file it was read from
    uid: str = ""
    resource_version: str = ""

    @property
    def key(self) -> str:
        return policy_key(self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class BindingRecord:
    """Policies that apply to one container (or to one node: key "node/<name>")."""

    target: str
    policies: tuple[str, ...]  # sorted policy keys


@dataclass(frozen=True, slots=True)
class SnapshotMarker:
    snapshot: str  # id shared by the begin and end markers of one snapshot
    phase: Literal["begin", "end"]
    count: int = 0  # records between the markers; set on "end"


ControlRecord = ContainerRecord | NamespaceRecord | NodeRecord | PolicyRecord | BindingRecord

_TYPE_OF: Final[dict[type, str]] = {
    ContainerRecord: "container",
    NamespaceRecord: "namespace",
    NodeRecord: "node",
    PolicyRecord: "policy",
    BindingRecord: "binding",
    SnapshotMarker: "snapshot",
}


def encode_key(key: str) -> bytes:
    return key.encode()


def decode_key(key: bytes | None) -> str:
    if key is None:
        raise ControlError("control record without a key")
    try:
        return key.decode()
    except UnicodeDecodeError as e:
        raise ControlError(f"control record key is not UTF-8: {key[:40]!r}") from e


def encode(record: ControlRecord | SnapshotMarker | None) -> bytes | None:
    """JSON bytes for a record; None (a tombstone) stays None."""
    if record is None:
        return None
    body: dict[str, Any]
    match record:
        case ContainerRecord():
            body = {
                "container_id": record.container_id, "runtime": record.runtime,
                "namespace": record.namespace, "pod": record.pod, "pod_uid": record.pod_uid,
                "container": record.container, "image": record.image, "node": record.node,
                "labels": dict(record.labels),
                "owner": None if record.owner is None else
                {"ref": record.owner.ref, "name": record.owner.name, "namespace": record.owner.namespace},
            }
        case NamespaceRecord():
            body = {
                "name": record.name, "labels": dict(record.labels),
                "file_posture": record.file_posture, "network_posture": record.network_posture,
                "capabilities_posture": record.capabilities_posture, "visibility": record.visibility,
            }
        case NodeRecord():
            body = {"name": record.name, "labels": dict(record.labels)}
        case PolicyRecord():
            body = {
                "kind": record.kind, "namespace": record.namespace, "name": record.name,
                "document": record.document, "source": record.source, "uid": record.uid,
                "resource_version": record.resource_version,
            }
        case BindingRecord():
            body = {"target": record.target, "policies": list(record.policies)}
        case SnapshotMarker():
            body = {"snapshot": record.snapshot, "phase": record.phase, "count": record.count}
    body["v"] = VERSION
    body["type"] = _TYPE_OF[type(record)]
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError as e:  # a policy document holding something JSON cannot carry
        raise ControlError(f"cannot encode {body['type']} record: {e}") from e


def _labels(v: object, what: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ControlError(f"{what}: labels must map strings to strings")
    return v


def decode(value: bytes | None) -> ControlRecord | SnapshotMarker | None:
    """The record in a message value; None for a tombstone. Raises ControlError, never KeyError."""
    if value is None:
        return None
    try:
        d = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise ControlError(f"control record is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise ControlError("control record is not a JSON object")
    if d.get("v") != VERSION:
        raise ControlError(f"control record version {d.get('v')!r} is not supported (expected {VERSION})")
    kind = d.get("type")
    try:
        match kind:
            case "container":
                o = d["owner"]
                return ContainerRecord(
                    container_id=d["container_id"], runtime=d["runtime"], namespace=d["namespace"],
                    pod=d["pod"], pod_uid=d["pod_uid"], container=d["container"], image=d["image"],
                    node=d["node"], labels=_labels(d["labels"], "container"),
                    owner=None if o is None else Owner(o["ref"], o["name"], o["namespace"]),
                )
            case "namespace":
                return NamespaceRecord(
                    name=d["name"], labels=_labels(d["labels"], "namespace"),
                    file_posture=d["file_posture"], network_posture=d["network_posture"],
                    capabilities_posture=d["capabilities_posture"], visibility=d["visibility"],
                )
            case "node":
                return NodeRecord(name=d["name"], labels=_labels(d["labels"], "node"))
            case "policy":
                if not isinstance(d["document"], dict):
                    raise ControlError("policy record: document must be an object")
                return PolicyRecord(
                    kind=d["kind"], namespace=d["namespace"], name=d["name"], document=d["document"],
                    source=d["source"], uid=d["uid"], resource_version=d["resource_version"],
                )
            case "binding":
                return BindingRecord(target=d["target"], policies=tuple(d["policies"]))
            case "snapshot":
                if d["phase"] not in ("begin", "end"):
                    raise ControlError(f"snapshot marker phase {d['phase']!r} is not begin or end")
                return SnapshotMarker(snapshot=d["snapshot"], phase=d["phase"], count=int(d["count"]))
            case _:
                raise ControlError(f"unknown control record type {kind!r}")
    except KeyError as e:
        raise ControlError(f"{kind} record lacks field {e.args[0]!r}") from e


@dataclass
class _Shadow:
    snapshot: str
    rows: dict[str, ControlRecord] = field(default_factory=dict)


@dataclass
class ControlView:
    """A consumer's copy of the control tables, folded from the topics' messages.

    Records apply as they arrive. A complete snapshot (begin marker, N records, end
    marker with count N) then replaces the table, so keys deleted while the consumer
    was away disappear even without their tombstones. An incomplete snapshot (joined
    half-way) is ignored.
    """

    topics: ControlTopics = field(default_factory=ControlTopics)
    tables: dict[str, dict[str, ControlRecord]] = field(
        default_factory=lambda: {t: {} for t in TABLES})
    snapshots_applied: int = 0
    _shadows: dict[str, _Shadow] = field(default_factory=dict)

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        table = self.topics.table_of(topic)
        k = decode_key(key)
        rec = decode(value)
        rows = self.tables[table]
        if isinstance(rec, SnapshotMarker):
            shadow = self._shadows.get(table)
            if rec.phase == "begin":
                self._shadows[table] = _Shadow(rec.snapshot)
            elif shadow is not None and shadow.snapshot == rec.snapshot:
                del self._shadows[table]
                if len(shadow.rows) == rec.count:
                    self.tables[table] = shadow.rows
                    self.snapshots_applied += 1
            return
        if rec is None:
            rows.pop(k, None)
            if (shadow := self._shadows.get(table)) is not None:
                shadow.rows.pop(k, None)
            return
        rows[k] = rec
        if (shadow := self._shadows.get(table)) is not None:
            shadow.rows[k] = rec

    @property
    def containers(self) -> dict[str, ContainerRecord]:
        return self.tables["containers"]  # type: ignore[return-value]

    @property
    def namespaces(self) -> dict[str, NamespaceRecord]:
        return self.tables["namespaces"]  # type: ignore[return-value]

    @property
    def nodes(self) -> dict[str, NodeRecord]:
        return self.tables["nodes"]  # type: ignore[return-value]

    @property
    def policies(self) -> dict[str, PolicyRecord]:
        return self.tables["policies"]  # type: ignore[return-value]

    @property
    def bindings(self) -> dict[str, BindingRecord]:
        return self.tables["bindings"]  # type: ignore[return-value]

    def policies_for_container(self, container_id: str) -> list[PolicyRecord]:
        """The policy records bound to a container (empty when unknown)."""
        b = self.bindings.get(container_id)
        if b is None:
            return []
        return [self.policies[k] for k in b.policies if k in self.policies]
