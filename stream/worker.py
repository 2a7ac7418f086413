"""What a stream worker does with one raw Kafka message, without any I/O.

bytes in -> decoded columns -> container identity per unique cgroup id -> a
verdict per unique (workload, event) -> Alert/Log records, plus the groups for
the ClickHouse sink and dead letters for what could not be decoded. The Faust
agents (stream/agents.py) feed this and deliver what it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enforcer.control import (
    CAPABILITIES_POSTURE,
    FILE_POSTURE,
    NETWORK_POSTURE,
    ControlView,
    NamespaceRecord,
)
from enforcer.envelope import decode_batch
from enforcer.errors import ArmorstreamError
from enforcer.karmor_log import Event
from enforcer.matcher import Matcher
from enforcer.policy.model import Operation
from enforcer.policy.parse import parse_policy
from enforcer.records import Flag, Kind
from enforcer.verdict import DENIED, Verdict
from enforcer.workload import DefaultPosture, Workload
from stream.alerts import Decision, SiemBatch, SiemEncoder
from stream.decode import EventColumns, ProcessTable, decode_records, result_strings
from stream.join import AckToken, ContainerMeta, LateBuffer, MetadataState, Pending, split_by_cgroup
from stream.store.schema import EVENT_COLUMNS
from stream.store.sink import conform

__all__ = ["BatchProcessor", "DeadLetter", "Group", "Output", "Verdicts", "groups_table"]

log = logging.getLogger(__name__)

_NO_OWNER = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    reason: str
    origin: str  # "topic/partition/offset" of the raw message


@dataclass(slots=True)
class Group:
    """The events of one container from one raw batch, with their verdicts (sink input)."""

    cols: EventColumns
    meta: ContainerMeta | None
    decisions: list[Decision]
    missing: bool = False


@dataclass
class Output:
    siem: SiemBatch = field(default_factory=SiemBatch)
    groups: list[Group] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    released: list[AckToken] = field(default_factory=list)  # release after delivery (then store, ack)

    def extend(self, other: Output) -> None:
        self.siem.extend(other.siem)
        self.groups.extend(other.groups)
        self.dead.extend(other.dead)
        self.released.extend(other.released)

    @property
    def events(self) -> int:
        return sum(len(g.cols) for g in self.groups)


@dataclass
class Verdicts:
    """The reference matcher (which caches per workload and event) plus Verdict -> Decision."""

    matcher: Matcher | None = None
    policy_errors: int = 0
    _conv: dict[Verdict, Decision] = field(default_factory=dict)

    def set_matcher(self, matcher: Matcher | None) -> None:
        self.matcher = matcher
        self._conv.clear()

    def rebuild(self, view: ControlView, default_posture: DefaultPosture | None = None) -> None:
        """A new matcher from the control tables' policies and namespace postures."""
        policies = []
        for rec in view.policies.values():
            try:
                policies.append(parse_policy(rec.document, file=rec.source or rec.key))
            except ArmorstreamError as e:  # the controller validates; a bad one here is skipped, loudly
                self.policy_errors += 1
                log.warning("policy %s skipped: %s", rec.key, e)
        annotations = {name: _posture_annotations(ns) for name, ns in view.namespaces.items()}
        self.set_matcher(Matcher(policies, default_posture, annotations))

    def decide(self, workload: Workload, events: Sequence[Event]) -> list[Decision]:
        if self.matcher is None:
            return [Decision(type="HostLog" if workload.host else "ContainerLog")] * len(events)
        conv = self._conv
        out = []
        for v in self.matcher.decide_many(workload, events):
            d = conv.get(v)
            if d is None:
                d = conv[v] = Decision(
                    type=str(v.type), action=str(v.action), result=v.result if v.blocked else None,
                    policy_name=v.policy_name, severity="" if v.severity is None else str(v.severity),
                    tags=",".join(v.tags), atags=v.tags, message=v.message,
                )
            out.append(d)
        return out


def _posture_annotations(ns: NamespaceRecord) -> dict[str, str]:
    pairs = ((FILE_POSTURE, ns.file_posture), (NETWORK_POSTURE, ns.network_posture),
             (CAPABILITIES_POSTURE, ns.capabilities_posture))
    return {k: v for k, v in pairs if v}


def kernel_decided(d: Decision, host: bool) -> Decision:
    """The fast path already blocked it: keep Block / Permission denied, whatever the matcher says."""
    typ = d.type if d.type in ("MatchedPolicy", "MatchedHostPolicy") else (
        "MatchedHostPolicy" if host else "MatchedPolicy")
    return Decision(
        type=typ, action="Block", result=DENIED, policy_name=d.policy_name or "DefaultPosture",
        severity=d.severity, tags=d.tags, atags=d.atags, message=d.message, enforcer="armorstream",
    )


def _events(cols: EventColumns) -> tuple[list[Event], list[int]]:
    """The matcher's view of the batch: unique events, and each row's index into them.

    Rows repeat heavily (same binary, same file), so an Event is built once per distinct
    row, which also spares the matcher's cache an equality check per row.
    """
    assert cols.operation is not None
    op = Operation(cols.operation)
    n = len(cols)
    uid = cols.uid.tolist()
    owner = cols.owner_uid.tolist() if cols.owner_uid is not None else [_NO_OWNER] * n
    write = cols.write.tolist() if cols.write is not None else [False] * n
    resource = cols.process_name if op is Operation.PROCESS else cols.resource
    keys = list(zip(resource, cols.process_name, cols.parent_process_name, cols.source, uid, owner, write,
                    strict=True))
    index: dict[tuple[Any, ...], int] = {}
    rows = [index.setdefault(k, len(index)) for k in keys]
    events = [
        Event(op, r, proc, parent, src.split(" ", 1)[0], u, None if o == _NO_OWNER else o, w)
        for (r, proc, parent, src, u, o, w) in index
    ]
    return events, rows


@dataclass
class BatchProcessor:
    state: MetadataState = field(default_factory=MetadataState)
    encoder: SiemEncoder = field(default_factory=SiemEncoder)
    verdicts: Verdicts = field(default_factory=Verdicts)
    late: LateBuffer = field(default_factory=LateBuffer)
    procs: dict[str, ProcessTable] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    # counters (exported as metrics by the agents)
    batches: int = 0
    events_in: int = 0
    lost_in_kernel: int = 0
    dead_letters: int = 0
    missing_metadata: int = 0

    def process(self, value: bytes, *, key: bytes | None = None, origin: str = "",
                token: AckToken | None = None) -> Output:
        out = Output()
        try:
            hdr, arr = decode_batch(value)
        except ArmorstreamError as e:
            self.dead_letters += 1
            out.dead.append(DeadLetter(key, value, str(e), origin))
            return out
        self.batches += 1
        self.events_in += hdr.count
        if hdr.kind == Kind.LOST:
            self.lost_in_kernel += int(arr["hdr"]["ret"].sum())
        procs = self.procs.setdefault(hdr.node, ProcessTable())
        cols = decode_records(arr, kind=hdr.kind, node=hdr.node, seq=hdr.seq,
                              boot_wall_ns=hdr.boot_wall_ns, procs=procs)
        if cols.operation is None:
            return out
        host = (cols.flags & Flag.HOST) != 0
        now = self.clock()
        for cg, rows in split_by_cgroup(cols):
            part = cols.take(rows)
            if bool(host[rows[0]]):
                self._emit(part, self.state.host(hdr.node), False, out, token)
                continue
            meta = self.state.resolve(hdr.node, cg)
            if meta is None:
                self.late.add(hdr.node, cg, part, token, now)
            else:
                self._emit(part, meta, False, out, token)
        return out

    def flush_late(self, *, all_: bool = False) -> Output:
        """Groups whose metadata arrived, and those out of time or room (flagged)."""
        out = Output()
        if all_:
            resolved: list[Pending] = []
            expired = self.late.drain()
        else:
            resolved, expired = self.late.take(self.state, self.clock())
        for p in resolved:
            self._emit(p.cols, self.state.resolve(p.node, p.cgroup_id), False, out, p.token)
        for p in expired:
            self.missing_metadata += len(p.cols)
            self._emit(p.cols, None, True, out, p.token)
        out.released.extend(p.token for p in (*resolved, *expired) if p.token is not None)
        return out

    def _emit(self, cols: EventColumns, meta: ContainerMeta | None, missing: bool, out: Output,
              token: AckToken | None) -> None:
        wl = _workload(meta, cols.node)
        events, rows = _events(cols)
        uniq = self.verdicts.decide(wl, events)
        decisions = [uniq[r] for r in rows]
        blocked = (cols.flags & Flag.BLOCKED) != 0
        if blocked.any():
            for i in np.flatnonzero(blocked).tolist():
                decisions[i] = kernel_decided(decisions[i], wl.host)
        # With a token, the rows wait for the rest of their raw batch (see AckToken).
        (token.groups if token is not None else out.groups).append(Group(cols, meta, decisions, missing))
        out.siem.extend(self.encoder.encode(cols, meta, decisions, missing=missing))

    def counters(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "events_in": self.events_in, "dead_letters": self.dead_letters,
            "lost_in_kernel": self.lost_in_kernel, "missing_metadata": self.missing_metadata,
            "late_waiting": self.late.events, "alerts_throttled": self.encoder.throttle.dropped,
        }


def _workload(meta: ContainerMeta | None, node: str) -> Workload:
    if meta is None:  # unknown container: only policies that select nothing in particular can match
        return Workload()
    if meta.host:
        return Workload.node(node, dict(meta.labels))
    return Workload(meta.namespace, meta.labels, meta.container_name, meta.pod)


def groups_table(groups: Sequence[Group], cluster: str) -> pa.Table:
    """Processed groups as one Arrow table in the store's column names (KubeArmor's, plus ids).

    Column-wise: numbers are concatenated numpy arrays, per-group and per-decision values
    are built once and spread with Arrow `take`, so the only per-row Python work is the
    strings the records already hold.
    """
    gs = [g for g in groups if len(g.cols) and g.cols.operation is not None]
    types = {c.name: c.arrow_type for c in EVENT_COLUMNS}
    if not gs:
        return conform(pa.table({c.name: pa.array([], c.arrow_type) for c in EVENT_COLUMNS}))
    sizes = [len(g.cols) for g in gs]
    gidx = pa.array(np.repeat(np.arange(len(gs)), sizes))
    out: dict[str, Any] = {}

    def per_group(name: str, values: list[Any]) -> None:
        out[name] = pa.array(values, types[name]).take(gidx)

    metas = [g.meta if g.meta is not None and not g.meta.host else ContainerMeta() for g in gs]
    per_group("ClusterName", [cluster] * len(gs))
    per_group("HostName", [g.cols.node for g in gs])
    per_group("NamespaceName", [m.namespace for m in metas])
    per_group("OwnerRef", [m.owner_kind for m in metas])
    per_group("OwnerName", [m.owner_name for m in metas])
    per_group("OwnerNamespace", [m.namespace if m.owner_kind else "" for m in metas])
    per_group("PodName", [m.pod for m in metas])
    per_group("Labels", [m.labels_text for m in metas])
    per_group("ContainerID", [m.container_id for m in metas])
    per_group("ContainerName", [m.container_name for m in metas])
    per_group("ContainerImage", [m.image for m in metas])
    per_group("Operation", [g.cols.operation for g in gs])
    per_group("node", [g.cols.node for g in gs])
    per_group("batch_seq", [g.cols.seq for g in gs])
    per_group("metadata_late", [g.missing for g in gs])
    per_group("UpdatedTime", [time.time_ns()] * len(gs))

    def numbers(name: str, attr: str, dtype: str) -> None:
        out[name] = pa.array(np.concatenate([getattr(g.cols, attr) for g in gs]).astype(dtype), types[name])

    ts = np.concatenate([g.cols.ts_ns for g in gs])
    out["Timestamp"] = pa.array(ts, pa.int64()).cast(types["Timestamp"])
    for name, attr in (("HostPPID", "host_ppid"), ("HostPID", "host_pid"), ("PPID", "ppid"), ("PID", "pid"),
                       ("UID", "uid")):
        numbers(name, attr, "int32")
    numbers("event_index", "index", "uint32")
    for name, attr in (("ParentProcessName", "parent_process_name"), ("ProcessName", "process_name"),
                       ("Source", "source"), ("Resource", "resource"), ("Data", "data")):
        out[name] = pa.array([v for g in gs for v in getattr(g.cols, attr)], pa.string())
    out["Cwd"] = pa.array([v for g in gs for v in (g.cols.cwd or [""] * len(g.cols))], pa.string())

    # Decisions: a handful of distinct values, spread over the rows by index.
    uniq: dict[Decision, int] = {}
    didx = pa.array([uniq.setdefault(d, len(uniq)) for g in gs for d in g.decisions], pa.int32())
    ds = list(uniq)
    for name, attr in (("PolicyName", "policy_name"), ("Severity", "severity"), ("Tags", "tags"),
                       ("Message", "message"), ("Type", "type"), ("Enforcer", "enforcer"),
                       ("Action", "action")):
        out[name] = pa.array([getattr(d, attr) for d in ds], types[name]).take(didx)
    out["ATags"] = pa.array([list(d.atags) for d in ds], types["ATags"]).take(didx)
    from_ret = pa.array(result_strings(np.concatenate([g.cols.ret for g in gs])), pa.string())
    decided = pa.array([d.result for d in ds], pa.string()).take(didx)
    out["Result"] = pc.coalesce(decided, from_ret)
    return conform(pa.table(out))
