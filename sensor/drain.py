"""Drain BPF ring buffers into per-kind batches of raw record bytes, ready for the envelope.

No per-record Python objects: the ring reader appends raw bytes per kind, and a batch is
(kind, bytes, count). The reader maps the ring and walks it in batches (sensor.ringbuf);
libbpf's per-record callback (sensor.libbpf.RingBuffer) is kept as the baseline and for
machines where the mapped reader is not safe; `open_ring` picks one
(ARMORSTREAM_RING_READER=callback forces the baseline). Records the kernel could not reserve are read
from the per-CPU `as_drops` map and reported as LOST records in the same stream, so
the loss is visible downstream and not only in a metric.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from enforcer.records import AS_SCHEMA_VERSION, DTYPES, LOST_DTYPE, Kind
from sensor.libbpf import BpfError, Map, RingBuffer
from sensor.ringbuf import MmapRing, mmap_supported

__all__ = ["BPF_OUTPUT", "READERS", "Batch", "Drain", "Ring", "boot_wall_ns", "open_ring"]

BPF_OUTPUT: Final = Path(__file__).resolve().parent.parent / "bpf" / ".output"
_KIND_SLOTS: Final = 16  # AS_KIND_SLOTS in bpf/maps.bpf.h


Ring = MmapRing | RingBuffer
READERS: Final = ("mmap", "callback")


def open_ring(maps: list[Map], high_water: int = 4 << 20, reader: str | None = None) -> Ring:
    """A reader over `maps`: "mmap" (batch walk of the mapped ring, the default where it is
    safe) or "callback" (libbpf's ring_buffer__poll, one Python call per record)."""
    reader = (
        reader or os.environ.get("ARMORSTREAM_RING_READER") or ("mmap" if mmap_supported() else "callback")
    )
    if reader == "mmap":
        return MmapRing(maps, high_water)
    if reader == "callback":
        return RingBuffer(maps, high_water)
    raise BpfError(f"unknown ring reader {reader!r} (choose from {', '.join(READERS)})", errno.EINVAL)


@dataclass(frozen=True, slots=True)
class Batch:
    kind: int
    records: bytes
    count: int


def boot_wall_ns() -> int:
    """Wall-clock ns at boot: add a record's hdr.ktime_ns (CLOCK_BOOTTIME) to get its wall time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass
class Drain:
    """Turns what a RingBuffer collected into Batches; counts what it saw and what was lost."""

    ring: Ring
    drops: Map | None = None  # as_drops (per CPU, by kind)
    seen: dict[int, int] = field(default_factory=dict)  # records per kind
    lost_kernel: dict[int, int] = field(default_factory=dict)  # reserve failures per kind
    malformed_bytes: int = 0  # bytes of unknown kind or size (a sensor/header mismatch)

    def poll(self, timeout_ms: int = 100) -> list[Batch]:
        """Wait up to timeout_ms for records, then return everything collected."""
        self.ring.poll(timeout_ms)
        return self.take()

    def take(self) -> list[Batch]:
        out: list[Batch] = []
        lost = self._lost_records()
        if lost is not None:
            out.append(lost)
        for kind, raw in self.ring.take():
            dtype = DTYPES.get(kind)
            if dtype is None or len(raw) % dtype.itemsize:
                self.malformed_bytes += len(raw)
                continue
            n = len(raw) // dtype.itemsize
            self.seen[kind] = self.seen.get(kind, 0) + n
            out.append(Batch(kind, raw, n))
        return out

    def _lost_records(self) -> Batch | None:
        """One LOST record per kind whose drop counter grew: ret = records lost since the last one."""
        if self.drops is None:
            return None
        recs = []
        for kind, per_cpu in enumerate(self.drops.lookup_all_percpu(_KIND_SLOTS)):  # one syscall per tick
            total = sum(int.from_bytes(v, "little") for v in per_cpu)
            delta = total - self.lost_kernel.get(kind, 0)
            if delta > 0:
                self.lost_kernel[kind] = total
                recs.append((kind, delta))
        if not recs:
            return None
        arr = np.zeros(len(recs), dtype=LOST_DTYPE)
        h = arr["hdr"]
        h["kind"], h["version"], h["size"] = Kind.LOST, AS_SCHEMA_VERSION, LOST_DTYPE.itemsize
        h["ktime_ns"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        h["ret"] = [min(d, 2**31 - 1) for _, d in recs]
        names = {int(k): k.name for k in Kind}
        h["comm"] = [names.get(k, str(k)).encode() for k, _ in recs]  # the kind that was lost
        return Batch(Kind.LOST, arr.tobytes(), len(recs))
