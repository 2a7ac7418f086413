"""The SOC's ready reports over the ClickHouse history (tables `events` and `alerts`).

Each report is SQL with server-side parameters ({name:Type}), so user input never lands
in the statement text. `run()` executes one against an open Store (embedded chdb, the
HTTP endpoint of `armorstream up`, or a ClickHouse server: same SQL on all three).
The process tree is the one report that is not a single statement: it walks HostPPID
links one ancestor at a time (ClickHouse has no recursive CTEs), each step bounded in time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from enforcer.errors import ArmorstreamError
from stream.store.client import Store, translate_errors

__all__ = [
    "GROUPINGS",
    "Query",
    "ReportError",
    "Result",
    "Workload",
    "alerts_summary",
    "file_access",
    "network_destinations",
    "parse_since",
    "pod_timeline",
    "process_tree",
    "recent_alerts",
    "run",
    "top_blocked",
]


class ReportError(ArmorstreamError):
    pass


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_since(text: str) -> int | None:
    """'90s', '15m', '1h', '2d', '1w' -> seconds; 'all' (or '0') -> None, no lower bound."""
    if text.strip().lower() in ("all", "0"):
        return None
    m = _SINCE_RE.match(text.lower())
    if not m:
        raise ReportError(f"--since {text!r}: expected a number and a unit (s, m, h, d, w), e.g. 1h or 2d")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def run(store: Store, query: Query) -> Result:
    with translate_errors("query failed"):
        r = store.client.query(query.sql, parameters=query.parameters or None)
        return Result(list(r.column_names), [tuple(row) for row in r.result_rows])


def _where(since: int | None, extra: Sequence[str] = ()) -> str:
    conds = list(extra)
    if since is not None:
        conds.insert(0, "Timestamp >= now64(9) - toIntervalSecond({since:UInt64})")
    return ("WHERE " + " AND ".join(conds)) if conds else ""


def _params(since: int | None, **kw: Any) -> dict[str, Any]:
    return {**({"since": since} if since is not None else {}), **kw}


# --by NAME -> column of `alerts`
GROUPINGS = {
    "namespace": "NamespaceName",
    "pod": "PodName",
    "policy": "PolicyName",
    "severity": "Severity",
    "action": "Action",
    "operation": "Operation",
    "host": "HostName",
}


def alerts_summary(since: int | None, by: Sequence[str] = ("namespace", "policy", "severity")) -> Query:
    """Alert counts per (namespace, policy, severity, ...) with the first and last time seen."""
    unknown = [b for b in by if b not in GROUPINGS]
    if unknown or not by:
        raise ReportError(f"--by: choose from {', '.join(GROUPINGS)} (got {', '.join(unknown) or 'none'})")
    cols = [GROUPINGS[b] for b in dict.fromkeys(by)]
    keys = ", ".join(cols)
    # Severity is a string ("1".."10"); sort it as a number, highest first, within equal counts.
    order = ["alerts DESC"] + [
        "toUInt8OrZero(Severity) DESC" if c == "Severity" else c for c in cols
    ]
    return Query(
        f"SELECT {keys}, count() AS alerts, countIf(Action = 'Block') AS blocked, "
        f"min(Timestamp) AS first_seen, max(Timestamp) AS last_seen FROM alerts {_where(since)} "
        f"GROUP BY {keys} ORDER BY {', '.join(order)}",
        _params(since),
    )


def recent_alerts(since: int | None, limit: int, namespace: str | None = None) -> Query:
    """The latest alerts one by one, with the event_id that `query tree` takes."""
    extra = ["NamespaceName = {ns:String}"] if namespace else []
    return Query(
        "SELECT Timestamp, event_id, NamespaceName, PodName, HostName, PolicyName, Severity, Operation, "
        f"ProcessName, Resource, Action, Result FROM alerts {_where(since, extra)} "
        "ORDER BY Timestamp DESC, event_id LIMIT {limit:UInt64}",
        _params(since, limit=limit, **({"ns": namespace} if namespace else {})),
    )


def top_blocked(since: int | None, limit: int) -> Query:
    """What was blocked most: (operation, process, resource, policy), with how many pods tried."""
    return Query(
        "SELECT Operation, ProcessName, Resource, PolicyName, count() AS attempts, "
        "uniqExact(NamespaceName, PodName, HostName) AS workloads, max(Timestamp) AS last_seen "
        f"FROM alerts {_where(since, ['Action = {action:String}'])} "
        "GROUP BY Operation, ProcessName, Resource, PolicyName "
        "ORDER BY attempts DESC, Operation, ProcessName, Resource, PolicyName LIMIT {limit:UInt64}",
        _params(since, action="Block", limit=limit),
    )


def pod_timeline(namespace: str, pod: str, since: int | None, limit: int, alerts_only: bool = False) -> Query:
    """Everything a pod did (or only its alerts), oldest first."""
    table = "alerts" if alerts_only else "events"
    extra = ["NamespaceName = {ns:String}", "PodName = {pod:String}"]
    return Query(
        "SELECT Timestamp, event_id, ContainerName, Type, Operation, HostPID, ProcessName, Resource, "
        f"Action, Result, PolicyName FROM {table} {_where(since, extra)} "
        "ORDER BY Timestamp, node, batch_seq, event_index LIMIT {limit:UInt64}",
        _params(since, ns=namespace, pod=pod, limit=limit),
    )


def file_access(path: str, since: int | None, limit: int) -> Query:
    """Who touched a file (or files matching a * pattern): per workload, process, user and outcome."""
    if "*" in path:
        like = path.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
        cond, params = "Resource LIKE {path:String}", {"path": like}
    else:
        cond, params = "Resource = {path:String}", {"path": path}
    return Query(
        "SELECT Resource, NamespaceName, PodName, HostName, ProcessName, UID, Action, Result, "
        "count() AS times, min(Timestamp) AS first_seen, max(Timestamp) AS last_seen "
        f"FROM events {_where(since, ['Operation = {op:String}', cond])} "
        "GROUP BY Resource, NamespaceName, PodName, HostName, ProcessName, UID, Action, Result "
        "ORDER BY last_seen DESC, Resource, NamespaceName, PodName, ProcessName, UID, Action, Result "
        "LIMIT {limit:UInt64}",
        _params(since, op="File", limit=limit, **params),
    )


@dataclass(frozen=True, slots=True)
class Workload:
    """Which events belong to the workload: every field given must match."""

    namespace: str | None = None
    pod: str | None = None
    owner: str | None = None  # Deployment/DaemonSet... name (Owner.Name)
    container: str | None = None
    host: str | None = None

    def conditions(self) -> tuple[list[str], dict[str, Any]]:
        conds, params = [], {}
        for attr, column in (
            ("namespace", "NamespaceName"),
            ("pod", "PodName"),
            ("owner", "OwnerName"),
            ("container", "ContainerName"),
            ("host", "HostName"),
        ):
            value = getattr(self, attr)
            if value is not None:
                conds.append(f"{column} = {{{attr}:String}}")
                params[attr] = value
        return conds, params


def network_destinations(workload: Workload, since: int | None, limit: int) -> Query:
    """Remote addresses a workload connected to (Resource 'remoteip=IP port=N protocol=P')."""
    conds, params = workload.conditions()
    if not conds:
        raise ReportError("name the workload: --namespace, --pod, --owner, --container or --host")
    conds = ["Operation = 'Network'", "Resource LIKE 'remoteip=%'", *conds]
    return Query(
        "SELECT extract(Resource, 'remoteip=(\\\\S+)') AS remote_ip, "
        "toUInt16OrZero(extract(Resource, 'port=(\\\\d+)')) AS port, "
        "extract(Resource, 'protocol=(\\\\S+)') AS protocol, ProcessName, "
        "count() AS connections, countIf(Action = 'Block') AS blocked, "
        "min(Timestamp) AS first_seen, max(Timestamp) AS last_seen "
        f"FROM events {_where(since, conds)} "
        "GROUP BY remote_ip, port, protocol, ProcessName "
        "ORDER BY connections DESC, remote_ip, port, protocol, ProcessName LIMIT {limit:UInt64}",
        _params(since, limit=limit, **params),
    )


TREE_COLUMNS = [
    "depth", "HostPID", "HostPPID", "ProcessName", "Source", "UID", "Timestamp", "NamespaceName",
    "PodName", "ContainerName", "seen",
]  # fmt: skip
_TREE_SELECT = (
    "SELECT HostPID, HostPPID, ProcessName, Source, UID, Timestamp, NamespaceName, PodName, "
    "ContainerName, ParentProcessName, HostName, Operation FROM events "
)


def process_tree(store: Store, event_id: int, window: int = 86400, max_depth: int = 64) -> Result:
    """The alerting process and its ancestors, oldest ancestor first.

    Each ancestor is the latest event of that HostPID on the same host no later than its
    child's event (preferring exec events, which carry the program and its arguments), and
    no earlier than `window` seconds before it: a reused pid outside the window is not
    mistaken for the parent. An ancestor with no recorded event still appears, named by
    its child's ParentProcessName, with seen = 'inferred'.
    """
    first = run(
        store,
        Query(_TREE_SELECT + "WHERE event_id = {id:UInt64} ORDER BY Timestamp LIMIT 1", {"id": event_id}),
    ).dicts()
    if not first:
        raise ReportError(f"no event with event_id {event_id} (take one from `armorstream query recent`)")
    chain = [(first[0], "start")]
    seen_pids = {first[0]["HostPID"]}
    cur = first[0]
    for _ in range(max_depth):
        ppid = int(cur["HostPPID"])
        if ppid <= 0 or ppid in seen_pids:
            break
        found = run(
            store,
            Query(
                _TREE_SELECT
                + "WHERE HostName = {host:String} AND HostPID = {pid:Int32} "
                "AND Timestamp <= {t:DateTime64(9)} "
                "AND Timestamp >= {t:DateTime64(9)} - toIntervalSecond({w:UInt64}) "
                "ORDER BY Operation = 'Process' DESC, Timestamp DESC LIMIT 1",
                {"host": cur["HostName"], "pid": ppid, "t": cur["Timestamp"], "w": window},
            ),
        ).dicts()
        seen_pids.add(ppid)
        if found:
            cur = found[0]
            chain.append((cur, "exec" if cur["Operation"] == "Process" else "event"))
            continue
        # The parent left no event in the window: show it from what the child knows, and stop.
        chain.append(
            (
                {**{k: "" for k in cur}, "HostPID": ppid, "HostPPID": 0, "UID": 0,
                 "ProcessName": cur["ParentProcessName"], "Timestamp": None,
                 "NamespaceName": cur["NamespaceName"], "PodName": cur["PodName"],
                 "ContainerName": cur["ContainerName"]},
                "inferred",
            )
        )  # fmt: skip
        break
    chain.reverse()
    rows = [
        (depth, *(row[c] for c in TREE_COLUMNS[1:-1]), how) for depth, (row, how) in enumerate(chain)
    ]
    return Result(list(TREE_COLUMNS), rows)
