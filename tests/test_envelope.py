"""Batch envelope: round trips, framing at awkward boundaries, every malformed case, fuzzing;
plus the column helpers of enforcer.records on decoded batches."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import envelope, records
from enforcer.envelope import BatchReader, decode_batch, decode_header, encode_batch, frame_length
from enforcer.errors import RecordError
from enforcer.records import DTYPES, Kind


def make_records(kind: int, n: int, seed: int = 0) -> np.ndarray:
    """n well-formed records of `kind` with varied contents, built through the dtype."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[kind]
    recs = np.zeros(n, dtype=dt)
    h = recs["hdr"]
    h["kind"] = kind
    h["version"] = records.AS_SCHEMA_VERSION
    h["size"] = dt.itemsize
    h["ktime_ns"] = rng.integers(0, 1 << 62, n, dtype=np.uint64)
    h["cgroup_id"] = rng.integers(1, 1 << 40, n, dtype=np.uint64)
    h["host_pid"] = rng.integers(1, 1 << 22, n, dtype=np.uint32)
    h["pid"] = rng.integers(1, 1 << 15, n, dtype=np.uint32)
    h["uid"] = rng.integers(0, 70000, n, dtype=np.uint32)
    h["ret"] = -rng.integers(0, 40, n, dtype=np.int32)
    h["comm"] = [f"comm{i % 97}".encode() for i in range(n)]
    return recs


def recrc(buf: bytearray) -> bytearray:
    """Recompute the CRC as docs/records.md defines it (all bytes but the CRC field)."""
    struct.pack_into("<I", buf, 36, zlib.crc32(bytes(buf[40:]), zlib.crc32(bytes(buf[:36]))))
    return buf


@pytest.mark.parametrize("kind", sorted(DTYPES), ids=lambda k: Kind(k).name)
@pytest.mark.parametrize("n", [0, 1, 37])
def test_round_trip(kind: int, n: int) -> None:
    recs = make_records(kind, n, seed=kind)
    msg = encode_batch(kind, recs.tobytes(), node="node-a.example", seq=42, boot_wall_ns=-5, flags=1)
    hdr, got = decode_batch(msg)
    assert (hdr.kind, hdr.count, hdr.seq, hdr.node, hdr.boot_wall_ns, hdr.flags) == (
        kind, n, 42, "node-a.example", -5, 1,
    )  # fmt: skip
    assert hdr.version == records.AS_SCHEMA_VERSION
    assert hdr.record_size == DTYPES[kind].itemsize
    assert hdr.length == len(msg)
    assert hdr.header_len % 8 == 0
    assert got.dtype == DTYPES[kind]
    assert got.tobytes() == recs.tobytes()
    assert decode_header(msg) == hdr
    assert frame_length(msg) == len(msg)


def test_decode_is_zero_copy() -> None:
    msg = encode_batch(Kind.EXEC, make_records(Kind.EXEC, 3).tobytes(), node="n", seq=0)
    _, got = decode_batch(msg)
    assert np.shares_memory(got, np.frombuffer(msg, np.uint8))


def test_accepts_memoryview_of_ring_bytes() -> None:
    raw = bytearray(make_records(Kind.NET, 5).tobytes())
    msg = encode_batch(Kind.NET, memoryview(raw), node="n", seq=1)
    assert decode_batch(bytearray(msg))[1].tobytes() == bytes(raw)


def test_node_name_utf8_and_longest() -> None:
    for node in ("ü-node", "x" * envelope.NODE_MAX):
        assert decode_header(encode_batch(Kind.CAP, b"", node=node, seq=0)).node == node


# ---- framing ---------------------------------------------------------------------------
def stream_of_batches() -> tuple[bytes, list[bytes]]:
    msgs = [
        encode_batch(k, make_records(k, n, seed=n).tobytes(), node=f"node{n}", seq=n)
        for n, k in enumerate([Kind.EXEC, Kind.FILE, Kind.LOST, Kind.NET, Kind.EXIT, Kind.EXEC], start=0)
    ]
    return b"".join(msgs), msgs


@pytest.mark.parametrize("chunk", [1, 10, 43, 44, 45, 4096])
def test_reader_fixed_chunks(chunk: int) -> None:
    data, msgs = stream_of_batches()
    reader = BatchReader()
    out: list[bytes] = []
    for i in range(0, len(data), chunk):
        out += reader.feed(data[i : i + chunk])
    reader.close()
    assert out == msgs
    assert [decode_batch(m)[0].seq for m in out] == list(range(len(msgs)))


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
@settings(max_examples=60, deadline=None)
def test_reader_random_splits(cuts: list[int]) -> None:
    data, msgs = stream_of_batches()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reader = BatchReader()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += reader.feed(data[a:b])
    reader.close()
    assert out == msgs


def test_reader_truncated_tail() -> None:
    data, msgs = stream_of_batches()
    reader = BatchReader()
    assert reader.feed(data[:-3]) == msgs[:-1]
    assert reader.pending == len(msgs[-1]) - 3
    with pytest.raises(RecordError, match="truncated batch"):
        reader.close()


def test_reader_garbage_between_batches() -> None:
    _, msgs = stream_of_batches()
    reader = BatchReader()
    with pytest.raises(RecordError, match="bad magic"):
        reader.feed(msgs[0] + b"XXXX" + msgs[1])


# ---- malformed input: each reason precisely ---------------------------------------------
def good(kind: int = Kind.EXEC, n: int = 2) -> bytearray:
    return bytearray(encode_batch(kind, make_records(kind, n).tobytes(), node="node-1", seq=7))


def test_bad_magic() -> None:
    b = good()
    b[0:4] = b"ASB9"
    with pytest.raises(RecordError, match="bad magic"):
        decode_batch(recrc(b))
    with pytest.raises(RecordError, match="bad magic"):
        frame_length(b"AX")


def test_unknown_version() -> None:
    b = good()
    struct.pack_into("<H", b, 4, 99)
    with pytest.raises(RecordError, match="unknown schema version 99"):
        decode_batch(recrc(b))


def test_unknown_kind() -> None:
    b = good()
    struct.pack_into("<H", b, 6, 250)
    with pytest.raises(RecordError, match="unknown record kind 250"):
        decode_batch(recrc(b))
    with pytest.raises(RecordError, match="unknown record kind 0"):
        encode_batch(0, b"", node="n", seq=0)


def test_record_size_mismatch() -> None:
    # A sensor built from another header: same kind, different size, consistent length.
    recs = make_records(Kind.EXIT, 3).tobytes()
    b = bytearray(encode_batch(Kind.EXIT, recs, node="n", seq=0))
    struct.pack_into("<I", b, 8, 96)
    b += b"\0" * (3 * 8)
    with pytest.raises(RecordError, match="record size 96 does not match EXIT size 88"):
        decode_batch(recrc(b))
    with pytest.raises(RecordError, match="not a multiple of the EXIT size 88"):
        encode_batch(Kind.EXIT, recs[:-1], node="n", seq=0)


def test_count_vs_length() -> None:
    b = good(n=2)
    struct.pack_into("<I", b, 12, 3)
    with pytest.raises(RecordError, match="truncated batch"):
        decode_batch(recrc(b))
    b = good(n=2)
    struct.pack_into("<I", b, 12, 1)
    with pytest.raises(RecordError, match="1144 bytes after 1 records"):
        decode_batch(recrc(b))


@pytest.mark.parametrize("cut", [0, 3, 43, 50, 100, 1000])
def test_truncated(cut: int) -> None:
    with pytest.raises(RecordError, match="truncated"):
        decode_batch(bytes(good()[:cut]))


def test_crc_mismatch() -> None:
    b = good()
    b[-1] ^= 0x01
    with pytest.raises(RecordError, match="CRC mismatch"):
        decode_batch(b)
    b = good()
    struct.pack_into("<Q", b, 16, 8)  # the sequence number is covered too
    with pytest.raises(RecordError, match="CRC mismatch"):
        decode_batch(b)


def test_node_name_too_long() -> None:
    with pytest.raises(RecordError, match="node name is 254 bytes, at most 253"):
        encode_batch(Kind.EXEC, b"", node="x" * 254, seq=0)
    b = good()
    struct.pack_into("<H", b, 40, 300)
    with pytest.raises(RecordError, match="node name length 300 exceeds 253"):
        decode_batch(recrc(b))


def test_header_length_inconsistent() -> None:
    b = good()
    struct.pack_into("<H", b, 42, 64)
    with pytest.raises(RecordError, match="header length 64 does not match"):
        decode_batch(recrc(b))


def test_node_not_utf8_and_dirty_padding() -> None:
    b = good()  # node "node-1": 6 bytes at 44..50, padding 50..56
    b[44] = 0xFF
    with pytest.raises(RecordError, match="node name is not UTF-8"):
        decode_batch(recrc(b))
    b = good()
    b[52] = 1
    with pytest.raises(RecordError, match="non-zero header padding"):
        decode_batch(recrc(b))


@pytest.mark.parametrize("field", ["kind", "version", "size"])
def test_record_header_disagrees_with_batch(field: str) -> None:
    recs = make_records(Kind.FILE, 4)
    recs["hdr"][field][2] = 77
    msg = encode_batch(Kind.FILE, recs.tobytes(), node="n", seq=0)
    with pytest.raises(RecordError, match=f"record 2 has {field} 77, unlike its batch"):
        decode_batch(msg)


def test_too_large() -> None:
    b = good()
    struct.pack_into("<I", b, 12, 1 << 30)
    with pytest.raises(RecordError, match="exceeds"):
        frame_length(b)


def test_encode_range_checks() -> None:
    with pytest.raises(RecordError, match="64 bits"):
        encode_batch(Kind.EXEC, b"", node="n", seq=-1)
    with pytest.raises(RecordError, match="out of range"):
        encode_batch(Kind.EXEC, b"", node="n", seq=0, flags=1 << 32)


# ---- fuzzing ------------------------------------------------------------------------------
@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_random_bytes_only_record_error(data: bytes) -> None:
    for candidate in (data, envelope.MAGIC + data):
        with contextlib.suppress(RecordError):
            decode_batch(candidate)
        reader = BatchReader()
        with contextlib.suppress(RecordError):
            reader.feed(candidate)
            reader.close()


@given(pos=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
@settings(max_examples=300, deadline=None)
def test_any_single_byte_change_is_caught(pos: int, xor: int) -> None:
    b = good(Kind.NET, 3)
    b[pos % len(b)] ^= xor
    with pytest.raises(RecordError):
        decode_batch(b)


# ---- columns ------------------------------------------------------------------------------
def test_columns_are_views_without_padding() -> None:
    recs = make_records(Kind.EXEC, 4)
    cols = records.columns(recs)
    assert list(cols)[:3] == ["kind", "version", "size"]
    assert "_pad0" not in cols and "hdr" not in cols
    assert set(cols) >= {"pid", "cgroup_id", "path", "args", "exe_uid"}
    cols["pid"][1] = 4242
    assert recs["hdr"]["pid"][1] == 4242


def exec_with_args(argvs: list[list[bytes]]) -> np.ndarray:
    recs = make_records(Kind.EXEC, len(argvs))
    for i, av in enumerate(argvs):
        blob = b"".join(a + b"\0" for a in av)
        recs["args"][i] = blob
        recs["args_len"][i] = len(blob)
        recs["argc"][i] = len(av)
    return recs


def test_args_joined_and_argv() -> None:
    recs = exec_with_args([[b"/bin/ls", b"-l", b"/tmp dir"], [b"true"], [], [b"a", b"", b"b"], [b"x", b""]])
    assert records.args_joined(recs).tolist() == [b"/bin/ls -l /tmp dir", b"true", b"", b"a  b", b"x "]
    assert records.argv(recs) == [["/bin/ls", "-l", "/tmp dir"], ["true"], [], ["a", "", "b"], ["x", ""]]
    # A strided selection takes the non-contiguous path and must agree.
    assert records.args_joined(recs[::2]).tolist() == [b"/bin/ls -l /tmp dir", b"", b"x "]


def test_args_ignore_bytes_past_args_len() -> None:
    recs = exec_with_args([[b"sh", b"-c"]])
    recs["args"][0] = b"sh\0-c\0\0\0\0\0junk"  # stale ring-buffer bytes past args_len
    assert records.args_joined(recs).tolist() == [b"sh -c"]
    assert records.argv(recs) == [["sh", "-c"]]


def test_text_replaces_bad_utf8() -> None:
    recs = make_records(Kind.FILE, 2)
    recs["path"] = [b"/etc/passwd", b"/tmp/\xff"]
    assert records.text(recs["path"]) == ["/etc/passwd", "/tmp/\ufffd"]


def test_ip_strings() -> None:
    recs = np.zeros(5, dtype=records.NET_DTYPE)
    recs["family"] = [socket.AF_INET, socket.AF_INET6, socket.AF_INET, socket.AF_UNIX, socket.AF_INET]
    recs["daddr"][0, :4] = [127, 0, 0, 1]
    recs["daddr"][1] = np.frombuffer(socket.inet_pton(socket.AF_INET6, "fd00::1:2"), np.uint8)
    recs["daddr"][2, :4] = [10, 96, 0, 10]
    recs["daddr"][4, :4] = [127, 0, 0, 1]
    assert records.ip_strings(recs["family"], recs["daddr"]) == [
        "127.0.0.1", "fd00::1:2", "10.96.0.10", "", "127.0.0.1",
    ]  # fmt: skip
    assert records.ip_strings(recs["family"][:0], recs["daddr"][:0]) == []


def test_wall_clock() -> None:
    recs = make_records(Kind.EXIT, 2)
    recs["hdr"]["ktime_ns"] = [5, 1_000]
    assert records.wall_clock_ns(recs, 1_700_000_000_000_000_000).tolist() == [
        1_700_000_000_000_000_005, 1_700_000_000_000_001_000,
    ]  # fmt: skip
