"""What a stream worker does with one raw Kafka message, without any I/O.

bytes in -> decoded columns -> container identity per unique cgroup id -> a
verdict per unique (workload, event) -> Alert/Log records, plus the groups for
the ClickHouse sink and dead letters for what could not be decoded. The Faust
agents (stream/agents.py) feed this and deliver what it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enforcer.backends import Backend
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
from stream.alerts import Decision, SiemBatch, SiemEncoder, merge_decisions
from stream.decode import EventColumns, ProcessTable, decode_records, result_strings
from stream.join import AckToken, ContainerMeta, LateBuffer, MetadataState, Pending, split_by_cgroup
from stream.store.schema import EVENT_COLUMNS
from stream.store.sink import conform

__all__ = ["BatchProcessor", "DeadLetter", "Group", "Output", "RawMessage", "Verdicts", "groups_table"]

log = logging.getLogger(__name__)

_NO_OWNER = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    reason: str
    origin: str  # "topic/partition/offset" of the raw message


@dataclass(frozen=True, slots=True)
class RawMessage:
    value: bytes
    key: bytes | None = None
    origin: str = ""  # "topic/partition/offset", for dead letters
    token: AckToken | None = None  # acked once every part of the message is out


@dataclass(slots=True)
class Group:
    """The events of one container from one raw batch, with their verdicts (SIEM and sink input).

    `codes[i]` is row i's decision as an index into `table`, the verdict cache's append-only
    list of distinct decisions: rows carry an int32, never a Python object each.
    """

    cols: EventColumns
    meta: ContainerMeta | None
    codes: np.ndarray
    table: list[Decision]
    missing: bool = False

    @property
    def decisions(self) -> list[Decision]:
        return [self.table[c] for c in self.codes.tolist()]


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


RowKey = tuple[str, str, str, str, int, int, bool]  # what the matcher reads of an event, op aside


@dataclass
class Verdicts:
    """The reference matcher behind a verdict cache, and Verdict -> Decision.

    A row's decision depends on its workload, operation and `RowKey` (resource, process,
    parent, source, uid, owner, write). The cache maps those to a code into `table`, so a
    batch costs one C-level dict lookup per row (`map(dict.get, keys)`) and an `Event` plus a
    matcher call only per distinct row never seen before. A new matcher starts a new table
    and cache; groups still in flight keep the table they were coded against.
    """

    matcher: Matcher | None = None
    policy_errors: int = 0
    max_cached: int = 200_000  # row keys over all workloads (~40 MiB); beyond it the cache starts over
    table: list[Decision] = field(default_factory=list)
    misses: int = 0
    _index: dict[Decision, int] = field(default_factory=dict)
    _cache: dict[tuple[ContainerMeta | None, str], dict[RowKey, int]] = field(default_factory=dict)
    _blocked: dict[tuple[int, int, bool], int] = field(default_factory=dict)
    _cached: int = 0

    def set_matcher(self, matcher: Matcher | None) -> None:
        self.matcher = matcher
        self.table = []
        self._index, self._cache, self._blocked, self._cached = {}, {}, {}, 0

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

    def code(self, d: Decision) -> int:
        c = self._index.get(d)
        if c is None:
            c = self._index[d] = len(self.table)
            self.table.append(d)
        return c

    def decide(self, meta: ContainerMeta | None, cols: EventColumns) -> np.ndarray:
        """A decision code (into `table`) for every row of one container's events."""
        n = len(cols)
        host = meta is not None and meta.host
        codes = (np.full(n, self.code(Decision(type="HostLog" if host else "ContainerLog")), np.int32)
                 if self.matcher is None else self._matched(meta, cols))
        blocked = (cols.flags & Flag.BLOCKED) != 0
        if blocked.any():
            codes[blocked] = self._kernel_decided(codes[blocked], cols.flags[blocked], host)
        return codes

    def _matched(self, meta: ContainerMeta | None, cols: EventColumns) -> np.ndarray:
        assert self.matcher is not None and cols.operation is not None
        n = len(cols)
        if self._cached > self.max_cached:
            self._cache.clear()
            self._cached = 0
        cache = self._cache.setdefault((meta, cols.operation), {})
        keys = _row_keys(cols)
        codes = np.fromiter(map(cache.get, keys, repeat(-1, n)), np.int32, n)
        miss = np.flatnonzero(codes < 0)
        if miss.size:
            todo = dict.fromkeys(keys[i] for i in miss.tolist())
            op = Operation(cols.operation)
            events = [Event(op, r, proc, parent, src.split(" ", 1)[0], uid, None if o == _NO_OWNER else o, w)
                      for (r, proc, parent, src, uid, o, w) in todo]
            verdicts = self.matcher.decide_many(_workload(meta, cols.node), events)
            for k, v in zip(todo, verdicts, strict=True):
                cache[k] = self.code(_decision(v))
            self.misses += len(todo)
            self._cached += len(todo)
            codes[miss] = [cache[keys[i]] for i in miss.tolist()]
        return codes

    def _kernel_decided(self, codes: np.ndarray, flags: np.ndarray, host: bool) -> np.ndarray:
        # One (decision, backend) pair per distinct combination, not per row.
        backend = (flags & _ENF_MASK).astype(np.int64)
        pairs, inv = np.unique(np.stack([codes.astype(np.int64), backend]), axis=1, return_inverse=True)
        mapped = []
        for c, b in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
            k = self._blocked.get((c, b, host))
            if k is None:
                enforcer = _ENFORCER_OF.get(b, "armorstream")
                k = self._blocked[(c, b, host)] = self.code(kernel_decided(self.table[c], host, enforcer))
            mapped.append(k)
        return np.asarray(mapped, np.int32)[inv.reshape(-1)]


def _decision(v: Verdict) -> Decision:
    return Decision(
        type=str(v.type), action=str(v.action), result=v.result if v.blocked else None,
        policy_name=v.policy_name, severity="" if v.severity is None else str(v.severity),
        tags=",".join(v.tags), atags=v.tags, message=v.message,
    )


def _row_keys(cols: EventColumns) -> list[RowKey]:
    """Per row, what the matcher reads (built by zip in C; Process events match on the binary)."""
    n = len(cols)
    owner = cols.owner_uid.tolist() if cols.owner_uid is not None else repeat(_NO_OWNER, n)
    write = cols.write.tolist() if cols.write is not None else repeat(False, n)
    resource = cols.process_name if cols.operation == "Process" else cols.resource
    return list(zip(resource, cols.process_name, cols.parent_process_name, cols.source, cols.uid.tolist(),
                    owner, write, strict=False))


def _posture_annotations(ns: NamespaceRecord) -> dict[str, str]:
    pairs = ((FILE_POSTURE, ns.file_posture), (NETWORK_POSTURE, ns.network_posture),
             (CAPABILITIES_POSTURE, ns.capabilities_posture))
    return {k: v for k, v in pairs if v}


# The backend bit a decided record carries -> the alert's Enforcer (enforcer/backends.py names).
_ENFORCER_OF: dict[int, str] = {
    int(Flag.ENF_BPFLSM): Backend.BPFLSM.value,
    int(Flag.ENF_FANOTIFY): Backend.FANOTIFY.value,
    int(Flag.ENF_CGROUP): Backend.CGROUP.value,
}
_ENF_MASK = int(Flag.ENF_BPFLSM | Flag.ENF_FANOTIFY | Flag.ENF_CGROUP)


def kernel_decided(d: Decision, host: bool, enforcer: str = "armorstream") -> Decision:
    """The fast path already blocked it: keep Block / Permission denied, whatever the matcher says."""
    typ = d.type if d.type in ("MatchedPolicy", "MatchedHostPolicy") else (
        "MatchedHostPolicy" if host else "MatchedPolicy")
    return Decision(
        type=typ, action="Block", result=DENIED, policy_name=d.policy_name or "DefaultPosture",
        severity=d.severity, tags=d.tags, atags=d.atags, message=d.message, enforcer=enforcer,
    )


@dataclass
class BatchProcessor:
    state: MetadataState = field(default_factory=MetadataState)
    encoder: SiemEncoder = field(default_factory=SiemEncoder)
    verdicts: Verdicts = field(default_factory=Verdicts)
    late: LateBuffer = field(default_factory=LateBuffer)
    procs: dict[str, ProcessTable] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    encode_rows: int = 16_384
    # counters (exported as metrics by the agents)
    batches: int = 0
    events_in: int = 0
    lost_in_kernel: int = 0
    dead_letters: int = 0
    missing_metadata: int = 0
    redelivered: int = 0  # events of re-delivered raw batches the store already had (not re-sent)

    def process(self, value: bytes, *, key: bytes | None = None, origin: str = "",
                token: AckToken | None = None) -> Output:
        """One raw Kafka message."""
        return self.process_many([RawMessage(value, key, origin, token)])

    def process_many(self, messages: Sequence[RawMessage],
                     stored: Collection[tuple[str, int]] = ()) -> Output:
        """A step's raw messages. Their Alerts and Logs are encoded together, in chunks of about
        `encode_rows` rows: fewer, longer column operations, without a whole step's
        intermediate Arrow buffers at once.

        Raw batches named in `stored` (node, seq) are already in the store, so they were sent
        before (the store is written after the SIEM topics): a re-delivery after a crash. They
        still feed the process table, and emit nothing."""
        out = Output()
        emitted: list[Group] = []
        rows = 0
        for m in messages:
            before = len(emitted)
            self._process(m, out, emitted, stored)
            rows += sum(len(g.cols) for g in emitted[before:])
            if rows >= self.encode_rows:
                out.siem.extend(self.encoder.encode(emitted))
                emitted, rows = [], 0
        out.siem.extend(self.encoder.encode(emitted))
        return out

    def _process(self, m: RawMessage, out: Output, emitted: list[Group],
                 stored: Collection[tuple[str, int]] = ()) -> None:
        value, token = m.value, m.token
        try:
            hdr, arr = decode_batch(value)
        except ArmorstreamError as e:
            self.dead_letters += 1
            out.dead.append(DeadLetter(m.key, value, str(e), m.origin))
            return
        self.batches += 1
        self.events_in += hdr.count
        if hdr.kind == Kind.LOST:
            self.lost_in_kernel += int(arr["hdr"]["ret"].sum())
        procs = self.procs.setdefault(hdr.node, ProcessTable())
        cols = decode_records(arr, kind=hdr.kind, node=hdr.node, seq=hdr.seq,
                              boot_wall_ns=hdr.boot_wall_ns, procs=procs)
        if cols.operation is None:
            return
        if stored and (hdr.node, hdr.seq) in stored:
            self.redelivered += hdr.count
            return
        host = (cols.flags & Flag.HOST) != 0
        now = self.clock()
        parts = split_by_cgroup(cols)
        for cg, rows in parts:
            # The sensor ships one container per envelope: then the batch is the group, uncopied.
            part = cols if len(parts) == 1 else cols.take(rows)
            if bool(host[rows[0]]):
                emitted.append(self._emit(part, self.state.host(hdr.node), False, out, token))
                continue
            meta = self.state.resolve(hdr.node, cg)
            if meta is None:
                self.late.add(hdr.node, cg, part, token, now)
            else:
                emitted.append(self._emit(part, meta, False, out, token))

    def flush_late(self, *, all_: bool = False) -> Output:
        """Groups whose metadata arrived, and those out of time or room (flagged)."""
        out = Output()
        if all_:
            resolved: list[Pending] = []
            expired = self.late.drain()
        else:
            resolved, expired = self.late.take(self.state, self.clock())
        emitted = [self._emit(p.cols, self.state.resolve(p.node, p.cgroup_id), False, out, p.token)
                   for p in resolved]
        for p in expired:
            self.missing_metadata += len(p.cols)
            emitted.append(self._emit(p.cols, None, True, out, p.token))
        out.siem.extend(self.encoder.encode(emitted))
        out.released.extend(p.token for p in (*resolved, *expired) if p.token is not None)
        return out

    def _emit(self, cols: EventColumns, meta: ContainerMeta | None, missing: bool, out: Output,
              token: AckToken | None) -> Group:
        g = Group(cols, meta, self.verdicts.decide(meta, cols), self.verdicts.table, missing)
        # With a token, the rows wait for the rest of their raw batch (see AckToken).
        (token.groups if token is not None else out.groups).append(g)
        return g

    def counters(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "events_in": self.events_in, "dead_letters": self.dead_letters,
            "lost_in_kernel": self.lost_in_kernel, "missing_metadata": self.missing_metadata,
            "late_waiting": self.late.events, "alerts_throttled": self.encoder.throttle.dropped,
            "verdict_misses": self.verdicts.misses, "redelivered_skipped": self.redelivered,
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
                       ("Source", "source"), ("Resource", "resource"), ("Data", "data"), ("Cwd", "cwd")):
        done = [g.cols.arrow.get(attr) for g in gs]  # the SIEM encoder's arrays, when it made them
        if all(a is not None for a in done):
            out[name] = pa.concat_arrays(done)
        elif attr == "cwd" and not any(g.cols.cwd for g in gs):
            out[name] = pa.repeat(pa.scalar("", pa.string()), sum(sizes))
        elif attr == "cwd":
            out[name] = pa.array(list(chain.from_iterable(g.cols.cwd or repeat("", len(g.cols)) for g in gs)),
                                 pa.string())
        else:
            out[name] = pa.array(list(chain.from_iterable(getattr(g.cols, attr) for g in gs)), pa.string())

    # Decisions: a handful of distinct values, spread over the rows by their codes.
    ds, didx = merge_decisions(gs)
    for name, attr in (("PolicyName", "policy_name"), ("Severity", "severity"), ("Tags", "tags"),
                       ("Message", "message"), ("Type", "type"), ("Enforcer", "enforcer"),
                       ("Action", "action")):
        out[name] = pa.array([getattr(d, attr) for d in ds], types[name]).take(didx)
    out["ATags"] = pa.array([list(d.atags) for d in ds], types["ATags"]).take(didx)
    from_ret = pa.array(result_strings(np.concatenate([g.cols.ret for g in gs])), pa.string())
    decided = pa.array([d.result for d in ds], pa.string()).take(didx)
    out["Result"] = pc.coalesce(decided, from_ret)
    return conform(pa.table(out))
