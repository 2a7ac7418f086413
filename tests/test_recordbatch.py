"""Column-wise Kafka record batches (stream.recordbatch) against aiokafka's own builder and reader."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from aiokafka import codec
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import encode_varint

from stream.recordbatch import CODECS, Batcher, RecordColumns, zigzag_varints

HEADER = b"armorstream-event"
TS = 1_764_000_000_123


def _rows(n: int, seed: int = 7) -> list[tuple[bytes, bytes, bytes]]:
    rnd = random.Random(seed)
    # value sizes cross the 1-, 2- and 3-byte varint boundaries; keys up to 100 bytes (2-byte varint)
    return [(b"k" * rnd.choice([1, 9, 63, 64, 100]), b"v" * rnd.choice([0, 1, 63, 64, 8191, 8192, 70_000]),
             f"node-a/{i // 1000}/{i}".encode()) for i in range(n)]


def _reference(rows: list[tuple[bytes, bytes, bytes]], code: int, producer: tuple[int, int, int]) -> bytes:
    ref = DefaultRecordBatchBuilder(2, code, 0, *producer, batch_size=1 << 30)
    for j, (k, v, h) in enumerate(rows):
        assert ref.append(j, TS, k, v, [(HEADER.decode(), h)]) is not None
    return bytes(ref.build())


def _available() -> list[str | None]:
    checks = {"gzip": codec.has_gzip, "snappy": codec.has_snappy, "lz4": codec.has_lz4,
              "zstd": codec.has_zstd}
    return [None, *(name for name, has in checks.items() if has())]


@pytest.mark.parametrize("compression", _available())
def test_batches_are_byte_identical_to_aiokafkas(
    compression: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_764_000_000.0)  # gzip's header holds the time
    rows = _rows(3000)
    batcher = Batcher(HEADER, compression, max_bytes=256 * 1024)
    out = batcher.batches(RecordColumns.from_rows(rows), np.zeros(len(rows), np.int64), timestamp_ms=TS)
    assert len(out) > 5  # several batches, so offset deltas restart and 2-byte deltas occur
    assert all(len(b._build()) <= batcher.max_bytes for _, b in out)
    i = 0
    for partition, batch in out:
        n = batch.record_count()
        assert partition == 0 and n >= 1
        assert batch._build() == _reference(rows[i:i + n], CODECS[compression][0], (-1, -1, -1))
        i += n
    assert i == len(rows)


def test_producer_state_is_written_as_aiokafka_writes_it() -> None:
    rows = _rows(50)
    batcher = Batcher(HEADER, "zstd" if codec.has_zstd() else None)
    (_, batch), = batcher.batches(RecordColumns.from_rows(rows), np.zeros(50, np.int64), timestamp_ms=TS)
    before = batch._build()
    batch._set_producer_state(4242, 3, 1000)
    after = batch._build()
    assert after != before
    assert after == _reference(rows, CODECS["zstd" if codec.has_zstd() else None][0], (4242, 3, 1000))


def test_aiokafkas_reader_gets_every_record_back_per_partition_in_order() -> None:
    rows = _rows(400, seed=3)
    parts = np.array([[2, 0, 1][i % 3] if i % 7 else 2 for i in range(len(rows))])
    out = Batcher(HEADER, max_bytes=64 * 1024).batches(RecordColumns.from_rows(rows), parts)
    got: dict[int, list[tuple[bytes, bytes, bytes]]] = {}
    seen_parts = []
    for p, batch in out:
        seen_parts.append(p)
        records = MemoryRecords(batch._build())
        b = records.next_batch()
        assert b is not None and b.validate_crc() and records.next_batch() is None
        for j, r in enumerate(b):
            assert r.offset == j and r.timestamp == b.first_timestamp
            ((hk, hv),) = r.headers
            assert hk == HEADER.decode()
            got.setdefault(p, []).append((r.key, r.value, hv))
    assert seen_parts == sorted(seen_parts)  # each partition's batches together
    for p in (0, 1, 2):
        assert got[p] == [r for r, q in zip(rows, parts, strict=True) if q == p]


def test_a_record_larger_than_the_limit_goes_alone() -> None:
    rows = [(b"k", b"x" * 10, b"a"), (b"k", b"y" * 5000, b"b"), (b"k", b"z", b"c")]
    out = Batcher(HEADER, max_bytes=1000).batches(RecordColumns.from_rows(rows), np.zeros(3, np.int64))
    assert [b.record_count() for _, b in out] == [1, 1, 1]


@pytest.mark.skipif(not codec.has_zstd(), reason="needs cramjam's zstd")
def test_compressed_batches_grow_with_the_ratio_and_split_when_it_drops() -> None:
    # Compressible rows: after the first call the batcher packs far more than max_bytes of
    # records into one batch; incompressible rows then make it split batches again.
    batcher = Batcher(HEADER, "zstd", max_bytes=64 * 1024)
    value = b'{"Resource":"/etc/passwd","Data":"syscall=SYS_OPENAT"}' * 20
    easy = [(b"k", value, b"n/1/%d" % i) for i in range(4000)]
    first = batcher.batches(RecordColumns.from_rows(easy), np.zeros(4000, np.int64))
    assert batcher.ratio > 20
    second = batcher.batches(RecordColumns.from_rows(easy), np.zeros(4000, np.int64))
    assert len(second) < len(first) / 5
    noise = random.Random(5).randbytes
    hard = [(b"k", noise(1000), b"n/2/%d" % i) for i in range(2000)]
    out = batcher.batches(RecordColumns.from_rows(hard), np.zeros(2000, np.int64))
    assert batcher.resplit > 0
    assert all(len(b._build()) <= batcher.max_bytes for _, b in out)
    assert sum(b.record_count() for _, b in out) == 2000
    records = [r.value for _, b in out for r in MemoryRecords(b._build()).next_batch()]
    assert records == [v for _, v, _ in hard]


def test_zigzag_varints_match_aiokafkas_encoder() -> None:
    values = [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 1 << 20, (1 << 31) - 1, -(1 << 31), 12345, -777]
    expected = []
    for v in values:
        buf = bytearray()
        encode_varint(v, buf.append)
        expected.append(bytes(buf))
    assert zigzag_varints(np.array(values)).to_pylist() == expected
    one_byte = [bytes([2 * i]) for i in range(50)]
    assert zigzag_varints(np.arange(50)).to_pylist() == one_byte  # the one-byte path
    with pytest.raises(ValueError):
        zigzag_varints(np.array([1 << 31]))


def test_record_columns_filter_take_concat() -> None:
    rows = _rows(10)
    rc = RecordColumns.from_rows(rows)
    assert RecordColumns.concat([rc, RecordColumns.empty(), rc]).rows() == rows + rows
    assert rc.filter(np.arange(10) % 2 == 0).rows() == rows[::2]
    assert rc.take(np.array([3, 1])).rows() == [rows[3], rows[1]]
    assert len(RecordColumns.from_rows([])) == 0
    assert Batcher(HEADER).batches(RecordColumns.empty(), np.array([])) == []
