"""Row-wise vs column-wise (Arrow) inserts of the same event rows into the embedded store.

    .venv/bin/python bench/clickhouse_insert.py [--rows 100000] [--batch 25000] [--path DIR]

Both runs insert the same rows in the same batches into `events` (so the alerts view, the
rollups and the batch ledger do their work in both), each into its own fresh database.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pyarrow as pa  # noqa: E402

from stream.store import EVENT_COLUMNS, Sink, StoreConfig, open_store, rows_to_table  # noqa: E402
from stream.store.testdata import synthetic_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=25_000)
    ap.add_argument("--path", type=Path, default=None, help="chdb data directory (default: a temporary one)")
    args = ap.parse_args()

    records = synthetic_records(args.rows, batch_size=1000)
    table = rows_to_table(records)
    names = [c.name for c in EVENT_COLUMNS]
    # Row-wise input as a row-oriented caller would hold it (values in schema order).
    rows = list(zip(*(table[n].to_pylist() for n in names), strict=True))
    batches = range(0, args.rows, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp)
        with open_store(StoreConfig(path=path, database="bench_warmup")) as store:
            Sink(store).insert(table.slice(0, 1000))  # engine start-up and first-insert costs
        with open_store(StoreConfig(path=path, database="bench_rows")) as store:
            t0 = time.perf_counter()
            for i in batches:
                store.client.insert("events", rows[i : i + args.batch], column_names=names)
            row_s = time.perf_counter() - t0
            assert store.rows("SELECT count() FROM events")[0][0] == args.rows
        with open_store(StoreConfig(path=path, database="bench_arrow")) as store:
            sink = Sink(store)
            t0 = time.perf_counter()
            for i in batches:
                sink.insert(table.slice(i, args.batch))
            col_s = time.perf_counter() - t0
            assert store.rows("SELECT count() FROM events")[0][0] == args.rows

    row_rate, col_rate = args.rows / row_s, args.rows / col_s
    print(f"rows={args.rows} batch={args.batch} columns={len(names)} pyarrow={pa.__version__}")
    print(f"row-wise insert      {row_rate:>12,.0f} rows/s  ({row_s:.2f} s)")
    print(f"column-wise (Arrow)  {col_rate:>12,.0f} rows/s  ({col_s:.2f} s)")
    print(f"ratio                {col_rate / row_rate:>12.1f}x")


if __name__ == "__main__":
    main()
