"""Batch reader of BPF ring buffers straight from their shared memory: no call per record.

libbpf's ring_buffer__poll calls back into Python once per record (a ctypes round trip,
about two thirds of the sensor's CPU per event). This reader maps the ring as the kernel
lays it out (kernel/bpf/ringbuf.c, libbpf src/ringbuf.c) and walks it itself:

    offset 0          consumer page: consumer_pos (u64), ours to write (RW)
    offset PAGE       producer page: producer_pos (u64), the kernel's (RO)
    offset 2 * PAGE   data, `size` bytes mapped twice in a row (RO), so a record that
                      wraps past the end is still contiguous

A record is an 8-byte header {u32 len, u32 page offset} then `len` bytes, padded to 8.
`len` carries BUSY (reserved, not committed yet) and DISCARD (committed, to be skipped).
Everything between consumer_pos and producer_pos is reserved; the walk stops at the
first busy record (records are released in order) and advances consumer_pos once.

Records of one kind have one size, so a stretch of same-length headers is taken as one
strided numpy copy (a file ring under an open storm is one stretch); mixed stretches
fall back to a short loop of memoryview slices.

Memory order: the kernel publishes producer_pos and each header with release stores; the
reader must load them with acquire semantics. On x86-64 (TSO) every plain load is an
acquire and every plain store a release, so numpy/struct reads and one aligned 8-byte
store of consumer_pos are enough. Other architectures use the callback reader.
"""

from __future__ import annotations

import errno
import mmap
import platform
import select
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np

from sensor.libbpf import BPF_MAP_TYPE_RINGBUF, BpfError, Map, RecordBuffers

__all__ = [
    "BUSY_BIT",
    "DISCARD_BIT",
    "HDR_SIZE",
    "MmapRing",
    "mmap_supported",
    "walk",
]

BUSY_BIT: Final = 1 << 31  # BPF_RINGBUF_BUSY_BIT
DISCARD_BIT: Final = 1 << 30  # BPF_RINGBUF_DISCARD_BIT
HDR_SIZE: Final = 8  # BPF_RINGBUF_HDR_SZ
_LEN_MASK: Final = DISCARD_BIT - 1
_RUN_MIN: Final = 8  # same-length records ahead before one numpy copy beats the loop

_u32 = struct.Struct("<I").unpack_from


def mmap_supported() -> bool:
    """Plain loads and stores are acquire/release only on a TSO machine (see module doc)."""
    return platform.machine() in ("x86_64", "AMD64")


def walk(
    data: np.ndarray, mask: int, cons: int, prod: int, pending: list[bytearray], budget: int
) -> tuple[int, int, int]:
    """Append every committed record in [cons, prod) to pending[kind] (kind: the record's
    first byte), in ring order; stop at a busy record, or after the record that brings the
    bytes taken to `budget`. `data` is the doubly mapped data area (uint8, 2 * (mask + 1)).

    Returns (new consumer position, records taken, bytes taken). Pure: reads `data` only.
    """
    mv = memoryview(data)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    # Records taken one at a time are kept as views and joined per kind (one copy, one
    # append): growing a bytearray record by record reallocates and copies it again and again.
    singles: dict[int, list[memoryview]] = {}
    taken = n = 0
    while cons < prod and taken < budget:
        off = cons & mask
        (length,) = _u32(mv, off)
        if length & BUSY_BIT:
            break
        size = length & _LEN_MASK
        step = (size + HDR_SIZE + 7) & ~7
        if length & DISCARD_BIT:
            cons += step
            continue
        if (
            size
            and cons + _RUN_MIN * step <= prod
            and _u32(mv, off + step)[0] == length
            and _u32(mv, off + 2 * step)[0] == length
            and (ahead := min((prod - cons) // step, -(-(budget - taken) // size))) >= _RUN_MIN
        ):
            _flush(singles, pending)  # keep each kind in ring order
            rows = data[off : off + ahead * step].reshape(ahead, step)
            same = rows[:, :4].view("<u4")[:, 0] == length
            run = ahead if same.all() else int(same.argmin())
            body = rows[:run, HDR_SIZE : HDR_SIZE + size]
            kinds = body[:, 0]
            first = int(kinds[0])
            if (kinds == first).all():
                pending[first] += body.tobytes()
            else:  # e.g. fork and exit records, both 88 bytes: split, each kind in ring order
                for kind in np.unique(kinds).tolist():
                    pending[kind] += body[kinds == kind].tobytes()
            cons += run * step
            n += run
            taken += run * size
            continue
        rec = mv[off + HDR_SIZE : off + HDR_SIZE + size]
        kind = rec[0]
        if kind in singles:
            singles[kind].append(rec)
        else:
            singles[kind] = [rec]
        cons += step
        n += 1
        taken += size
    _flush(singles, pending)
    mv.release()
    return cons, n, taken


def _flush(singles: dict[int, list[memoryview]], pending: list[bytearray]) -> None:
    for kind, views in singles.items():
        pending[kind] += b"".join(views)
        for v in views:
            v.release()
    singles.clear()


@dataclass
class _Mapped:
    """One ring's two mappings and the numpy views over them."""

    name: str
    fd: int
    mask: int
    meta: mmap.mmap  # consumer page (RW)
    ro: mmap.mmap  # producer page + data twice (RO)
    consumer: np.ndarray | None  # u64[1] over the consumer page
    producer: np.ndarray | None  # u64[1] over the producer page
    data: np.ndarray | None  # uint8[2 * size]

    @classmethod
    def open(cls, m: Map) -> _Mapped:
        kind, size = m.kernel_info()
        if kind != BPF_MAP_TYPE_RINGBUF:
            raise BpfError(f"map type {kind} is not a ring buffer", errno.EINVAL, m.name)
        if size <= 0 or size & (size - 1):
            raise BpfError(f"ring size {size} is not a power of two", errno.EINVAL, m.name)
        page = mmap.PAGESIZE
        fd = m.fd
        try:
            meta = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except OSError as e:
            raise BpfError("mmap consumer page", e.errno or errno.EINVAL, m.name) from None
        try:
            ro = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as e:
            meta.close()
            raise BpfError("mmap producer page and data", e.errno or errno.EINVAL, m.name) from None
        return cls(
            name=m.name,
            fd=fd,
            mask=size - 1,
            meta=meta,
            ro=ro,
            consumer=np.frombuffer(meta, dtype="<u8", count=1),
            producer=np.frombuffer(ro, dtype="<u8", count=1),
            data=np.frombuffer(ro, dtype=np.uint8, count=2 * size, offset=page),
        )

    def close(self) -> None:
        self.consumer = self.producer = self.data = None  # drop the exports before unmapping
        self.meta.close()
        self.ro.close()


class MmapRing(RecordBuffers):
    """One or more BPF ring buffers read from shared memory, with libbpf RingBuffer's API.

    Records are appended, raw, to `pending[kind]`; a consume stops once `held` reaches
    `high_water` (the caller ships, then consumes again). `poll` sleeps in epoll on the
    rings' fds when there is nothing to read, so an idle sensor costs nothing.
    """

    def __init__(self, maps: list[Map], high_water: int = 4 << 20) -> None:
        if not maps:
            raise BpfError("ring buffer needs a map", errno.EINVAL)
        if not mmap_supported():
            raise BpfError(f"mmap ring reader needs x86-64, not {platform.machine()}", errno.ENOTSUP)
        super().__init__(high_water)
        self._where = ", ".join(m.name for m in maps)
        self._rings: list[_Mapped] = []
        self._epoll: select.epoll | None = select.epoll()
        try:
            for m in maps:
                ring = _Mapped.open(m)
                self._rings.append(ring)
                self._epoll.register(ring.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def consume(self) -> int:
        """Take whatever is committed now, without waiting; returns how many records."""
        total = 0
        for r in self._rings:
            budget = self.high_water - self.held
            if budget <= 0:
                break
            if r.consumer is None or r.producer is None or r.data is None:
                raise BpfError("ring buffer is closed", errno.EBADF, self._where)
            cons = int(r.consumer[0])
            new, n, taken = walk(r.data, r.mask, cons, int(r.producer[0]), self.pending, budget)
            if new != cons:
                r.consumer[0] = new  # one aligned 8-byte store: a release on x86-64
            total += n
            self.held += taken
        return total

    def poll(self, timeout_ms: int) -> int:
        """Take what is there; if nothing, wait up to timeout_ms for records, then take them."""
        n = self.consume()
        if n or self.held >= self.high_water:
            return n
        if self._epoll is None:
            raise BpfError("ring buffer is closed", errno.EBADF, self._where)
        if self._epoll.poll(max(timeout_ms, 0) / 1000 if timeout_ms >= 0 else -1):
            return self.consume()
        return 0

    def positions(self) -> list[tuple[int, int]]:
        """(consumer_pos, producer_pos) of each ring, for tests and diagnostics."""
        return [
            (int(r.consumer[0]), int(r.producer[0]))
            for r in self._rings
            if r.consumer is not None and r.producer is not None
        ]

    def fileno(self) -> int:
        """The epoll fd: readable when a ring has data (for an event loop's add_reader)."""
        if self._epoll is None:
            raise BpfError("ring buffer is closed", errno.EBADF, self._where)
        return self._epoll.fileno()

    def close(self) -> None:
        for r in self._rings:
            r.close()
        self._rings.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
