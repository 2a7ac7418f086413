"""Container identity -> pod metadata, and the wait for metadata that arrives late.

`MetadataState` is plain dict state rebuilt from the control topics (and their
snapshots) by every worker: Faust tables would need changelog recovery, which
tansu's wrong end offsets break, and a consumer-group agent would give each
worker only part of the metadata.

Lookups happen once per *unique* (node, cgroup id) of a batch, never per event.
Events of a container nobody has described yet wait in a `LateBuffer`, bounded
in time and in events; when the bound is hit they go out with what is known
and `MetadataMissing` set, never dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enforcer.control import (
    CgroupRecord,
    ControlError,
    ControlTopics,
    ControlView,
    decode,
    decode_key,
    encode,
    encode_key,
    parse_cgroup_key,
)
from stream.decode import EventColumns

__all__ = [
    "AckToken", "ContainerMeta", "LateBuffer", "MetadataState", "Pending", "split_by_cgroup",
]


@dataclass(frozen=True, slots=True)
class ContainerMeta:
    """What KubeArmor prints about the workload behind an event."""

    container_id: str = ""
    container_name: str = ""
    image: str = ""
    namespace: str = ""
    pod: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    owner_kind: str = ""
    owner_name: str = ""
    node: str = ""
    host: bool = False  # the node itself (host policies, HostLog)

    @property
    def labels_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels)


@dataclass
class MetadataState:
    """The control tables (enforcer.control.ControlView) plus the sensors' cgroup index
    (`ControlTopics.cgroups`: (node, cgroup id) -> enforcer.control.CgroupRecord)."""

    view: ControlView = field(default_factory=ControlView)
    cgroups: dict[tuple[str, int], str] = field(default_factory=dict)  # (node, cgroup id) -> container id
    version: int = 0  # bumped on every change: verdict caches key on it
    _meta: dict[str, ContainerMeta] = field(default_factory=dict)

    @classmethod
    def for_prefix(cls, prefix: str) -> MetadataState:
        return cls(view=ControlView(topics=ControlTopics(prefix)))

    @property
    def cgroups_topic(self) -> str:
        return self.view.topics.cgroups

    def topics(self) -> tuple[str, ...]:
        return (*self.view.topics.all(), self.cgroups_topic)

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Fold one control message in; raises ControlError for a malformed one."""
        self.version += 1
        self._meta.clear()
        if topic != self.cgroups_topic:
            self.view.apply(topic, key, value)
            return
        where = parse_cgroup_key(decode_key(key))
        rec = decode(value)
        if rec is None:
            self.cgroups.pop(where, None)
            return
        if not isinstance(rec, CgroupRecord) or (rec.node, rec.cgroup_id) != where:
            raise ControlError(f"{self.cgroups_topic}: key {where} does not hold that cgroup's record")
        self.cgroups[where] = rec.container_id

    def put_cgroup(self, node: str, cgroup_id: int, container_id: str) -> None:
        rec = CgroupRecord(node, cgroup_id, container_id)
        self.apply(self.cgroups_topic, encode_key(rec.key), encode(rec))

    def resolve(self, node: str, cgroup_id: int) -> ContainerMeta | None:
        cid = self.cgroups.get((node, cgroup_id))
        if cid is None:
            return None
        meta = self._meta.get(cid)
        if meta is None:
            c = self.view.containers.get(cid)
            if c is None:
                return None
            meta = self._meta[cid] = ContainerMeta(
                container_id=c.container_id, container_name=c.container, image=c.image,
                namespace=c.namespace, pod=c.pod, labels=tuple(sorted(c.labels.items())),
                owner_kind=c.owner.ref if c.owner else "", owner_name=c.owner.name if c.owner else "",
                node=c.node,
            )
        return meta

    def host(self, node: str) -> ContainerMeta:
        n = self.view.nodes.get(node)
        return ContainerMeta(node=node, host=True, labels=tuple(sorted(n.labels.items())) if n else ())


def split_by_cgroup(cols: EventColumns) -> list[tuple[int, np.ndarray]]:
    """(cgroup id, row indexes) per unique cgroup id of the batch, in first-seen order."""
    if len(cols) == 0:
        return []
    uniq, first, inverse = np.unique(cols.cgroup_id, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rows = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))
    starts = bounds - np.bincount(inverse, minlength=len(uniq))
    return [(int(uniq[u]), rows[starts[u] : bounds[u]]) for u in order.tolist()]


class AckToken:
    """One raw Kafka message in flight: acked once every part of it is out.

    Its store rows are collected here and written together when the last part leaves,
    so ClickHouse always receives a raw batch (node, batch_seq) whole: the store's
    deduplication skips batches it has seen, and a batch written in pieces would lose
    its late pieces.
    """

    __slots__ = ("event", "groups", "pending")

    def __init__(self, event: Any = None) -> None:
        self.event = event  # the Faust event to ack
        self.pending = 1  # the batch itself; released when its processing finishes
        self.groups: list[Any] = []  # stream.worker.Group, for the store

    def hold(self) -> None:
        self.pending += 1

    def release(self) -> bool:
        """True when this was the last part: write `groups`, then ack `event`."""
        self.pending -= 1
        return self.pending == 0


@dataclass
class Pending:
    node: str
    cgroup_id: int
    cols: EventColumns
    since: float
    token: AckToken | None


@dataclass
class LateBuffer:
    """Events of unknown containers, waiting for metadata; bounded by age and by event count."""

    max_wait_s: float = 5.0
    max_events: int = 200_000
    items: list[Pending] = field(default_factory=list)
    events: int = 0
    overflowed: int = 0  # events released early because the buffer was full

    def add(self, node: str, cgroup_id: int, cols: EventColumns, token: AckToken | None,
            now: float | None = None) -> None:
        if token is not None:
            token.hold()
        self.items.append(Pending(node, cgroup_id, cols, time.monotonic() if now is None else now, token))
        self.events += len(cols)

    def take(self, state: MetadataState, now: float | None = None) -> tuple[list[Pending], list[Pending]]:
        """(resolved, expired): entries whose metadata is now known, and those out of time or room."""
        now = time.monotonic() if now is None else now
        resolved, expired, keep = [], [], []
        for p in self.items:
            if state.resolve(p.node, p.cgroup_id) is not None:
                resolved.append(p)
            elif now - p.since >= self.max_wait_s:
                expired.append(p)
            else:
                keep.append(p)
        # Over the memory bound: the oldest go out first, flagged like expired ones.
        total = sum(len(p.cols) for p in keep)
        while keep and total > self.max_events:
            p = keep.pop(0)
            total -= len(p.cols)
            self.overflowed += len(p.cols)
            expired.append(p)
        self.items = keep
        self.events = total
        return resolved, expired

    def drain(self) -> list[Pending]:
        """Everything, at shutdown: it goes out flagged rather than being lost."""
        out, self.items, self.events = self.items, [], 0
        return out
