"""Bounded, crash-safe on-disk spool of batches for the time the broker is unreachable.

Layout of the spool directory:

    00000000000000000007.seg   append-only segment files, oldest first
    cursor                     durable read cursor: two 32-byte slots written in turn
    lock                       flock()ed while a process owns the spool

Each entry is one frame, written with a single writev():

    offset size  field
    0      4     n: bytes of key + value
    4      4     CRC32 of bytes 8.. of the frame (key length, events, key, value)
    8      2     key length k
    10     4     events in the batch (for counters; the spool never parses the value)
    14     k     key (the Kafka message key: container identity)
    14+k   n-k   value (the batch envelope, opaque here)

A process killed mid-append leaves a torn frame at the tail of the newest segment; opening
the spool checks every frame of that segment and truncates at the first bad one. Entries
are replayed oldest first; `ack()` moves the durable cursor, and segments wholly behind it
are deleted. Delivery from the spool is at-least-once: an entry sent but not yet acked when
the process dies is sent again, so consumers drop repeats by the batch's (node, seq).

The bound counts the bytes of every segment file on disk. When an append would exceed it the
batch is dropped and counted (batches and events), never silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from enforcer.errors import ArmorstreamError

__all__ = ["FsyncPolicy", "Position", "Spool", "SpoolConfig", "SpoolEntry", "SpoolError", "SpoolStats"]

_FRAME: Final = struct.Struct("<IIHI")  # n, crc32, key length, events
_META: Final = struct.Struct("<HI")  # the CRC-covered part of the frame header
_CURSOR: Final = struct.Struct("<QQQI4x")  # generation, segment, offset, crc32 of the first 24 bytes
_SEG_SUFFIX: Final = ".seg"
_READ_CHUNK: Final = 1 << 20
MAX_KEY: Final = 0xFFFF


class SpoolError(ArmorstreamError):
    """The spool directory cannot be used (locked by another process, unreadable, bad config)."""


class FsyncPolicy(StrEnum):
    """When appended bytes and the cursor are forced to stable storage.

    A process crash (kill -9) loses nothing written under any policy: the page cache keeps it.
    The policy only matters for a machine crash or power loss.
    """

    NEVER = "never"  # leave it to the kernel's writeback
    ROLL = "roll"  # fsync a segment when it is sealed, and the cursor when a segment is deleted
    INTERVAL = "interval"  # additionally fsync at most every fsync_interval_s while appending/acking
    ALWAYS = "always"  # fsync every append and every ack (slow: one disk flush per batch)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    directory: Path
    max_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync: FsyncPolicy = FsyncPolicy.ROLL
    fsync_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096 or self.max_bytes < self.segment_bytes:
            raise SpoolError(
                f"spool needs segment_bytes >= 4096 and max_bytes >= segment_bytes "
                f"(got {self.segment_bytes} and {self.max_bytes})"
            )


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the spool: segment index and byte offset in it."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    key: bytes
    value: bytes
    events: int
    end: Position  # ack(end) acknowledges this entry and every one before it


@dataclass(slots=True)
class SpoolStats:
    appended_batches: int = 0
    appended_events: int = 0
    dropped_batches: int = 0  # spool full (or the disk refused the write)
    dropped_events: int = 0
    acked_batches: int = 0
    acked_events: int = 0
    torn_bytes: int = 0  # truncated from the tail when the spool was opened
    corrupt_batches: int = 0  # frames with a bad CRC before the tail, skipped on read


@dataclass(slots=True)
class _Segment:
    index: int
    size: int  # bytes of whole frames


@dataclass(slots=True)
class _Reader:
    pos: Position
    fd: int = -1
    fd_segment: int = -1
    unacked: deque[tuple[Position, int]] = field(default_factory=deque)


class Spool:
    """One process's spool. Not thread-safe: use it from one thread (the shipper's event loop)."""

    def __init__(self, config: SpoolConfig) -> None:
        self.config = config
        self.stats = SpoolStats()
        self._dir = config.directory
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolError(f"cannot use spool directory {self._dir}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolError(f"spool {self._dir} is in use by another process") from None
        self._segments: deque[_Segment] = deque()
        self._cursor_gen = 0
        self._cursor_fd = -1
        self._write_fd = -1
        self._last_sync = time.monotonic()
        self._dirty = False
        self.pending_batches = 0
        self.pending_events = 0
        self.disk_bytes = 0
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # ---- opening ---------------------------------------------------------------------------
    def _recover(self) -> None:
        indexes = sorted(int(p.name[: -len(_SEG_SUFFIX)]) for p in self._dir.glob(f"*{_SEG_SUFFIX}")
                         if p.name[: -len(_SEG_SUFFIX)].isdigit())  # fmt: skip
        self._cursor_fd = os.open(self._dir / "cursor", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        cursor = self._read_cursor()
        if cursor is None or not indexes or cursor.segment < indexes[0]:
            cursor = Position(indexes[0] if indexes else 0, 0)
        for i in indexes:
            if i < cursor.segment:  # acked, deletion interrupted by a crash
                os.unlink(self._seg_path(i))
                continue
            size = os.stat(self._seg_path(i)).st_size
            self._segments.append(_Segment(i, size))
        if self._segments and self._segments[0].index == cursor.segment:
            cursor = Position(cursor.segment, min(cursor.offset, self._segments[0].size))
        elif self._segments:  # the cursor's segment is gone (lost with an unsynced directory)
            cursor = Position(self._segments[0].index, 0)
        # The tail is the only place a crash can tear a frame: check it fully and cut there.
        if self._segments:
            tail = self._segments[-1]
            start = cursor.offset if tail.index == cursor.segment else 0
            good = self._scan(tail.index, start, tail.size, verify=True)
            if good < tail.size:
                self.stats.torn_bytes += tail.size - good
                os.truncate(self._seg_path(tail.index), good)
                tail.size = good
        for seg in self._segments:
            start = cursor.offset if seg.index == cursor.segment else 0
            if seg is not self._segments[-1]:
                self._scan(seg.index, start, seg.size, verify=False)
            self.disk_bytes += seg.size
        if self._segments:
            self._open_writer(self._segments[-1].index)
        else:
            self._new_segment(cursor.segment)
        self._cursor = cursor
        self._cursor_gen += 1
        self._reader = _Reader(cursor)

    def _scan(self, index: int, start: int, size: int, *, verify: bool) -> int:
        """Count the frames in [start, size) of a segment; return where the whole frames end."""
        fd = os.open(self._seg_path(index), os.O_RDONLY | os.O_CLOEXEC)
        try:
            off = start
            while off + _FRAME.size <= size:
                hdr = os.pread(fd, _FRAME.size, off)
                n, crc, klen, events = _FRAME.unpack(hdr)
                end = off + _FRAME.size + n
                if klen > n or end > size:
                    break
                if verify:
                    body = os.pread(fd, n, off + _FRAME.size)
                    if zlib.crc32(body, zlib.crc32(hdr[8:])) != crc:
                        break
                self.pending_batches += 1
                self.pending_events += events
                off = end
            return off
        finally:
            os.close(fd)

    def _read_cursor(self) -> Position | None:
        raw = os.pread(self._cursor_fd, 2 * _CURSOR.size, 0)
        best: tuple[int, Position] | None = None
        for slot in range(2):
            chunk = raw[slot * _CURSOR.size : (slot + 1) * _CURSOR.size]
            if len(chunk) < _CURSOR.size:
                continue
            gen, seg, off, crc = _CURSOR.unpack(chunk)
            if crc == zlib.crc32(chunk[:24]) and (best is None or gen > best[0]):
                best = (gen, Position(seg, off))
        if best is None:
            return None
        self._cursor_gen = best[0]
        return best[1]

    def _write_cursor(self, pos: Position, *, sync: bool) -> None:
        # Two slots written alternately: a torn write spoils one slot, the other still holds
        # the previous cursor (at worst some acked entries are replayed: at-least-once).
        self._cursor_gen += 1
        head = struct.pack("<QQQ", self._cursor_gen, pos.segment, pos.offset)
        os.pwrite(self._cursor_fd, _CURSOR.pack(self._cursor_gen, pos.segment, pos.offset, zlib.crc32(head)),
                  (self._cursor_gen % 2) * _CURSOR.size)  # fmt: skip
        if sync:
            os.fsync(self._cursor_fd)

    # ---- segments --------------------------------------------------------------------------
    def _seg_path(self, index: int) -> Path:
        return self._dir / f"{index:020d}{_SEG_SUFFIX}"

    def _open_writer(self, index: int) -> None:
        self._write_fd = os.open(self._seg_path(index), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _new_segment(self, index: int) -> None:
        self._write_fd = os.open(self._seg_path(index),
                                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)  # fmt: skip
        self._segments.append(_Segment(index, 0))
        if self.config.fsync != FsyncPolicy.NEVER:
            self._sync_dir()

    def _roll(self) -> None:
        if self.config.fsync != FsyncPolicy.NEVER:
            os.fdatasync(self._write_fd)
        os.close(self._write_fd)
        self._write_fd = -1
        self._new_segment(self._segments[-1].index + 1)

    def _sync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _maybe_sync(self) -> None:
        policy = self.config.fsync
        if policy == FsyncPolicy.ALWAYS:
            os.fdatasync(self._write_fd)
        elif policy == FsyncPolicy.INTERVAL:
            now = time.monotonic()
            if now - self._last_sync >= self.config.fsync_interval_s:
                self.sync()
                self._last_sync = now

    # ---- writing ---------------------------------------------------------------------------
    def append(self, key: bytes, value: bytes | bytearray | memoryview, events: int = 1) -> bool:
        """Append one batch; False (and counted in stats.dropped_*) if the spool is full."""
        if len(key) > MAX_KEY:
            raise SpoolError(f"spool key of {len(key)} bytes exceeds {MAX_KEY}")
        n = len(key) + len(value)
        total = _FRAME.size + n
        if self.disk_bytes + total > self.config.max_bytes:
            self._drop(events)
            return False
        tail = self._segments[-1]
        if tail.size and tail.size + total > self.config.segment_bytes:
            self._roll()
            tail = self._segments[-1]
        meta = _META.pack(len(key), events)
        crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(meta)))
        hdr = _FRAME.pack(n, crc, len(key), events)
        try:
            written = os.writev(self._write_fd, [hdr, key, value])
        except OSError:
            written = -1
        if written != total:
            # Disk full or I/O error: cut any partial frame so the segment stays well-formed.
            with contextlib.suppress(OSError):
                os.ftruncate(self._write_fd, tail.size)
            self._drop(events)
            return False
        tail.size += total
        self.disk_bytes += total
        self.pending_batches += 1
        self.pending_events += events
        self.stats.appended_batches += 1
        self.stats.appended_events += events
        self._dirty = True
        self._maybe_sync()
        return True

    def _drop(self, events: int) -> None:
        self.stats.dropped_batches += 1
        self.stats.dropped_events += events

    # ---- reading ---------------------------------------------------------------------------
    def read(self, max_entries: int = 1024, max_bytes: int = 8 << 20) -> list[SpoolEntry]:
        """Up to `max_entries` entries after the last one read (oldest first), without acking.

        Returns at least one entry if any is unread, even if it is larger than max_bytes.
        """
        r = self._reader
        out: list[SpoolEntry] = []
        size = 0
        while len(out) < max_entries and size < max_bytes:
            seg = self._segment(r.pos.segment)
            if seg is None:
                break
            if r.pos.offset >= seg.size:
                if seg is self._segments[-1]:
                    break  # everything written has been read
                r.pos = Position(r.pos.segment + 1, 0)
                continue
            if r.fd_segment != seg.index:
                self._close_reader_fd()
                r.fd = os.open(self._seg_path(seg.index), os.O_RDONLY | os.O_CLOEXEC)
                r.fd_segment = seg.index
            want = min(max(_READ_CHUNK, max_bytes - size), seg.size - r.pos.offset)
            chunk = os.pread(r.fd, want, r.pos.offset)
            view = memoryview(chunk)
            off = 0
            while len(out) < max_entries and size < max_bytes and off + _FRAME.size <= len(view):
                n, crc, klen, events = _FRAME.unpack_from(view, off)
                body = off + _FRAME.size
                if body + n > len(view):
                    if r.pos.offset + body + n > seg.size:
                        off = -1  # frame runs past the segment: corrupt
                    elif off == 0:
                        view = memoryview(os.pread(r.fd, _FRAME.size + n, r.pos.offset))
                        continue
                    break
                if klen > n or zlib.crc32(view[body : body + n], zlib.crc32(view[off + 8 : body])) != crc:
                    off = -1
                    break
                end = Position(seg.index, r.pos.offset + body + n)
                out.append(SpoolEntry(bytes(view[body : body + klen]), bytes(view[body + klen : body + n]),
                                      events, end))  # fmt: skip
                r.unacked.append((end, events))
                size += n
                off = body + n
            if off == 0:
                off = -1  # not even one frame header fits before the segment's end
            if off < 0:
                # A bad frame before the tail (disk corruption): the rest of the segment cannot
                # be framed, so skip to the next segment and count what was lost as one batch.
                self.stats.corrupt_batches += 1
                r.pos = Position(seg.index, seg.size)
                continue
            r.pos = Position(seg.index, r.pos.offset + off)
        return out

    def rewind(self) -> None:
        """Forget what was read but not acked: the next read starts again at the cursor."""
        self._reader.pos = self._cursor
        self._reader.unacked.clear()

    def ack(self, through: Position) -> None:
        """Acknowledge every read entry up to and including the one ending at `through`."""
        r = self._reader
        batches = events = 0
        while r.unacked and r.unacked[0][0] <= through:
            _, ev = r.unacked.popleft()
            batches += 1
            events += ev
        if not batches:
            return
        self.pending_batches -= batches
        self.pending_events -= events
        self.stats.acked_batches += batches
        self.stats.acked_events += events
        self._cursor = through
        tail = self._segments[-1]
        if through.segment == tail.index and through.offset == tail.size and tail.size and not r.unacked:
            # Everything is acked: start a fresh segment so the old one can be deleted.
            self._roll()
            self._cursor = Position(tail.index + 1, 0)
            r.pos = self._cursor
        deleted = False
        policy = self.config.fsync
        drop = [s for s in self._segments if s.index < self._cursor.segment]
        sync = policy == FsyncPolicy.ALWAYS or (bool(drop) and policy != FsyncPolicy.NEVER)
        # Cursor first, then delete: a crash in between leaves files the next open removes.
        self._write_cursor(self._cursor, sync=sync)
        for s in drop:
            self._segments.popleft()
            if r.fd_segment == s.index:
                self._close_reader_fd()
            os.unlink(self._seg_path(s.index))
            self.disk_bytes -= s.size
            deleted = True
        if deleted and policy != FsyncPolicy.NEVER:
            self._sync_dir()
        if policy == FsyncPolicy.INTERVAL:
            self._maybe_sync()

    def _segment(self, index: int) -> _Segment | None:
        first = self._segments[0].index
        i = index - first
        return self._segments[i] if 0 <= i < len(self._segments) else None

    def _close_reader_fd(self) -> None:
        if self._reader.fd >= 0:
            os.close(self._reader.fd)
        self._reader.fd = -1
        self._reader.fd_segment = -1

    # ---- state -----------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        """True when every appended entry has been acked."""
        return self.pending_batches == 0

    @property
    def unread(self) -> bool:
        r = self._reader
        tail = self._segments[-1]
        return r.pos.segment < tail.index or r.pos.offset < tail.size

    def sync(self) -> None:
        """Force appended frames and the cursor to stable storage."""
        if self._write_fd >= 0 and self._dirty:
            os.fdatasync(self._write_fd)
            self._dirty = False
        if self._cursor_fd >= 0:
            os.fsync(self._cursor_fd)

    def close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._close_reader_fd()
        if self._write_fd >= 0:
            if self.config.fsync != FsyncPolicy.NEVER:
                self.sync()
            os.close(self._write_fd)
            self._write_fd = -1
        if self._cursor_fd >= 0:
            os.close(self._cursor_fd)
            self._cursor_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
