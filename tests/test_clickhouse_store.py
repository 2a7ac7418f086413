"""The ClickHouse store against real engines: chdb in-process, chdb behind the HTTP endpoint
(clickhouse-connect's HTTP client, the path a real server uses) and a server: the one
CLICKHOUSE_URL names (an official ClickHouse server, e.g. from deploy/compose) or else
`armorstream clickhouse serve` started as its own process, so the URL configuration path
never goes untested. Every test runs in a fresh database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pytest

from armorstream.embedded_broker import free_port
from stream.chhttp import ChdbHttpServer
from stream.store import Sink, Store, StoreConfig, StoreError, StoreUnavailable, open_store, rows_to_table
from stream.store.schema import EVENT_COLUMNS, MIGRATIONS
from stream.store.testdata import synthetic_records

pytestmark = pytest.mark.clickhouse

StoreFactory = Callable[..., Store]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # chdb hosts one data directory per process: the direct and HTTP backends share it.
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture(scope="module")
def endpoint(data_dir: Path) -> Iterator[ChdbHttpServer]:
    server = ChdbHttpServer(data_dir, port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("CLICKHOUSE_URL")
    if url:
        yield url
        return
    # No official server can be installed on these machines: serve a separate chdb process.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "armorstream.cli", "clickhouse", "serve",
         "--path", str(tmp_path_factory.mktemp("chserver")), "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"armorstream clickhouse serve did not start: {err}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/default"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(params=["chdb", "http", "server"])
def make_store(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[StoreFactory]:
    database = f"t_{uuid.uuid4().hex[:10]}"
    backend = request.param
    if backend == "server":
        url = request.getfixturevalue("server_url")
        base = urlsplit(url)._replace(path=f"/{database}").geturl()
    elif backend == "http":
        base = f"{request.getfixturevalue('endpoint').url}/{database}"
    opened: list[Store] = []

    def make(**kw: Any) -> Store:
        config = (
            StoreConfig(path=data_dir, database=database, **kw)
            if backend == "chdb"
            else StoreConfig(url=base, **kw)
        )
        store = open_store(config)
        opened.append(store)
        return store

    yield make
    if opened:
        opened[-1].command(f"DROP DATABASE IF EXISTS {database}")
    for s in opened:
        s.close()


def test_migrations_are_idempotent(make_store: StoreFactory) -> None:
    first = make_store()
    assert first.applied_migrations() == [m.version for m in MIGRATIONS]
    again = make_store()
    assert again.migrate() == []
    assert again.rows("SELECT version, count() FROM schema_migrations GROUP BY version ORDER BY version") == [
        (m.version, 1) for m in MIGRATIONS
    ]
    tables = {r[0] for r in again.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")}
    assert {"events", "alerts", "policy_minute", "namespace_hour", "ingested_batches"} <= tables


def test_migration_6_keeps_the_rollups_and_ledger_of_a_version_5_store(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stream.store.client as client

    monkeypatch.setattr(client, "MIGRATIONS", MIGRATIONS[:5])
    monkeypatch.setattr(client.Store, "apply_table_settings", lambda self: None)  # it knows only v6 tables
    old = make_store()
    assert old.applied_migrations() == [1, 2, 3, 4, 5]
    # an hour: several minutes and keys (a v5 ledger is not the sink's to ask)
    Sink(old, skip_stored_batches=False).insert_rows(synthetic_records(3600, batch_size=400))
    queries = {
        "policy": "SELECT PolicyName, NamespaceName, Severity, Action, toUnixTimestamp(bucket), sum(events) "
                  "FROM policy_minute GROUP BY ALL ORDER BY ALL",
        "policy_hour": "SELECT PolicyName, toUnixTimestamp(bucket), sum(events) FROM policy_hour "
                       "GROUP BY ALL ORDER BY ALL",
        "ns": "SELECT NamespaceName, Type, Operation, toUnixTimestamp(bucket), sum(events) "
              "FROM namespace_minute GROUP BY ALL ORDER BY ALL",
        "ns_hour": "SELECT NamespaceName, toUnixTimestamp(bucket), sum(events) FROM namespace_hour "
                   "GROUP BY ALL ORDER BY ALL",
        "ledger": "SELECT node, batch_seq, sum(rows), toUnixTimestamp64Nano(min(Timestamp)) "
                  "FROM ingested_batches GROUP BY ALL ORDER BY ALL",
    }
    before = {k: old.rows(q) for k, q in queries.items()}
    assert all(before.values()) and len(before["ledger"]) == 9

    monkeypatch.undo()
    new = make_store()
    assert new.applied_migrations() == [m.version for m in MIGRATIONS]
    assert {k: new.rows(q) for k, q in queries.items()} == before
    engines = dict(new.rows("SELECT name, engine FROM system.tables WHERE database = currentDatabase()"))
    for name in ("policy_minute", "policy_hour", "namespace_minute", "namespace_hour", "ingested_batches"):
        assert engines[name] == "View"
    assert {n for n, e in engines.items() if e == "MaterializedView"} == {"alerts_mv", "rollups_mv"}

    # A retried migration (crashed before it was recorded) copies nothing twice; new rows still count.
    from stream.store.schema import SchemaSettings

    for sql in MIGRATIONS[5].statements(SchemaSettings(tables=frozenset({"events", "alerts", "rollups"}))):
        new.command(sql)
    assert {k: new.rows(q) for k, q in queries.items()} == before
    Sink(new).insert_rows(synthetic_records(400, batch_size=400, first_seq=100))
    assert new.rows("SELECT count() FROM ingested_batches") == [(10,)]
    assert new.rows("SELECT sum(events) FROM namespace_hour")[0][0] == 4000


def _stored(store: Store, table: str = "events") -> list[dict[str, Any]]:
    names = [c.name for c in EVENT_COLUMNS]
    result = store.client.query_arrow(
        f"SELECT {', '.join(names)} FROM {table} ORDER BY node, batch_seq, event_index"
    )
    return _comparable(result.select(names))


def _comparable(table: pa.Table) -> list[dict[str, Any]]:
    # Compare timestamps as integers: drivers differ in how they attach the zone.
    out = []
    for row in table.to_pylist():
        for k in ("Timestamp", "UpdatedTime"):
            v = row[k]
            row[k] = v.value if hasattr(v, "value") else int(v.timestamp() * 1e6) * 1000
        out.append(row)
    return out


def test_insert_gives_exact_rows_back(make_store: StoreFactory) -> None:
    store = make_store()
    records = synthetic_records(1500, batch_size=100)
    table = rows_to_table(records)
    result = Sink(store).insert(table)
    assert (result.rows, result.skipped_rows) == (1500, 0)

    expected = _comparable(
        table.cast(
            pa.schema(
                [
                    f.with_type(pa.timestamp("ns")) if pa.types.is_timestamp(f.type) else f
                    for f in table.schema
                ]
            )
        )
    )
    got = _stored(store)
    assert len(got) == 1500
    for e, g in zip(expected, got, strict=True):
        # DateTime64(9) keeps nanoseconds; drivers may return microseconds.
        for k in ("Timestamp", "UpdatedTime"):
            assert abs(e[k] - g[k]) < 1000, k
            e[k] = g[k]
        assert e == g
    n_alerts = sum(r["Type"] == "MatchedPolicy" for r in records)
    assert store.rows("SELECT count() FROM alerts") == [(n_alerts,)]
    assert [r["event_index"] for r in _stored(store, "alerts")] == [
        r["event_index"] for r in records if r["Type"] == "MatchedPolicy"
    ]
    # Owner comes back from the flattened columns; KubeArmor JSON field values survive.
    first = got[0]
    assert (first["OwnerRef"], first["OwnerName"], first["OwnerNamespace"]) == ("Deployment", "web-0", "ns-0")
    assert first["ATags"] == ["NIST", "MITRE"] and first["Type"] == "MatchedPolicy"


def _counts(store: Store) -> tuple[Any, ...]:
    return (
        store.rows("SELECT count(), uniqExact(event_id) FROM events")[0],
        store.rows("SELECT count() FROM alerts")[0][0],
        store.rows("SELECT sum(events) FROM namespace_minute")[0][0],
        store.rows("SELECT sum(events) FROM policy_hour")[0][0],
        store.rows("SELECT sum(rows) FROM ingested_batches")[0][0],
    )


def test_retried_insert_does_not_duplicate(make_store: StoreFactory) -> None:
    store = make_store()
    table = rows_to_table(synthetic_records(900, batch_size=100))
    token_only = Sink(store, skip_stored_batches=False)  # the insert_deduplication_token path alone
    token_only.insert(table)
    once = _counts(store)
    assert once == ((900, 900), 300, 900, 300, 900)
    for _ in range(2):
        assert token_only.insert(table).rows == 900  # sent again, and dropped by ClickHouse
    assert _counts(store) == once


def test_regrouped_redelivery_does_not_duplicate(make_store: StoreFactory) -> None:
    store = make_store()
    records = synthetic_records(1000, batch_size=100)
    sink = Sink(store)
    sink.insert_rows(records[:500])  # raw batches 0-4, then a "crash"
    result = sink.insert_rows(records[300:])  # re-delivery regrouped: batches 3-9
    assert (result.rows, result.skipped_rows) == (500, 200)
    assert _counts(store) == ((1000, 1000), 334, 1000, 334, 1000)
    assert store.rows("SELECT count() FROM ingested_batches") == [(10,)]


def test_rollups_count_exactly(make_store: StoreFactory) -> None:
    store = make_store()
    records = synthetic_records(7300, batch_size=500)  # about two hours, one event per second
    Sink(store).insert_rows(records)

    def minute(r: dict[str, Any]) -> int:
        return int(r["timestamp_ns"] // 60_000_000_000 * 60)

    want_policy = Counter(
        (r["PolicyName"], r["NamespaceName"], minute(r)) for r in records if r["Type"] == "MatchedPolicy"
    )
    got_policy = store.rows(
        "SELECT PolicyName, NamespaceName, toUnixTimestamp(bucket), sum(events) FROM policy_minute "
        "GROUP BY PolicyName, NamespaceName, bucket"
    )
    assert {(p, n, int(b)): int(c) for p, n, b, c in got_policy} == dict(want_policy)

    want_ns = Counter((r["NamespaceName"], r["Operation"], minute(r) // 3600 * 3600) for r in records)
    got_ns = store.rows(
        "SELECT NamespaceName, Operation, toUnixTimestamp(bucket), sum(events) FROM namespace_hour "
        "GROUP BY NamespaceName, Operation, bucket"
    )
    assert {(n, o, int(b)): int(c) for n, o, b, c in got_ns} == dict(want_ns)
    assert len(want_ns) > 12  # several hours and keys, or the test proves little


def test_retention_setting_is_applied(make_store: StoreFactory) -> None:
    store = make_store(retention_days=7, rollup_retention_days=90)
    assert store.table_ttl("events") == "toDateTime(Timestamp) + toIntervalDay(7)"
    assert store.table_ttl("alerts") == "toDateTime(Timestamp) + toIntervalDay(7)"
    # the ledger rows of `rollups` as long as the events, its counts as long as the rollups
    assert store.table_ttl("rollups") == ("toDateTime(bucket) + toIntervalDay(7) WHERE kind = 'batch', "
                                          "toDateTime(bucket) + toIntervalDay(90) WHERE kind != 'batch'")

    changed = make_store(retention_days=3, rollup_retention_days=0, dedup_window=500)
    assert changed.table_ttl("events") == "toDateTime(Timestamp) + toIntervalDay(3)"
    assert changed.table_ttl("rollups") == "toDateTime(bucket) + toIntervalDay(3) WHERE kind = 'batch'"
    assert changed.table_setting("events", "non_replicated_deduplication_window") == "500"

    # Rows older than the retention are gone; recent ones stay.
    old = synthetic_records(
        10, node="old", base_ns=(changed.rows("SELECT toUnixTimestamp(now())")[0][0] - 5 * 86400) * 10**9
    )
    new = synthetic_records(10, node="new")
    Sink(changed).insert_rows(old + new)
    changed.command("OPTIMIZE TABLE events FINAL")
    assert changed.rows("SELECT node, count() FROM events GROUP BY node") == [("new", 10)]
    assert make_store(retention_days=0, rollup_retention_days=0).table_ttl("rollups") is None


def test_errors_are_translated(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(StoreError) as e:
        store.rows("SELECT * FROM no_such_table")
    assert e.value.code == 60 and not isinstance(e.value, StoreUnavailable)


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="cannot open ClickHouse"):
        open_store(StoreConfig(url="http://127.0.0.1:9/armorstream"))


def test_config_needs_one_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError):
        StoreConfig()
    with pytest.raises(StoreError):
        StoreConfig(path=tmp_path, database="bad-name")
    monkeypatch.setenv("CLICKHOUSE_URL", "http://u:p@h:8123/db1")
    config = StoreConfig.from_env(tmp_path)
    assert (config.path, config.database) == (None, "db1")
