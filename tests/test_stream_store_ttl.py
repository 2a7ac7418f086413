"""The store reports the rows its TTL drops at insert (older than the retention) instead of counting
them as stored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stream.store import Sink, StoreConfig, open_store
from stream.store.testdata import synthetic_records

pytestmark = pytest.mark.clickhouse


def test_rows_older_than_the_retention_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_store(StoreConfig(path=tmp_path, retention_days=3)) as store:
        now = int(store.rows("SELECT toUnixTimestamp(now())")[0][0])
        old = synthetic_records(7, node="old", base_ns=(now - 5 * 86400) * 10**9)
        edge = synthetic_records(1, node="edge", base_ns=(now - 3 * 86400 + 600) * 10**9)  # 10 min left
        new = synthetic_records(10, node="new")
        sink = Sink(store)
        with caplog.at_level(logging.WARNING, logger="stream.store.sink"):
            result = sink.insert_rows(old + edge + new)
        assert (result.rows, result.expired_rows, result.skipped_rows) == (11, 7, 0)
        assert "7 of 18 rows are older than the 3-day retention" in caplog.text
        # What the result says is what ClickHouse kept, without waiting for a merge.
        assert sorted(store.rows("SELECT node, count() FROM events GROUP BY node")) == [
            ("edge", 1), ("new", 10)]
    with open_store(StoreConfig(path=tmp_path, retention_days=0)) as store:  # 0 keeps everything
        assert Sink(store).insert_rows(synthetic_records(3, node="old2", base_ns=10**18)).expired_rows == 0
