"""Versioned batch envelope: one Kafka message (or spool frame) = small header + N records.

Sans-I/O: bytes in, a header and a zero-copy numpy view out. One kind per batch (the
sensor drains one ring buffer per concern). Byte format: docs/records.md.

    offset size  field
    0      4     magic b"ASB1"
    4      2     schema version (AS_SCHEMA_VERSION of the records)
    6      2     record kind (enum as_kind)
    8      4     record size in bytes (sizeof the C struct)
    12     4     record count
    16     8     batch sequence (per node and kind, from 0)
    24     8     boot_wall_ns: wall-clock ns at boot; record wall time = this + hdr.ktime_ns
    32     4     flags (BATCH_F_*)
    36     4     CRC32 of every byte of the message except these four
    40     2     node name length in bytes (UTF-8, at most NODE_MAX)
    42     2     header length: 44 + node length, rounded up to 8; records start here
    44     n     node name, then zero padding to the header length
    ...          count * record size bytes of records

Every integer is little-endian. The message is exactly header length + count * size
bytes long, so concatenated envelopes frame themselves (`BatchReader`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np

from enforcer.errors import RecordError
from enforcer.records import AS_SCHEMA_VERSION, DTYPES, Kind

__all__ = [
    "BATCH_F_REPLAYED",
    "FIXED_LEN",
    "MAGIC",
    "MAX_BATCH_BYTES",
    "NODE_MAX",
    "BatchHeader",
    "BatchReader",
    "decode_batch",
    "decode_header",
    "encode_batch",
    "frame_length",
]

MAGIC: Final = b"ASB1"
_FIXED = struct.Struct("<4sHHIIQqIIHH")
FIXED_LEN: Final = _FIXED.size  # 44
_CRC_AT: Final = 36
NODE_MAX: Final = 253  # a Kubernetes node name is a DNS subdomain: at most 253 bytes
# Refuse absurd lengths before buffering them (Kafka's default message limit is 1 MiB).
MAX_BATCH_BYTES: Final = 64 << 20

BATCH_F_REPLAYED: Final = 1 << 0  # sent from the disk spool after the broker came back


@dataclass(frozen=True, slots=True)
class BatchHeader:
    version: int
    kind: int
    record_size: int
    count: int
    seq: int
    boot_wall_ns: int
    flags: int
    crc32: int
    node: str
    header_len: int

    @property
    def length(self) -> int:
        """Total bytes of the message: header plus records."""
        return self.header_len + self.count * self.record_size


def _header_len(node_len: int) -> int:
    return (FIXED_LEN + node_len + 7) & ~7


def _crc(buf: memoryview) -> int:
    return zlib.crc32(buf[_CRC_AT + 4 :], zlib.crc32(buf[:_CRC_AT]))


def encode_batch(
    kind: int,
    records: bytes | bytearray | memoryview,
    *,
    node: str,
    seq: int,
    boot_wall_ns: int = 0,
    flags: int = 0,
) -> bytes:
    """Wrap raw records of one kind (as the ring buffer delivered them) in an envelope."""
    dtype = DTYPES.get(kind)
    if dtype is None:
        raise RecordError(f"unknown record kind {kind}")
    body = memoryview(records).cast("B")
    size = dtype.itemsize
    if len(body) % size:
        raise RecordError(f"{len(body)} record bytes are not a multiple of the {Kind(kind).name} size {size}")
    node_b = node.encode()
    if len(node_b) > NODE_MAX:
        raise RecordError(f"node name is {len(node_b)} bytes, at most {NODE_MAX}")
    hlen = _header_len(len(node_b))
    if hlen + len(body) > MAX_BATCH_BYTES:
        raise RecordError(f"batch of {hlen + len(body)} bytes exceeds {MAX_BATCH_BYTES}")
    if not 0 <= seq < 1 << 64:
        raise RecordError(f"batch sequence {seq} does not fit in 64 bits")
    if not -(1 << 63) <= boot_wall_ns < 1 << 63 or not 0 <= flags < 1 << 32:
        raise RecordError("boot_wall_ns or flags out of range")
    out = bytearray(hlen + len(body))
    _FIXED.pack_into(
        out, 0, MAGIC, AS_SCHEMA_VERSION, kind, size, len(body) // size, seq, boot_wall_ns,
        flags, 0, len(node_b), hlen,
    )  # fmt: skip
    out[FIXED_LEN : FIXED_LEN + len(node_b)] = node_b
    out[hlen:] = body
    struct.pack_into("<I", out, _CRC_AT, _crc(memoryview(out)))
    return bytes(out)


def frame_length(buf: bytes | bytearray | memoryview) -> int | None:
    """Length of the envelope at the start of `buf`, or None if its fixed header is incomplete.

    Checks only what is needed to frame (magic, sizes), so a reader knows how much to wait for.
    """
    view = memoryview(buf).cast("B")
    if len(view) < FIXED_LEN:
        if bytes(view[: len(MAGIC)]) != MAGIC[: len(view)]:
            raise RecordError("bad magic: not an armorstream batch")
        return None
    magic, _, _, size, count, _, _, _, _, node_len, hlen = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise RecordError("bad magic: not an armorstream batch")
    if node_len > NODE_MAX:
        raise RecordError(f"node name length {node_len} exceeds {NODE_MAX}")
    if hlen != _header_len(node_len):
        raise RecordError(f"header length {hlen} does not match node name length {node_len}")
    total = hlen + count * size
    if total > MAX_BATCH_BYTES:
        raise RecordError(f"batch of {total} bytes exceeds {MAX_BATCH_BYTES}")
    return int(total)


def decode_header(buf: bytes | bytearray | memoryview) -> BatchHeader:
    """Parse and check the header against the buffer's length (the CRC is checked by decode_batch)."""
    view = memoryview(buf).cast("B")
    if len(view) < FIXED_LEN:
        raise RecordError(f"truncated header: {len(view)} bytes, need {FIXED_LEN}")
    total = frame_length(view)
    assert total is not None
    _, version, kind, size, count, seq, boot_wall, flags, crc, node_len, hlen = _FIXED.unpack_from(view)
    if version != AS_SCHEMA_VERSION:
        raise RecordError(f"unknown schema version {version} (this build reads {AS_SCHEMA_VERSION})")
    dtype = DTYPES.get(kind)
    if dtype is None:
        raise RecordError(f"unknown record kind {kind}")
    if size != dtype.itemsize:
        raise RecordError(f"record size {size} does not match {Kind(kind).name} size {dtype.itemsize}")
    if len(view) < total:
        raise RecordError(f"truncated batch: {len(view)} bytes, header and {count} records need {total}")
    if len(view) > total:
        raise RecordError(f"{len(view) - total} bytes after {count} records")
    if any(view[FIXED_LEN + node_len : hlen]):
        raise RecordError("non-zero header padding")
    try:
        node = bytes(view[FIXED_LEN : FIXED_LEN + node_len]).decode()
    except UnicodeDecodeError as e:
        raise RecordError(f"node name is not UTF-8: {e.reason}") from None
    return BatchHeader(version, kind, size, count, seq, boot_wall, flags, crc, node, hlen)


def decode_batch(buf: bytes | bytearray | memoryview) -> tuple[BatchHeader, np.ndarray]:
    """Check a whole message and view its records as the kind's dtype (zero-copy, read-only
    for immutable buffers). Each record's own header must agree with the batch's."""
    view = memoryview(buf).cast("B")
    hdr = decode_header(view)
    crc = _crc(view)
    if crc != hdr.crc32:
        raise RecordError(f"CRC mismatch: header says {hdr.crc32:#010x}, bytes give {crc:#010x}")
    recs = np.frombuffer(view, dtype=DTYPES[hdr.kind], count=hdr.count, offset=hdr.header_len)
    if hdr.count:
        rh = recs["hdr"]
        _first_bad(rh["kind"] != hdr.kind, rh["kind"], "kind")
        _first_bad(rh["version"] != hdr.version, rh["version"], "version")
        _first_bad(rh["size"] != hdr.record_size, rh["size"], "size")
    return hdr, recs


def _first_bad(bad: np.ndarray, values: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise RecordError(f"record {i} has {what} {int(values[i])}, unlike its batch")


class BatchReader:
    """Incremental framing of concatenated envelopes (spool segments, streams).

    `feed()` returns every complete message (as bytes) the data completed; `close()`
    raises if a partial message is left over.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        start = 0
        with memoryview(self._buf) as view:  # released before the buffer is resized
            while (n := frame_length(view[start:])) is not None and len(view) - start >= n:
                out.append(bytes(view[start : start + n]))
                start += n
        del self._buf[:start]
        return out

    @property
    def pending(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    def close(self) -> None:
        if self._buf:
            raise RecordError(f"truncated batch: {len(self._buf)} bytes at end of stream")
