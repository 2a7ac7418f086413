"""The disk spool: order, durable cursor, bound, and recovery after kill -9 (real processes)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sensor.spool import FsyncPolicy, Spool, SpoolConfig, SpoolError

FRAME = 14  # frame header bytes


def payload(i: int, size: int = 100) -> bytes:
    return struct.pack("<Q", i) + bytes([i % 251]) * (size - 8)


def index_of(value: bytes) -> int:
    return int(struct.unpack_from("<Q", value)[0])


def cfg(d: Path, **kw: object) -> SpoolConfig:
    return SpoolConfig(directory=d, **kw)  # type: ignore[arg-type]


def drain(spool: Spool, ack: bool = True) -> list[int]:
    got: list[int] = []
    while batch := spool.read(max_entries=7):
        got += [index_of(e.value) for e in batch]
        if ack:
            spool.ack(batch[-1].end)
    return got


def test_replays_in_order_and_acked_entries_are_never_replayed(tmp_path: Path) -> None:
    with Spool(cfg(tmp_path, segment_bytes=4096, max_bytes=1 << 20)) as sp:
        for i in range(200):
            assert sp.append(b"k%d" % (i % 3), payload(i), events=i % 5 + 1)
        assert sp.pending_batches == 200
        assert len(list(tmp_path.glob("*.seg"))) > 3  # rolled
        first = sp.read(max_entries=50)
        assert [index_of(e.value) for e in first] == list(range(50))
        assert first[7].key == b"k1" and first[7].events == 3
        sp.ack(first[29].end)  # acks 0..29; 30..49 were read but not acked
        assert sp.pending_batches == 170
    with Spool(cfg(tmp_path, segment_bytes=4096, max_bytes=1 << 20)) as sp:
        assert sp.pending_batches == 170
        assert sp.pending_events == sum(i % 5 + 1 for i in range(30, 200))
        assert drain(sp) == list(range(30, 200))
        assert sp.empty
        assert sp.stats.acked_batches == 170
    # Everything acked: the old segments are gone, at most one empty segment remains.
    segs = list(tmp_path.glob("*.seg"))
    assert len(segs) == 1 and segs[0].stat().st_size == 0


def test_rewind_rereads_unacked(tmp_path: Path) -> None:
    with Spool(cfg(tmp_path)) as sp:
        for i in range(10):
            sp.append(b"", payload(i))
        a = sp.read(max_entries=6)
        sp.ack(a[2].end)
        sp.rewind()  # e.g. the send of entries 3..5 failed
        assert drain(sp) == list(range(3, 10))


def test_appends_during_replay_keep_order(tmp_path: Path) -> None:
    with Spool(cfg(tmp_path, segment_bytes=4096)) as sp:
        got: list[int] = []
        n = 0
        for _ in range(30):
            for _ in range(5):
                sp.append(b"", payload(n))
                n += 1
            batch = sp.read(max_entries=4)
            got += [index_of(e.value) for e in batch]
            sp.ack(batch[-1].end)
        got += drain(sp)
        assert got == list(range(n))


def test_bound_drops_newest_and_counts_exactly(tmp_path: Path) -> None:
    size = 1000
    frame = FRAME + 1 + size
    with Spool(cfg(tmp_path, segment_bytes=8192, max_bytes=8192 * 4)) as sp:
        kept = sum(sp.append(b"x", payload(i, size), events=10) for i in range(100))
        # Per segment only whole frames fit (rolled before overflow), and the bound is on disk bytes.
        per_seg = 8192 // frame
        assert kept == 4 * per_seg  # the 5th segment would exceed max_bytes
        assert sp.stats.dropped_batches == 100 - kept
        assert sp.stats.dropped_events == 10 * (100 - kept)
        assert sp.disk_bytes == kept * frame <= 8192 * 4
        assert drain(sp) == list(range(kept))  # the oldest are kept, the newest dropped
        assert sp.append(b"x", payload(1000, size))  # space again once acked


def test_second_process_cannot_open(tmp_path: Path) -> None:
    with Spool(cfg(tmp_path)), pytest.raises(SpoolError, match="in use"):
        Spool(cfg(tmp_path))


CHILD = """
import os, struct, sys
from pathlib import Path
from sensor.spool import Spool, SpoolConfig, FsyncPolicy
sp = Spool(SpoolConfig(Path(sys.argv[1]), segment_bytes=1 << 16, max_bytes=1 << 30,
                       fsync=FsyncPolicy(sys.argv[2])))
ack_at = int(sys.argv[3])
i = 0
while True:
    sp.append(b"c%d" % (i % 4), struct.pack("<Q", i) + bytes([i % 251]) * (200 + i % 900), events=i % 7 + 1)
    i += 1
    if i == ack_at:
        batch = sp.read(max_entries=ack_at // 2)
        sp.ack(batch[-1].end)
        print("acked", flush=True)
"""


def run_and_kill(tmp_path: Path, fsync: str, ack_at: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), fsync, str(ack_at)],
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"acked\n"
        deadline = time.monotonic() + 10
        # Let it append well past the ack and across several segments, then kill it mid-loop.
        while sum(p.stat().st_size for p in tmp_path.glob("*.seg")) < 1 << 19:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("fsync", [FsyncPolicy.NEVER, FsyncPolicy.INTERVAL])
def test_kill_9_mid_append_keeps_every_whole_entry(tmp_path: Path, fsync: FsyncPolicy) -> None:
    run_and_kill(tmp_path, fsync, ack_at=100)
    tail = max(tmp_path.glob("*.seg"))
    whole = tail.stat().st_size
    # Whether or not the kill tore the last frame, tear one for certain: half a copy of the
    # tail's first frame, as a crash between two pages of one write would leave it.
    donor = max(p for p in tmp_path.glob("*.seg") if p.stat().st_size).read_bytes()
    n = struct.unpack_from("<I", donor)[0]
    torn = donor[: (FRAME + n) // 2]
    with tail.open("ab") as f:
        f.write(torn)
    with Spool(cfg(tmp_path, segment_bytes=1 << 16, max_bytes=1 << 30)) as sp:
        assert sp.stats.torn_bytes >= len(torn)
        assert tail.stat().st_size <= whole
        entries = []
        while batch := sp.read():
            entries += batch
            sp.ack(batch[-1].end)
        got = [index_of(e.value) for e in entries]
        # Acked entries (0..49) are not replayed; every later one is present, in order, intact.
        assert got == list(range(50, 50 + len(got)))
        assert len(got) > 200
        for e in entries:
            i = index_of(e.value)
            assert e.key == b"c%d" % (i % 4) and e.events == i % 7 + 1
            assert e.value[8:] == bytes([i % 251]) * (200 + i % 900)
        assert sp.stats.corrupt_batches == 0
    # Reopened after a clean close: nothing left, nothing torn.
    with Spool(cfg(tmp_path, segment_bytes=1 << 16, max_bytes=1 << 30)) as sp:
        assert sp.empty and sp.stats.torn_bytes == 0 and sp.read() == []


def test_corrupt_frame_before_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    with Spool(cfg(tmp_path, segment_bytes=4096)) as sp:
        for i in range(100):
            sp.append(b"", payload(i))
    segs = sorted(tmp_path.glob("*.seg"))
    per_seg = 4096 // (FRAME + 100)
    with segs[1].open("r+b") as f:  # flip one payload byte of the segment's 3rd entry
        f.seek(2 * (FRAME + 100) + FRAME + 50)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with Spool(cfg(tmp_path, segment_bytes=4096)) as sp:
        got = drain(sp)
        assert sp.stats.corrupt_batches == 1
        lost = set(range(per_seg + 2, 2 * per_seg))
        assert got == [i for i in range(100) if i not in lost]


def test_fsync_always_and_roll(tmp_path: Path) -> None:
    for policy in (FsyncPolicy.ALWAYS, FsyncPolicy.ROLL):
        d = tmp_path / policy.value
        with Spool(cfg(d, segment_bytes=4096, fsync=policy)) as sp:
            for i in range(60):
                sp.append(b"", payload(i))
        with Spool(cfg(d, segment_bytes=4096, fsync=policy)) as sp:
            assert drain(sp) == list(range(60))


def test_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        SpoolConfig(tmp_path, max_bytes=1000, segment_bytes=4096)
