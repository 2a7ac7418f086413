"""Column-wise inserts of event batches, harmless to repeat.

A re-delivered batch must not double rows in query results. Two mechanisms, both exact:

1. Every insert carries `insert_deduplication_token`, derived from the raw batches it holds
   (node, batch_seq) and its part number. ClickHouse drops a block whose token it has seen
   within `non_replicated_deduplication_window` inserts, in `events` and in every view
   target (alerts, rollups, ledger), so a retried insert changes nothing.
2. After a crash the stream may regroup raw batches into different inserts, whose tokens
   differ. Before inserting, the sink asks the `ingested_batches` ledger which of its raw
   batches are already stored and drops their rows.

ClickHouse applies TTL when it writes a part, so rows already older than the retention
never reach `events` (the rollups, with their longer retention, still count them). The
sink counts those rows before inserting and reports them as `expired_rows`, not as stored.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stream.store.client import Store, translate_errors
from stream.store.schema import EVENT_COLUMNS, EVENT_SCHEMA, LEDGER_KIND

__all__ = ["InsertResult", "Sink", "batch_token", "conform", "rows_to_table"]

log = logging.getLogger(__name__)

# ClickHouse splits bigger inserts into several blocks anyway; keep parts deterministic.
MAX_PART_ROWS = 1_000_000


@dataclass(frozen=True, slots=True)
class InsertResult:
    rows: int  # rows sent to ClickHouse and kept (within the retention)
    skipped_rows: int  # rows of raw batches that were already stored
    parts: int
    expired_rows: int = 0  # rows sent but older than the retention: ClickHouse's TTL drops them at insert


def _batch_ids(table: pa.Table) -> list[tuple[str, int]]:
    pairs = table.select(["node", "batch_seq"]).group_by(["node", "batch_seq"]).aggregate([])
    return sorted(zip(pairs["node"].to_pylist(), pairs["batch_seq"].to_pylist(), strict=True))


def batch_token(ids: Iterable[tuple[str, int]], part: int, rows: int) -> str:
    """The same raw batches (and part) always give the same token."""
    h = hashlib.blake2b(digest_size=16)
    for node, seq in sorted(ids):
        h.update(f"{node}\x00{seq}\x01".encode())
    return f"as1-{h.hexdigest()}-{part}-{rows}"


def conform(table: pa.Table) -> pa.Table:
    """Columns in schema order and types; absent columns become empty strings, zeros, []."""
    columns = []
    for col in EVENT_COLUMNS:
        if col.name in table.column_names:
            arr = table[col.name]
            if arr.type != col.arrow_type:
                arr = arr.cast(col.arrow_type)
            if arr.null_count:
                arr = pc.fill_null(arr, _empty(col.arrow_type))
        else:
            arr = pa.nulls(table.num_rows, col.arrow_type)
            arr = pc.fill_null(arr, _empty(col.arrow_type)) if table.num_rows else arr
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


def _empty(t: pa.DataType) -> pa.Scalar:
    if pa.types.is_string(t):
        return pa.scalar("", t)
    if pa.types.is_list(t):
        return pa.scalar([], t)
    if pa.types.is_boolean(t):
        return pa.scalar(False, t)
    if pa.types.is_timestamp(t):
        return pa.scalar(0, t)
    return pa.scalar(0, t)


def _ns(value: Any) -> int:
    """KubeArmor's Timestamp is Unix seconds; UpdatedTime an RFC 3339 string."""
    if isinstance(value, int):
        return value * 1_000_000_000 if value < 10**11 else value
    if isinstance(value, float):
        return int(value * 1e9)
    if isinstance(value, str) and value:
        head, _, frac = value.rstrip("Z").partition(".")
        dt = datetime.fromisoformat(head + "+00:00")
        return int(dt.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])
    return 0


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """KubeArmor JSON records (plus node, batch_seq, event_index) to an events table.

    A convenience for tests and small callers; the stream builds Arrow columns directly.
    `timestamp_ns` (int) wins over `Timestamp` (seconds) when present.
    """
    cols: dict[str, list[Any]] = {c.name: [] for c in EVENT_COLUMNS}
    for r in rows:
        owner = r.get("Owner") or {}
        for c in EVENT_COLUMNS:
            name = c.name
            if name == "Timestamp":
                v: Any = r["timestamp_ns"] if "timestamp_ns" in r else _ns(r.get("Timestamp", 0))
            elif name == "UpdatedTime":
                v = _ns(r.get("UpdatedTime", ""))
            elif name.startswith("Owner"):
                v = owner.get(name[5:], "")
            elif name == "ATags":
                v = list(r.get("ATags") or [])
            else:
                v = r.get(name)
            cols[name].append(v)
    return conform(pa.table({c.name: pa.array(cols[c.name], c.arrow_type) for c in EVENT_COLUMNS}))


class Sink:
    """Inserts event tables into `events` (views fill alerts, rollups and the ledger)."""

    def __init__(self, store: Store, *, skip_stored_batches: bool = True) -> None:
        self.store = store
        self.skip_stored_batches = skip_stored_batches

    def stored_batches(self, ids: list[tuple[str, int]]) -> set[tuple[str, int]]:
        if not ids:
            return set()
        rows = self.store.rows(  # the ledger's rows of `rollups` (the ingested_batches view, by its key)
            f"SELECT DISTINCT k1, seq FROM rollups WHERE kind = '{LEDGER_KIND}' "
            "AND k1 IN {nodes:Array(String)} AND (k1, seq) IN {ids:Array(Tuple(String, UInt64))}",
            {"nodes": sorted({n for n, _ in ids}), "ids": ids},
        )
        return {(str(n), int(s)) for n, s in rows}

    def write_marks(self, marks: list[tuple[str, int, str, int, int]]) -> None:
        """(raw topic, raw partition, SIEM topic, SIEM partition, offset) rows, now."""
        if not marks:
            return
        now = datetime.now(UTC)
        with translate_errors("writing SIEM marks failed"):
            columns = ["raw_topic", "raw_partition", "siem_topic", "siem_partition", "offset", "written"]
            self.store.client.insert("siem_marks", [(*m, now) for m in marks], column_names=columns)

    def marks(self, raw_topic: str, raw_partition: int) -> dict[tuple[str, int], int]:
        """The newest mark of each SIEM partition for one raw partition."""
        rows = self.store.rows(
            "SELECT siem_topic, siem_partition, argMax(offset, written) FROM siem_marks "
            "WHERE raw_topic = {t:String} AND raw_partition = {p:UInt32} GROUP BY siem_topic, siem_partition",
            {"t": raw_topic, "p": raw_partition},
        )
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    def insert(self, table: pa.Table) -> InsertResult:
        """Insert one batch of events column-wise; safe to call again with the same table.

        Raises StoreUnavailable when ClickHouse is down (back off and call again with the
        same table) and StoreError when it refuses the data.
        """
        table = conform(table)
        skipped = 0
        if self.skip_stored_batches and table.num_rows:
            stored = self.stored_batches(_batch_ids(table))
            if stored:
                keep = pc.invert(_in_batches(table, stored))
                before = table.num_rows
                table = table.filter(keep)
                skipped = before - table.num_rows
        expired = self.expired_rows(table)
        if expired:
            log.warning("%d of %d rows are older than the %d-day retention: ClickHouse drops them at insert",
                        expired, table.num_rows, self.store.config.retention_days)
        parts = 0
        for offset in range(0, table.num_rows, MAX_PART_ROWS):
            part = table.slice(offset, MAX_PART_ROWS)
            token = batch_token(_batch_ids(part), offset // MAX_PART_ROWS, part.num_rows)
            with translate_errors("insert into ClickHouse failed"):
                self.store.client.insert_arrow("events", part, settings={"insert_deduplication_token": token})
            parts += 1
        return InsertResult(rows=table.num_rows - expired, skipped_rows=skipped, parts=parts,
                            expired_rows=expired)

    def expired_rows(self, table: pa.Table, now_s: int | None = None) -> int:
        """Rows whose TTL (toDateTime(Timestamp) + retention) has passed: ClickHouse will not keep them."""
        days = self.store.config.retention_days
        if not days or not table.num_rows:
            return 0
        now_s = int(time.time()) if now_s is None else now_s
        # toDateTime() truncates to the second; a row expires once its TTL time is <= now.
        cutoff_ns = (now_s - days * 86400 + 1) * 1_000_000_000
        ts = table["Timestamp"].cast(pa.int64())
        return int(pc.sum(pc.less(ts, cutoff_ns)).as_py() or 0)

    def insert_rows(self, rows: list[Mapping[str, Any]]) -> InsertResult:
        return self.insert(rows_to_table(rows))


def _in_batches(table: pa.Table, ids: set[tuple[str, int]]) -> pa.ChunkedArray:
    mask: Any = pa.array([False] * table.num_rows)
    by_node: dict[str, list[int]] = {}
    for node, seq in ids:
        by_node.setdefault(node, []).append(seq)
    for node, seqs in by_node.items():
        hit = pc.and_(
            pc.equal(table["node"], node), pc.is_in(table["batch_seq"], pa.array(seqs, pa.uint64()))
        )
        mask = pc.or_(mask, hit)
    return mask
