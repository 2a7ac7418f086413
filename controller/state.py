"""The controller's model of the cluster and the control records it implies (sans I/O).

Watchers feed `Sync` (a full list of one resource) and `Change` (one watch event);
`ClusterState.apply` folds them in and returns the control records that changed since
the last publication: upserts, and tombstones (None) for keys that went away. A re-list
after 410 Gone is just another `Sync`: unchanged objects produce nothing, objects deleted
while the watch was down produce tombstones, so nothing is lost or duplicated.

Bindings (which policies apply to a container or a node) are evaluated here, with the
matcher's own selection rules, whenever a pod, namespace, node or policy changes. A
cluster policy therefore covers pods of namespaces created after it and stops covering a
pod whose labels no longer match (KubeArmor #2099 came from resolving cluster policies to
namespaces once, at creation).

Nothing is published before every watched resource has been listed once; then
`snapshot()` gives the first full state, and `apply` gives deltas from there on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from enforcer.control import (
    CAPABILITIES_POSTURE,
    FILE_POSTURE,
    NETWORK_POSTURE,
    TABLES,
    VISIBILITY,
    BindingRecord,
    ContainerRecord,
    ControlRecord,
    NamespaceRecord,
    NodeRecord,
    Owner,
    PolicyRecord,
    node_binding_key,
    policy_key,
)
from enforcer.errors import PolicyError, PolicyErrors
from enforcer.matcher import Matcher
from enforcer.policy.model import Policy, PolicyKind
from enforcer.policy.parse import parse_policy, yaml_lines
from enforcer.workload import Workload

__all__ = [
    "POLICY_RESOURCES",
    "RESOURCES",
    "Change",
    "ClusterState",
    "InvalidPolicy",
    "Obj",
    "Sync",
    "Update",
]

log = logging.getLogger("armorstream.controller")

Obj = dict[str, Any]

# Resource (plural) -> policy kind, for the three KubeArmor kinds the controller applies.
POLICY_RESOURCES: dict[str, PolicyKind] = {
    "kubearmorpolicies": PolicyKind.KSP,
    "kubearmorclusterpolicies": PolicyKind.CSP,
    "kubearmorhostpolicies": PolicyKind.HSP,
}
RESOURCES = ("namespaces", "nodes", "pods", *POLICY_RESOURCES)


@dataclass(frozen=True, slots=True)
class Sync:
    """Every object of one resource, as a LIST (or a directory scan) returned them."""

    resource: str
    items: list[Obj]
    origins: list[tuple[str, int]] | None = None  # directory mode: (file, document index) per item


@dataclass(frozen=True, slots=True)
class Change:
    resource: str
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    obj: Obj


@dataclass(frozen=True, slots=True)
class InvalidPolicy:
    """A policy that failed validation: reported (Event + log), never applied."""

    kind: str
    namespace: str | None
    name: str
    uid: str
    resource_version: str
    errors: tuple[PolicyError, ...]

    @property
    def key(self) -> str:
        return policy_key(self.kind, self.namespace, self.name)


@dataclass
class Update:
    changes: list[tuple[str, str, ControlRecord | None]] = field(default_factory=list)  # (table, key, rec)
    invalid: list[InvalidPolicy] = field(default_factory=list)


@dataclass(slots=True)
class _Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    containers: dict[str, ContainerRecord]  # container id -> record


@dataclass(slots=True)
class _Policy:
    record: PolicyRecord
    policy: Policy


def _meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _str_map(v: object) -> dict[str, str]:
    return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}


def _owner(meta: Obj) -> Owner:
    """The workload owning a pod, with ReplicaSets folded into their Deployment.

    A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>; the hash is
    also a pod label, so the Deployment name is recovered without watching ReplicaSets.
    """
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    refs = [r for r in meta.get("ownerReferences") or () if isinstance(r, dict)]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is None:
        return Owner("Pod", name, ns)
    kind, owner = str(ref.get("kind", "")), str(ref.get("name", ""))
    h = _str_map(meta.get("labels")).get("pod-template-hash")
    if kind == "ReplicaSet" and h and owner.endswith(f"-{h}"):
        return Owner("Deployment", owner[: -len(h) - 1], ns)
    return Owner(kind, owner, ns)


def _split_container_id(raw: str) -> tuple[str, str]:
    runtime, sep, cid = raw.partition("://")
    return (runtime, cid) if sep else ("", raw)


def _pod(obj: Obj) -> _Pod:
    meta = _meta(obj)
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    labels = _str_map(meta.get("labels"))
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    node = str(spec.get("nodeName") or "")
    owner = _owner(meta)
    uid = str(meta.get("uid", ""))
    containers: dict[str, ContainerRecord] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            # A container has an id once the runtime created it; until then it cannot emit events.
            if not isinstance(cs, dict) or not cs.get("containerID"):
                continue
            runtime, cid = _split_container_id(str(cs["containerID"]))
            containers[cid] = ContainerRecord(
                container_id=cid, runtime=runtime, namespace=ns, pod=name, pod_uid=uid,
                container=str(cs.get("name", "")), image=str(cs.get("image", "")), node=node,
                labels=labels, owner=owner,
            )
    return _Pod(ns, name, labels, containers)


def _namespace(obj: Obj) -> NamespaceRecord:
    meta = _meta(obj)
    ann = _str_map(meta.get("annotations"))
    return NamespaceRecord(
        name=str(meta.get("name", "")), labels=_str_map(meta.get("labels")),
        file_posture=ann.get(FILE_POSTURE), network_posture=ann.get(NETWORK_POSTURE),
        capabilities_posture=ann.get(CAPABILITIES_POSTURE), visibility=ann.get(VISIBILITY),
    )


def _node(obj: Obj) -> NodeRecord:
    meta = _meta(obj)
    return NodeRecord(name=str(meta.get("name", "")), labels=_str_map(meta.get("labels")))


def policy_document(kind: PolicyKind, obj: Obj) -> Obj:
    """The policy as its author wrote it: apiVersion, kind, metadata name/namespace, spec.

    Server-side fields (uid, resourceVersion, managedFields, status) are left out, so a
    policy record changes only when the policy does.
    """
    meta = _meta(obj)
    md: Obj = {"name": meta.get("name")}
    if kind is PolicyKind.KSP and meta.get("namespace") is not None:
        md["namespace"] = meta.get("namespace")
    doc: Obj = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind", kind.value), "metadata": md}
    if "spec" in obj:
        doc["spec"] = obj["spec"]
    return doc


@dataclass
class ClusterState:
    """What the watched resources imply for the control topics.

    `resources` are the ones that must be listed before the first snapshot. In
    directory mode `local_node` names this machine: it gets a node record and every
    host policy binds to it.
    """

    resources: tuple[str, ...] = RESOURCES
    local_node: str | None = None
    _synced: set[str] = field(default_factory=set)
    _pods: dict[tuple[str, str], _Pod] = field(default_factory=dict)
    _pods_by_ns: dict[str, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))
    _policies: dict[str, _Policy] = field(default_factory=dict)
    _ksp_by_ns: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _reported: dict[str, str] = field(default_factory=dict)  # invalid policy key -> version reported
    _cur: dict[str, dict[str, ControlRecord]] = field(default_factory=lambda: {t: {} for t in TABLES})
    _pub: dict[str, dict[str, ControlRecord]] | None = None
    _dirty: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})

    def __post_init__(self) -> None:
        if self.local_node is not None:
            rec = NodeRecord(self.local_node, {"kubernetes.io/hostname": self.local_node})
            self._set("nodes", rec.name, rec)

    # ---- public ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every resource listed at least once: bindings are complete."""
        return self._synced.issuperset(self.resources)

    def apply(self, ev: Sync | Change) -> Update:
        up = Update()
        if isinstance(ev, Sync):
            self._sync(ev, up)
        else:
            self._change(ev, up)
        if self._pub is not None:
            up.changes = self._flush()
        return up

    def snapshot(self) -> dict[str, dict[str, ControlRecord]]:
        """The full state of every table; later `apply` calls report changes from here."""
        self._recompute_bindings(set(self._cur["containers"]), set(self._cur["nodes"]))
        self._pub = {t: dict(rows) for t, rows in self._cur.items()}
        for d in self._dirty.values():
            d.clear()
        return {t: dict(rows) for t, rows in self._pub.items()}

    def table(self, name: str) -> dict[str, ControlRecord]:
        return dict(self._cur[name])

    def sizes(self) -> dict[str, int]:
        """Records per table, as they stand (for metrics)."""
        return {name: len(rows) for name, rows in self._cur.items()}

    # ---- folding events in ---------------------------------------------------------------

    def _sync(self, ev: Sync, up: Update) -> None:
        self._apply_list(ev, up)
        # Synced only once its list is in: the list that completes the set then rebinds nothing
        # item by item, and the first snapshot binds everything once.
        self._synced.add(ev.resource)

    def _apply_list(self, ev: Sync, up: Update) -> None:
        origins: list[tuple[str, int] | None] = [*ev.origins] if ev.origins else [None] * len(ev.items)
        if ev.resource == "pods":
            new = {(p.namespace, p.name): p for p in map(_pod, ev.items)}
            affected: set[str] = set()
            for gone in set(self._pods) - set(new):
                affected |= self._put_pod(gone, None, rebind=False)
            for pod_key, pod in new.items():
                affected |= self._put_pod(pod_key, pod, rebind=False)
            self._recompute_bindings(affected, set())  # once for the list, not once per pod
        elif ev.resource == "namespaces":
            self._replace("namespaces", {r.name: r for r in map(_namespace, ev.items)})
        elif ev.resource == "nodes":
            self._replace("nodes", {r.name: r for r in map(_node, ev.items)})
        elif ev.resource in POLICY_RESOURCES:
            kind = POLICY_RESOURCES[ev.resource]
            seen: dict[str, str] = {}
            for obj, origin in zip(ev.items, origins, strict=True):
                key = self._put_policy(kind, obj, origin, up, seen)
                if key is not None:
                    seen[key] = origin[0] if origin else "kubernetes"
            for key in [k for k, p in self._policies.items() if p.policy.kind is kind and k not in seen]:
                self._drop_policy(key)
        else:
            raise ValueError(f"unknown resource {ev.resource!r}")

    def _change(self, ev: Change, up: Update) -> None:
        obj, deleted = ev.obj, ev.type == "DELETED"
        meta = _meta(obj)
        if ev.resource == "pods":
            pod_key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
            self._put_pod(pod_key, None if deleted else _pod(obj))
        elif ev.resource == "namespaces":
            rec = _namespace(obj)
            self._set("namespaces", rec.name, None if deleted else rec)
            # Selectors are evaluated against the namespace set as it is now.
            self._recompute_bindings(self._containers_in(rec.name), set())
        elif ev.resource == "nodes":
            node = _node(obj)
            self._set("nodes", node.name, None if deleted else node)
            self._recompute_bindings(set(), {node.name})
        elif ev.resource in POLICY_RESOURCES:
            kind = POLICY_RESOURCES[ev.resource]
            if deleted:
                ns = meta.get("namespace") if kind is PolicyKind.KSP else None
                key = policy_key(kind.value, ns, str(meta.get("name", "")))
                self._drop_policy(key)
                self._reported.pop(key, None)
            else:
                self._put_policy(kind, obj, None, up, {})
        else:
            raise ValueError(f"unknown resource {ev.resource!r}")

    def _set(self, table: str, key: str, rec: ControlRecord | None) -> None:
        rows = self._cur[table]
        if rec is None:
            if rows.pop(key, None) is not None:
                self._dirty[table].add(key)
        elif rows.get(key) != rec:
            rows[key] = rec
            self._dirty[table].add(key)

    def _replace(self, table: str, new: dict[str, ControlRecord]) -> None:
        for key in set(self._cur[table]) - set(new):
            self._set(table, key, None)
        for key, rec in new.items():
            self._set(table, key, rec)
        if table == "nodes":
            self._recompute_bindings(set(), set(self._cur["nodes"]) | self._dirty["nodes"])
        elif table == "namespaces":
            changed = self._dirty["namespaces"]
            self._recompute_bindings(set().union(*(self._containers_in(n) for n in changed)), set())

    def _containers_in(self, namespace: str) -> set[str]:
        return {cid for k in self._pods_by_ns.get(namespace, ()) for cid in self._pods[k].containers}

    def _put_pod(self, key: tuple[str, str], pod: _Pod | None, *, rebind: bool = True) -> set[str]:
        """Fold one pod in; returns the containers whose bindings it may change (rebound unless
        `rebind` is False: then the caller rebinds them together)."""
        old = self._pods.pop(key, None)
        if old is not None:
            self._pods_by_ns[key[0]].discard(key)
        if pod is not None:
            self._pods[key] = pod
            self._pods_by_ns[key[0]].add(key)
        old_ids = set(old.containers) if old else set()
        new_ids = set(pod.containers) if pod else set()
        for cid in old_ids - new_ids:
            self._set("containers", cid, None)
        for cid in new_ids:
            assert pod is not None
            self._set("containers", cid, pod.containers[cid])
        labels_changed = old is None or pod is None or old.labels != pod.labels
        affected = old_ids ^ new_ids if not labels_changed else old_ids | new_ids
        if rebind:
            self._recompute_bindings(affected, set())
        return affected

    def _put_policy(self, kind: PolicyKind, obj: Obj, origin: tuple[str, int] | None, up: Update,
                    seen: dict[str, str]) -> str | None:
        meta = _meta(obj)
        name = str(meta.get("name", ""))
        ns = str(meta.get("namespace") or "default") if kind is PolicyKind.KSP else None
        key = policy_key(kind.value, ns, name)
        version = str(meta.get("resourceVersion", ""))
        source = f"{origin[0]}" if origin else "kubernetes"
        errors: list[PolicyError] = []
        try:
            if origin is None:
                policy = parse_policy(policy_document(kind, obj), file=f"kubernetes:{key}")
            else:  # a YAML node: the parser reads line numbers off it
                policy = parse_policy(obj, file=origin[0], document=origin[1], lines=yaml_lines(obj))
        except PolicyErrors as e:
            errors = list(e.errors)
        if not errors and key in seen:
            errors = [PolicyError(source, "metadata.name", f"duplicate of the policy in {seen[key]}",
                                  None, origin[1] if origin else 0)]
        if errors:
            # Not applied: an invalid update withdraws the policy rather than keeping a stale one.
            if key not in seen:
                self._drop_policy(key)
            fingerprint = version or repr(obj)
            if self._reported.get(key) != fingerprint:
                self._reported[key] = fingerprint
                up.invalid.append(InvalidPolicy(kind.value, ns, name, str(meta.get("uid", "")),
                                                version, tuple(errors)))
            return None
        self._reported.pop(key, None)
        doc: Obj = dict(policy.raw)
        if ns is not None and doc.get("metadata", {}).get("namespace") != ns:
            doc["metadata"] = {**doc.get("metadata", {}), "namespace": ns}
        rec = PolicyRecord(kind=kind.value, namespace=ns, name=name, document=doc, source=source,
                           uid=str(meta.get("uid", "")), resource_version=version)
        old = self._policies.get(key)
        self._policies[key] = _Policy(rec, policy)
        if ns is not None:
            self._ksp_by_ns[ns].add(key)
        # Versions change on every write (even a status update); compare the document.
        if old is None or old.record.document != rec.document or old.record.source != rec.source:
            self._set("policies", key, rec)
            self._rebind_policy(policy)
        else:
            self._cur["policies"][key] = rec  # same policy: carry the new version, publish nothing
        return key

    def _drop_policy(self, key: str) -> None:
        old = self._policies.pop(key, None)
        if old is None:
            return
        if old.record.namespace is not None:
            self._ksp_by_ns[old.record.namespace].discard(key)
        self._set("policies", key, None)
        self._rebind_policy(old.policy)

    # ---- bindings --------------------------------------------------------------------------

    def _rebind_policy(self, policy: Policy) -> None:
        if policy.kind is PolicyKind.HSP:
            self._recompute_bindings(set(), set(self._cur["nodes"]))
        elif policy.kind is PolicyKind.KSP:
            self._recompute_bindings(self._containers_in(policy.namespace or "default"), set())
        else:
            self._recompute_bindings(set(self._cur["containers"]), set())

    def _recompute_bindings(self, containers: Iterable[str], nodes: Iterable[str]) -> None:
        if not self.ready:
            return  # the first snapshot computes them all
        # Keys come from our records, not from the parsed model, so they always match the policy topic.
        key_of = {id(p.policy): k for k, p in self._policies.items()}
        csps = [p.policy for p in self._policies.values() if p.policy.kind is PolicyKind.CSP]
        by_ns: dict[str, Matcher] = {}
        for cid in containers:
            c = self._cur["containers"].get(cid)
            if not isinstance(c, ContainerRecord):
                self._set("bindings", cid, None)
                continue
            m = by_ns.get(c.namespace)
            if m is None:
                ksps = [self._policies[k].policy for k in self._ksp_by_ns.get(c.namespace, ())]
                m = by_ns[c.namespace] = Matcher([*ksps, *csps])
            w = Workload.container(c.namespace, c.labels, c.container, c.pod)
            self._bind(cid, (key_of[id(p)] for p in m.policies_for(w)))
        hsps = Matcher([p.policy for p in self._policies.values() if p.policy.kind is PolicyKind.HSP])
        for name in nodes:
            key = node_binding_key(name)
            n = self._cur["nodes"].get(name)
            if not isinstance(n, NodeRecord):
                self._set("bindings", key, None)
            elif name == self.local_node:  # directory mode: host policies are for this machine
                self._bind(key, (key_of[id(p)] for p in hsps.policies))
            else:
                self._bind(key, (key_of[id(p)] for p in hsps.policies_for(Workload.node(name, n.labels))))

    def _bind(self, target: str, policy_keys: Iterable[str]) -> None:
        keys = tuple(sorted(policy_keys))
        self._set("bindings", target, BindingRecord(target, keys) if keys else None)

    def _flush(self) -> list[tuple[str, str, ControlRecord | None]]:
        assert self._pub is not None
        out: list[tuple[str, str, ControlRecord | None]] = []
        for table in TABLES:
            pub, cur = self._pub[table], self._cur[table]
            for key in sorted(self._dirty[table]):
                rec = cur.get(key)
                if rec == pub.get(key):
                    continue
                out.append((table, key, rec))
                if rec is None:
                    pub.pop(key, None)
                else:
                    pub[key] = rec
            self._dirty[table].clear()
        return out


def describe(errors: Iterable[PolicyError]) -> str:
    return "; ".join(f"{e.path or '<document>'}: {e.reason}" for e in errors)
