"""KubeArmor Alert and Log records (JSON, KubeArmor's field names) and alert throttling.

One Kafka record per Alert and per Log, keyed by "namespace/pod" (the node name
for host events). The workload part of a record is the same for every event of
a container, so it is serialised once per (container, batch) and each event
adds only its own fields.

Throttling follows KubeArmor's (maxAlertPerSec, throttleSec): when a container
raises more than `max_per_sec` alerts within one second, one summary alert
goes out and that container's alerts are dropped (and counted) for
`throttle_s` seconds. Logs are never throttled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import orjson

from stream.decode import EventColumns, result_strings
from stream.join import ContainerMeta

__all__ = ["ALERT_TYPES", "AlertThrottle", "Decision", "SiemBatch", "SiemEncoder"]

ALERT_TYPES = frozenset({"MatchedPolicy", "MatchedHostPolicy", "SystemEvent"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy side of one event (from the matcher, or kept from the kernel's verdict)."""

    type: str  # MatchedPolicy, MatchedHostPolicy, ContainerLog, HostLog
    action: str = "Allow"
    result: str | None = None  # None: from the record's return value
    policy_name: str = ""
    severity: str = ""
    tags: str = ""
    atags: tuple[str, ...] = ()
    message: str = ""
    enforcer: str = ""


@dataclass
class AlertThrottle:
    """Per-container alert budget, as KubeArmor's alertThrottling/maxAlertPerSec/throttleSec."""

    enabled: bool = True
    max_per_sec: int = 10
    throttle_s: int = 30
    _second: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (second, count)
    _until: dict[str, int] = field(default_factory=dict)  # key -> throttled until (s)
    dropped: int = 0

    def admit(self, key: str, sec: int) -> tuple[bool, bool]:
        """(send this alert, send the summary alert first)."""
        if not self.enabled:
            return True, False
        until = self._until.get(key)
        if until is not None:
            if sec < until:
                self.dropped += 1
                return False, False
            del self._until[key]
        cur, n = self._second.get(key, (sec, 0))
        n = n + 1 if cur == sec else 1
        self._second[key] = (sec, n)
        if n > self.max_per_sec:
            self._until[key] = sec + self.throttle_s
            self.dropped += 1
            return False, True
        return True, False


@dataclass
class SiemBatch:
    """Encoded output of one or more groups: (key, value) pairs per topic."""

    alerts: list[tuple[bytes, bytes]] = field(default_factory=list)
    logs: list[tuple[bytes, bytes]] = field(default_factory=list)

    def extend(self, other: SiemBatch) -> None:
        self.alerts.extend(other.alerts)
        self.logs.extend(other.logs)


def _iso(ns: int) -> str:
    # Integer arithmetic: a float of ns since 1970 cannot hold microseconds exactly.
    t = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=(ns // 1000) % 10**6)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_times(ts_ns: np.ndarray) -> list[str]:
    """UpdatedTime for a whole column at once (numpy formats in C)."""
    # View the integers as nanoseconds first: a plain astype to [us] would read them as microseconds.
    stamps = ts_ns.astype(np.int64).view("datetime64[ns]")
    return [t + "Z" for t in np.datetime_as_string(stamps, unit="us").tolist()]


@dataclass
class SiemEncoder:
    cluster: str = "default"
    throttle: AlertThrottle = field(default_factory=AlertThrottle)

    def workload_fields(self, node: str, meta: ContainerMeta | None, missing: bool) -> dict[str, object]:
        out: dict[str, object] = {"ClusterName": self.cluster, "HostName": node}
        if meta is not None and not meta.host:
            out.update(
                NamespaceName=meta.namespace, PodName=meta.pod, Labels=meta.labels_text,
                ContainerID=meta.container_id, ContainerName=meta.container_name,
                ContainerImage=meta.image,
            )
            if meta.owner_kind:
                out["Owner"] = {"Ref": meta.owner_kind, "Name": meta.owner_name, "Namespace": meta.namespace}
        if missing:
            out["MetadataMissing"] = True  # armorstream's flag: the container was never described
        return {k: v for k, v in out.items() if v != ""}

    def encode(self, cols: EventColumns, meta: ContainerMeta | None, decisions: Sequence[Decision],
               *, missing: bool = False) -> SiemBatch:
        """Alerts and Logs for the rows of `cols` (one container), one decision per row."""
        out = SiemBatch()
        n = len(cols)
        if n == 0 or cols.operation is None:
            return out
        if meta is not None and not meta.host:
            key = f"{meta.namespace}/{meta.pod}".encode()
            tkey = meta.container_id
        else:
            key = cols.node.encode()
            tkey = f"{cols.node}/{int(cols.cgroup_id[0])}"
        wl = self.workload_fields(cols.node, meta, missing)
        prefix = orjson.dumps(wl)[:-1] + b","  # '{...,' : the event's own fields follow
        ts = cols.ts_ns.tolist()
        iso = iso_times(cols.ts_ns)
        secs = (cols.ts_ns // 1_000_000_000).tolist()
        results = result_strings(cols.ret)
        hppid, hpid = cols.host_ppid.tolist(), cols.host_pid.tolist()
        ppid, pid, uid = cols.ppid.tolist(), cols.pid.tolist(), cols.uid.tolist()
        cwd = cols.cwd or [""] * n
        op = cols.operation
        dumps = orjson.dumps
        alerts, logs = out.alerts, out.logs
        for i in range(n):
            d = decisions[i]
            rec: dict[str, object] = {
                "Timestamp": secs[i], "UpdatedTime": iso[i],
                "HostPPID": hppid[i], "HostPID": hpid[i], "PPID": ppid[i], "PID": pid[i], "UID": uid[i],
                "ParentProcessName": cols.parent_process_name[i], "ProcessName": cols.process_name[i],
            }
            if d.policy_name:
                rec.update(PolicyName=d.policy_name, Severity=d.severity)
                if d.tags:
                    rec["Tags"] = d.tags
                if d.atags:
                    rec["ATags"] = list(d.atags)
                if d.message:
                    rec["Message"] = d.message
            rec.update(Type=d.type, Source=cols.source[i], Operation=op, Resource=cols.resource[i],
                       Data=cols.data[i])
            if d.enforcer:
                rec["Enforcer"] = d.enforcer
            rec["Action"] = d.action
            rec["Result"] = d.result if d.result is not None else results[i]
            if cwd[i]:
                rec["Cwd"] = cwd[i]
            value = prefix + dumps(rec)[1:]
            if d.type not in ALERT_TYPES:
                logs.append((key, value))
                continue
            send, summary = self.throttle.admit(tkey, secs[i])
            if summary:
                alerts.append((key, self._summary(prefix, secs[i], ts[i])))
            if send:
                alerts.append((key, value))
        return out

    def _summary(self, prefix: bytes, sec: int, ts: int) -> bytes:
        t = self.throttle
        rec = {
            "Timestamp": sec, "UpdatedTime": _iso(ts), "Type": "SystemEvent", "Operation": "AlertThreshold",
            "Message": f"Alert threshold reached: more than {t.max_per_sec} alerts/s; "
                       f"dropping this container's alerts for {t.throttle_s}s",
            "Data": f"maxAlertPerSec={t.max_per_sec} throttleSec={t.throttle_s}",
            "Enforcer": "armorstream", "Action": "Audit", "Result": "Passed",
        }
        return prefix + orjson.dumps(rec)[1:]
