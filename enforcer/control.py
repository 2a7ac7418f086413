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
  cgroups     cgroup_key(node, cgroup id)             -> CgroupRecord

The cgroups topic is published by each node's sensor, not by the controller: it
maps the cgroup id the kernel stamps on every record to the container running
in it, which is how the stream joins events to pod metadata. It carries no
snapshots (every node owns its own keys), so it is not part of `ControlTopics.all()`.

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
    "CgroupRecord",
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
    "cgroup_key",
    "decode",
    "decode_key",
    "encode",
    "encode_key",
    "node_binding_key",
    "parse_cgroup_key",
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

    @property
    def cgroups(self) -> str:
        """Published by the sensors (one key per node and cgroup), not by the controller."""
        return f"{self.prefix}control.cgroups"

    def all(self) -> tuple[str, ...]:
        """The controller's topics (the tables of `ControlView`, snapshots included)."""
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


def cgroup_key(node: str, cgroup_id: int) -> str:
    """`node/cgroup_id`: node names are DNS names, so the last '/' splits it back."""
    return f"{node}/{cgroup_id}"


def parse_cgroup_key(key: str) -> tuple[str, int]:
    node, _, cg = key.rpartition("/")
    if not node or not cg.isdigit():
        raise ControlError(f"cgroup key {key[:80]!r} is not node/cgroup_id")
    return node, int(cg)


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
class CgroupRecord:
    """One cgroup of a node and the container running in it (the sensor reads it from the
    cgroup path). Removed with a tombstone when the cgroup goes away."""

    node: str
    cgroup_id: int  # the kernel's cgroup id (kernfs inode), as in every raw record's header
    container_id: str  # without the runtime prefix
    pod_uid: str = ""  # "" for containers outside Kubernetes
    runtime: str = ""  # "containerd", "cri-o", "docker", "podman"; "" when the path does not say
    path: str = ""  # the cgroup path under the cgroup2 root, for people reading the topic

    @property
    def key(self) -> str:
        return cgroup_key(self.node, self.cgroup_id)


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
    CgroupRecord: "cgroup",
    SnapshotMarker: "snapshot",
}
_TYPES: Final = frozenset(_TYPE_OF.values())
# The table each record type belongs to: a record on another table's topic is rejected.
_TABLE_OF: Final[dict[type, str]] = {
    ContainerRecord: "containers",
    NamespaceRecord: "namespaces",
    NodeRecord: "nodes",
    PolicyRecord: "policies",
    BindingRecord: "bindings",
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


def encode(record: ControlRecord | CgroupRecord | SnapshotMarker | None) -> bytes | None:
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
        case CgroupRecord():
            body = {
                "node": record.node, "cgroup_id": record.cgroup_id, "container_id": record.container_id,
                "pod_uid": record.pod_uid, "runtime": record.runtime, "path": record.path,
            }
        case SnapshotMarker():
            body = {"snapshot": record.snapshot, "phase": record.phase, "count": record.count}
    body["v"] = VERSION
    body["type"] = _TYPE_OF[type(record)]
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError as e:  # a policy document holding something JSON cannot carry
        raise ControlError(f"cannot encode {body['type']} record: {e}") from e


class _Fields:
    """Typed reads of one decoded JSON object: a missing or mistyped field is a ControlError."""

    __slots__ = ("d", "what")

    def __init__(self, d: dict[str, Any], what: str) -> None:
        self.d = d
        self.what = what

    def _get(self, name: str) -> object:
        if name not in self.d:
            raise ControlError(f"{self.what} record lacks field {name!r}")
        return self.d[name]

    def _bad(self, name: str, want: str) -> ControlError:
        return ControlError(f"{self.what} record: {name} must be {want}, not {type(self.d[name]).__name__}")

    def text(self, name: str) -> str:
        v = self._get(name)
        if not isinstance(v, str):
            raise self._bad(name, "a string")
        return v

    def opt_text(self, name: str) -> str | None:
        v = self._get(name)
        if v is not None and not isinstance(v, str):
            raise self._bad(name, "a string or null")
        return v

    def count(self, name: str) -> int:
        v = self._get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise self._bad(name, "a non-negative integer")
        return v

    def labels(self, name: str = "labels") -> dict[str, str]:
        v = self._get(name)
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise ControlError(f"{self.what} record: {name} must map strings to strings")
        return v

    def texts(self, name: str) -> tuple[str, ...]:
        v = self._get(name)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(name, "a list of strings")
        return tuple(v)

    def sub(self, name: str) -> _Fields | None:
        v = self._get(name)
        if v is not None and not isinstance(v, dict):
            raise self._bad(name, "an object or null")
        return None if v is None else _Fields(v, f"{self.what} {name}")


def decode(value: bytes | None) -> ControlRecord | CgroupRecord | SnapshotMarker | None:
    """The record in a message value; None for a tombstone. Raises ControlError and nothing else."""
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
    if not isinstance(kind, str) or kind not in _TYPES:
        raise ControlError(f"unknown control record type {kind!r}")
    f = _Fields(d, kind)
    match kind:
        case "container":
            o = f.sub("owner")
            return ContainerRecord(
                container_id=f.text("container_id"), runtime=f.text("runtime"), namespace=f.text("namespace"),
                pod=f.text("pod"), pod_uid=f.text("pod_uid"), container=f.text("container"),
                image=f.text("image"), node=f.text("node"), labels=f.labels(),
                owner=None if o is None else Owner(o.text("ref"), o.text("name"), o.text("namespace")),
            )
        case "namespace":
            return NamespaceRecord(
                name=f.text("name"), labels=f.labels(), file_posture=f.opt_text("file_posture"),
                network_posture=f.opt_text("network_posture"),
                capabilities_posture=f.opt_text("capabilities_posture"), visibility=f.opt_text("visibility"),
            )
        case "node":
            return NodeRecord(name=f.text("name"), labels=f.labels())
        case "policy":
            doc = f.sub("document")
            if doc is None:
                raise ControlError("policy record: document must be an object")
            return PolicyRecord(
                kind=f.text("kind"), namespace=f.opt_text("namespace"), name=f.text("name"), document=doc.d,
                source=f.text("source"), uid=f.text("uid"), resource_version=f.text("resource_version"),
            )
        case "binding":
            return BindingRecord(target=f.text("target"), policies=f.texts("policies"))
        case "cgroup":
            return CgroupRecord(
                node=f.text("node"), cgroup_id=f.count("cgroup_id"), container_id=f.text("container_id"),
                pod_uid=f.text("pod_uid"), runtime=f.text("runtime"), path=f.text("path"),
            )
        case _:  # "snapshot"
            match f.text("phase"):
                case "begin":
                    phase: Literal["begin", "end"] = "begin"
                case "end":
                    phase = "end"
                case other:
                    raise ControlError(f"snapshot marker phase {other!r} is not begin or end")
            return SnapshotMarker(snapshot=f.text("snapshot"), phase=phase, count=f.count("count"))


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
        if isinstance(rec, CgroupRecord) or (
                rec is not None and not isinstance(rec, SnapshotMarker) and _TABLE_OF[type(rec)] != table):
            raise ControlError(f"a {_TYPE_OF[type(rec)]} record on {topic} (key {k[:80]!r}) is misplaced")
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
