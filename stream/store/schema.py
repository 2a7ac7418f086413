"""The ClickHouse schema: the event columns once, the tables and numbered migrations.

`events` holds every Log (KubeArmor's JSON field names as columns) plus the ids that make
re-delivery harmless; `alerts` is the Matched* subset, filled by a materialized view so one
insert feeds both. The per-minute and per-hour counts and the ledger of stored raw batches
are rows of one AggregatingMergeTree table, `rollups`, filled by one view (migration 6;
each materialized view costs every insert ~9 ms and a part of its own, so five views cost
a 32k-row insert a third of its time), and read through plain views named as the tables
they replaced: `policy_minute`, `policy_hour`, `namespace_minute`, `namespace_hour`
(query them with sum(events) ... GROUP BY) and `ingested_batches`.

Every table that an insert reaches (directly or through a view) carries
non_replicated_deduplication_window, so a retried insert with the same
insert_deduplication_token is dropped in the table and in each view's target alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "ALERT_TYPES",
    "EVENT_COLUMNS",
    "EVENT_SCHEMA",
    "LEDGER_KIND",
    "MIGRATIONS",
    "RAW_TABLES",
    "ROLLUP_TABLES",
    "Column",
    "Migration",
    "SchemaSettings",
]

ALERT_TYPES = ("MatchedPolicy", "MatchedHostPolicy")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    ch_type: str
    arrow_type: pa.DataType
    comment: str = ""


_LC = "LowCardinality(String)"
_TS = "DateTime64(9, 'UTC')"
_ARROW_TS = pa.timestamp("ns", tz="UTC")

# KubeArmor Log fields in `karmor logs --json` order; Owner is flattened to three columns.
EVENT_COLUMNS: tuple[Column, ...] = (
    Column("Timestamp", _TS, _ARROW_TS, "event time"),
    Column("UpdatedTime", _TS, _ARROW_TS, "when the record was produced"),
    Column("ClusterName", _LC, pa.string()),
    Column("HostName", _LC, pa.string()),
    Column("NamespaceName", _LC, pa.string()),
    Column("OwnerRef", _LC, pa.string(), "Owner.Ref: Deployment, DaemonSet, ..."),
    Column("OwnerName", "String", pa.string(), "Owner.Name"),
    Column("OwnerNamespace", _LC, pa.string(), "Owner.Namespace"),
    Column("PodName", "String", pa.string()),
    Column("Labels", _LC, pa.string(), "k=v,k=v as KubeArmor prints them"),
    Column("ContainerID", "String", pa.string()),
    Column("ContainerName", _LC, pa.string()),
    Column("ContainerImage", _LC, pa.string()),
    Column("HostPPID", "Int32", pa.int32()),
    Column("HostPID", "Int32", pa.int32()),
    Column("PPID", "Int32", pa.int32()),
    Column("PID", "Int32", pa.int32()),
    Column("UID", "Int32", pa.int32()),
    Column("ParentProcessName", "String", pa.string()),
    Column("ProcessName", "String", pa.string()),
    Column("PolicyName", _LC, pa.string()),
    Column("Severity", _LC, pa.string()),
    Column("Tags", _LC, pa.string()),
    Column("ATags", "Array(LowCardinality(String))", pa.list_(pa.string())),
    Column("Message", _LC, pa.string()),
    Column("Type", _LC, pa.string(), "MatchedPolicy, MatchedHostPolicy, ContainerLog, HostLog, ..."),
    Column("Source", "String", pa.string()),
    Column("Operation", _LC, pa.string()),
    Column("Resource", "String", pa.string()),
    Column("Data", "String", pa.string()),
    Column("Enforcer", _LC, pa.string()),
    Column("Action", _LC, pa.string()),
    Column("Result", _LC, pa.string()),
    Column("Cwd", "String", pa.string()),
    Column("TTY", _LC, pa.string()),
    # Identity of the event for deduplication: the sensor's node, its batch sequence
    # number and the event's index inside that batch.
    Column("node", _LC, pa.string(), "sensor node that produced the raw batch"),
    Column("batch_seq", "UInt64", pa.uint64(), "raw batch sequence number on that node"),
    Column("event_index", "UInt32", pa.uint32(), "index of the event inside its raw batch"),
    Column("metadata_late", "Bool", pa.bool_(), "pod metadata was unknown or late when stored"),
)

EVENT_SCHEMA = pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in EVENT_COLUMNS])

# Tables holding one row per event (retention_days), and the rollups table (its ledger rows
# kind = 'batch' with retention_days, its counts with rollup_retention_days).
RAW_TABLES = ("events", "alerts")
ROLLUP_TABLES = ("rollups",)
LEDGER_KIND = "batch"


@dataclass(frozen=True, slots=True)
class SchemaSettings:
    """What migrations need to know; the retention (TTL) itself is applied after them."""

    dedup_window: int = 10_000  # inserts remembered per table for insert_deduplication_token
    tables: frozenset[str] = frozenset()  # the database's tables (not views) before the migration


def _event_columns_sql() -> str:
    cols = [
        f"    `{c.name}` {c.ch_type}" + (f" COMMENT '{c.comment}'" if c.comment else "")
        for c in EVENT_COLUMNS
    ]
    cols.append("    `event_id` UInt64 DEFAULT cityHash64(node, batch_seq, event_index)")
    return ",\n".join(cols)


def _raw_table(name: str, s: SchemaSettings) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {name} (\n{_event_columns_sql()}\n)\n"
        "ENGINE = MergeTree\n"
        "PARTITION BY toDate(Timestamp)\n"
        "ORDER BY (NamespaceName, PodName, Timestamp, node, batch_seq, event_index)\n"
        f"SETTINGS non_replicated_deduplication_window = {s.dedup_window}"
    )


def _m1_events(s: SchemaSettings) -> list[str]:
    return [_raw_table("events", s)]


def _m2_alerts(s: SchemaSettings) -> list[str]:
    types = ", ".join(f"'{t}'" for t in ALERT_TYPES)
    return [
        _raw_table("alerts", s),
        "CREATE MATERIALIZED VIEW IF NOT EXISTS alerts_mv TO alerts AS "
        f"SELECT * FROM events WHERE Type IN ({types})",
    ]


def _rollup(name: str, bucket_fn: str, keys: str, where: str, s: SchemaSettings) -> list[str]:
    key_cols = [k.strip() for k in keys.split(",")]
    key_defs = ",\n".join(f"    `{k}` LowCardinality(String)" for k in key_cols)
    return [
        f"CREATE TABLE IF NOT EXISTS {name} (\n    `bucket` DateTime('UTC'),\n{key_defs},\n"
        "    `events` UInt64\n)\n"
        "ENGINE = SummingMergeTree(events)\n"
        "PARTITION BY toYYYYMM(bucket)\n"
        f"ORDER BY ({keys}, bucket)\n"
        f"SETTINGS non_replicated_deduplication_window = {s.dedup_window}",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}_mv TO {name} AS "
        f"SELECT {bucket_fn}(Timestamp) AS bucket, {keys}, count() AS events FROM events "
        f"{where}GROUP BY bucket, {keys}",
    ]


def _m3_rollups(s: SchemaSettings) -> list[str]:
    alerts_only = "WHERE Type IN (" + ", ".join(f"'{t}'" for t in ALERT_TYPES) + ") "
    policy_keys = "PolicyName, NamespaceName, Severity, Action"
    ns_keys = "NamespaceName, Type, Operation"
    return [
        *_rollup("policy_minute", "toStartOfMinute", policy_keys, alerts_only, s),
        *_rollup("policy_hour", "toStartOfHour", policy_keys, alerts_only, s),
        *_rollup("namespace_minute", "toStartOfMinute", ns_keys, "", s),
        *_rollup("namespace_hour", "toStartOfHour", ns_keys, "", s),
    ]


def _m4_ledger(s: SchemaSettings) -> list[str]:
    # Which raw batches are stored: lets the sink drop batches that a re-delivery
    # regrouped into a different insert (where the token cannot match).
    return [
        "CREATE TABLE IF NOT EXISTS ingested_batches (\n"
        "    `node` LowCardinality(String),\n    `batch_seq` UInt64,\n    `rows` UInt64,\n"
        "    `Timestamp` DateTime64(9, 'UTC')\n)\n"
        "ENGINE = MergeTree\nPARTITION BY toDate(Timestamp)\nORDER BY (node, batch_seq)\n"
        f"SETTINGS non_replicated_deduplication_window = {s.dedup_window}",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS ingested_batches_mv TO ingested_batches AS "
        "SELECT node, batch_seq, count() AS rows, min(Timestamp) AS Timestamp FROM events "
        "GROUP BY node, batch_seq",
    ]


def _m5_siem_marks(s: SchemaSettings) -> list[str]:
    # Per raw partition and SIEM partition: every Alert/Log the stream sent there for raw
    # messages not yet stored lies at or above `offset`. After a crash, the worker that takes
    # the raw partition reads the SIEM topics from there to learn which records went out.
    return [
        "CREATE TABLE IF NOT EXISTS siem_marks (\n"
        "    `raw_topic` LowCardinality(String),\n    `raw_partition` UInt32,\n"
        "    `siem_topic` LowCardinality(String),\n    `siem_partition` UInt32,\n"
        "    `offset` UInt64,\n    `written` DateTime64(3, 'UTC')\n)\n"
        "ENGINE = ReplacingMergeTree(written)\n"
        "ORDER BY (raw_topic, raw_partition, siem_topic, siem_partition)\n"
        "TTL toDateTime(written) + INTERVAL 30 DAY"
    ]


# The rollup views of migration 3, as rows of `rollups`: kind, and its keys as k1..k4.
_ROLLUP_KEYS = {
    "policy_minute": ("PolicyName", "NamespaceName", "Severity", "Action"),
    "policy_hour": ("PolicyName", "NamespaceName", "Severity", "Action"),
    "namespace_minute": ("NamespaceName", "Type", "Operation"),
    "namespace_hour": ("NamespaceName", "Type", "Operation"),
}


def _k_columns(kind: str) -> str:
    """A rollup's keys as k1..k4 (empty strings for the keys it does not have)."""
    keys = _ROLLUP_KEYS[kind]
    return ", ".join([*keys, *["''"] * (4 - len(keys))])


def _rollup_row(kind: str, bucket: str) -> str:
    return f"('{kind}', {bucket}, {_k_columns(kind)}, 0)"


def _m6_one_rollup_view(s: SchemaSettings) -> list[str]:
    alert_types = ", ".join(f"'{t}'" for t in ALERT_TYPES)
    # One pass over the insert: counts per minute and workload keys (and per raw batch), then
    # each group spread by ARRAY JOIN into the rows of every rollup it belongs to.
    hour = "toStartOfHour(m)"
    per_group = ", ".join([_rollup_row("namespace_minute", "m"), _rollup_row("namespace_hour", hour),
                           f"('{LEDGER_KIND}', {hour}, node, '', '', '', batch_seq)"])
    per_alert = ", ".join([_rollup_row("policy_minute", "m"), _rollup_row("policy_hour", hour)])
    out = [
        "CREATE TABLE IF NOT EXISTS rollups (\n"
        "    `kind` LowCardinality(String) COMMENT 'policy_minute, policy_hour, namespace_minute, "
        "namespace_hour, or batch (the ledger)',\n"
        "    `bucket` DateTime('UTC'),\n"
        "    `k1` LowCardinality(String),\n    `k2` LowCardinality(String),\n"
        "    `k3` LowCardinality(String),\n    `k4` LowCardinality(String),\n"
        "    `seq` UInt64 COMMENT 'batch: the raw batch sequence number (k1: its node)',\n"
        "    `events` SimpleAggregateFunction(sum, UInt64),\n"
        f"    `first` SimpleAggregateFunction(min, {_TS}) COMMENT 'earliest event time'\n)\n"
        "ENGINE = AggregatingMergeTree\n"
        "PARTITION BY toYYYYMM(bucket)\n"
        "ORDER BY (kind, k1, k2, k3, k4, seq, bucket)\n"
        f"SETTINGS non_replicated_deduplication_window = {s.dedup_window}",
        # the old views first, so no insert feeds the old tables while they are copied
        *(f"DROP VIEW IF EXISTS {t}_mv" for t in (*_ROLLUP_KEYS, "ingested_batches")),
    ]
    # Copy what the old tables hold (a retried migration's copy is dropped by its token), then
    # replace each by a view of the same name and columns.
    for kind in _ROLLUP_KEYS:
        if kind in s.tables:
            out += [f"INSERT INTO rollups (kind, bucket, k1, k2, k3, k4, seq, events, first) "
                    f"SELECT '{kind}', bucket, {_k_columns(kind)}, 0, events, bucket FROM {kind} "
                    f"SETTINGS insert_deduplication_token = 'migration-6-{kind}'"]
    if "ingested_batches" in s.tables:
        out += ["INSERT INTO rollups (kind, bucket, k1, k2, k3, k4, seq, events, first) "
                f"SELECT '{LEDGER_KIND}', toStartOfHour(Timestamp), node, '', '', '', batch_seq, rows, "
                "Timestamp FROM ingested_batches "
                "SETTINGS insert_deduplication_token = 'migration-6-ingested_batches'"]
    out += [f"DROP TABLE IF EXISTS {t} SYNC" for t in (*_ROLLUP_KEYS, "ingested_batches") if t in s.tables]
    for kind, keys in _ROLLUP_KEYS.items():
        named = ", ".join(f"k{i + 1} AS {k}" for i, k in enumerate(keys))
        out.append(f"CREATE VIEW IF NOT EXISTS {kind} AS SELECT bucket, {named}, events FROM rollups "
                   f"WHERE kind = '{kind}'")
    out += [
        "CREATE VIEW IF NOT EXISTS ingested_batches AS SELECT k1 AS node, seq AS batch_seq, "
        "sum(events) AS rows, min(first) AS Timestamp FROM rollups "
        f"WHERE kind = '{LEDGER_KIND}' GROUP BY node, batch_seq",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS rollups_mv TO rollups AS "
        "SELECT r.1 AS kind, r.2 AS bucket, r.3 AS k1, r.4 AS k2, r.5 AS k3, r.6 AS k4, r.7 AS seq, "
        "events, first FROM ("
        "SELECT toStartOfMinute(Timestamp) AS m, NamespaceName, Type, Operation, PolicyName, Severity, "
        f"Action, node, batch_seq, Type IN ({alert_types}) AS alert, count() AS events, "
        "min(Timestamp) AS first FROM events "
        "GROUP BY m, NamespaceName, Type, Operation, PolicyName, Severity, Action, node, batch_seq"
        f") ARRAY JOIN arrayConcat([{per_group}], if(alert, [{per_alert}], [])) AS r",
    ]
    return out


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: Callable[[SchemaSettings], list[str]]  # each one idempotent (IF NOT EXISTS)


# Append only: a released migration is never edited or renumbered.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events table", _m1_events),
    Migration(2, "alerts table and view", _m2_alerts),
    Migration(3, "per-policy and per-namespace rollups", _m3_rollups),
    Migration(4, "ingested batch ledger", _m4_ledger),
    Migration(5, "SIEM topic marks", _m5_siem_marks),
    Migration(6, "rollups and the batch ledger through one view", _m6_one_rollup_view),
)
