"""sensor/ringbuf.py: the mapped ring reader takes exactly what libbpf's callback path takes.

Pure part: `walk` over a doubly mapped byte area written the way the kernel writes it,
checked against a one-record-at-a-time reference (random streams, wrap-around, discards,
busy records, high water).

Kernel part (root): the same exec workload read by both readers from one ring; a one-page
file ring wrapped many times over several polls; discarded records of a test-only program
skipped; a record still reserved (busy) stops the reader until it is committed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import records
from enforcer.records import Kind
from sensor.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, walk
from tests.conftest import ROOT, need, need_tool
from tests.monitor_env import cgroups

# ---- pure: the walk over a synthetic ring ----------------------------------------------------


@dataclass
class FakeRing:
    """A data area laid out as the kernel's: `size` bytes mapped twice (here: mirrored)."""

    size: int
    start: int = 0  # consumer position where the stream begins
    prod: int = 0
    data: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.data = np.zeros(2 * self.size, np.uint8)
        self.prod = self.start

    def push(self, body: bytes, flags: int = 0) -> int:
        """Reserve and write one record; returns its position."""
        step = (len(body) + HDR_SIZE + 7) & ~7
        assert self.prod + step - self.start <= self.size, "test ring overflow"
        pos = self.prod
        rec = (len(body) | flags).to_bytes(4, "little") + bytes(4) + body + bytes(step - HDR_SIZE - len(body))
        for i, b in enumerate(rec):  # byte by byte through the mask: wraps like the kernel's pages
            at = (pos + i) & (self.size - 1)
            self.data[at] = self.data[at + self.size] = b
        self.prod += step
        return pos

    def set_len(self, pos: int, value: int) -> None:
        at = pos & (self.size - 1)
        for off in (at, at + self.size):
            self.data[off : off + 4] = np.frombuffer(value.to_bytes(4, "little"), np.uint8)


def reference(stream: list[tuple[bytes, int]], budget: int) -> tuple[dict[int, bytes], int]:
    """One record at a time, as libbpf's ringbuf_process_ring does: per-kind bytes and count."""
    out: dict[int, bytes] = {}
    n = taken = 0
    for body, flags in stream:
        if flags & BUSY_BIT or taken >= budget:
            break
        if flags & DISCARD_BIT:
            continue
        out[body[0]] = out.get(body[0], b"") + body
        n += 1
        taken += len(body)
    return out, n


SIZES = {1: 1144, 2: 88, 3: 88, 4: 360, 6: 88, 9: 13}  # per kind, as in armorstream.h (+ an odd one)


def body(kind: int, seq: int) -> bytes:
    size = SIZES[kind]
    return (bytes([kind, 0]) + seq.to_bytes(4, "little") + os.urandom(size))[:size]


def run_walk(ring: FakeRing, budget: int = 1 << 30) -> tuple[dict[int, bytes], int, int]:
    pending = [bytearray() for _ in range(256)]
    cons, n, taken = walk(ring.data, ring.size - 1, ring.start, ring.prod, pending, budget)
    got = {k: bytes(b) for k, b in enumerate(pending) if b}
    assert taken == sum(len(b) for b in got.values())
    return got, n, cons


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(SIZES)), min_size=0, max_size=40),
    runs=st.lists(st.integers(1, 30), min_size=0, max_size=40),
    discard=st.sets(st.integers(0, 400)),
    busy_at=st.one_of(st.none(), st.integers(0, 400)),
    start=st.integers(0, (1 << 16) - 1).map(lambda x: x * 8),
    budget=st.one_of(st.just(1 << 30), st.integers(1, 40_000)),
)
def test_walk_matches_one_at_a_time(
    kinds: list[int], runs: list[int], discard: set[int], busy_at: int | None, start: int, budget: int
) -> None:
    # Runs of one kind (the vectorised path) interleaved with single records (the loop).
    seq = [k for k, r in zip(kinds, runs + [1] * len(kinds), strict=False) for _ in range(r)]
    ring = FakeRing(1 << 16, start=start)
    stream: list[tuple[bytes, int]] = []
    for i, k in enumerate(seq):
        b = body(k, i)
        if ring.prod + 1160 - start > ring.size:
            break
        flags = BUSY_BIT if i == busy_at else DISCARD_BIT if i in discard else 0
        ring.push(b, flags)
        stream.append((b, flags))
    want, n_want = reference(stream, budget)
    got, n, cons = run_walk(ring, budget)
    assert got == want
    assert n == n_want
    assert ring.start <= cons <= ring.prod


def test_walk_stops_at_busy_and_resumes_after_commit() -> None:
    ring = FakeRing(4096, start=4096 * 5 - 64)  # the third record straddles the end
    first = ring.push(body(4, 0))
    busy = ring.push(body(4, 1), BUSY_BIT)
    ring.push(body(4, 2))  # committed, but after a busy one: must wait
    got, n, cons = run_walk(ring)
    assert (got, n, cons) == ({4: body_at(ring, first)}, 1, busy)
    ring.set_len(busy, SIZES[4])  # the kernel commits it
    ring.start = cons
    got, n, cons = run_walk(ring)
    assert n == 2 and cons == ring.prod
    assert [int.from_bytes(got[4][i * 360 + 2 : i * 360 + 6], "little") for i in range(2)] == [1, 2]


def test_walk_skips_discarded_in_a_run() -> None:
    ring = FakeRing(1 << 14, start=(1 << 14) - 1000)
    for i in range(30):
        ring.push(body(2, i), DISCARD_BIT if i % 3 == 1 else 0)
    got, n, cons = run_walk(ring)
    seqs = [int.from_bytes(got[2][i * 88 + 2 : i * 88 + 6], "little") for i in range(n)]
    assert seqs == [i for i in range(30) if i % 3 != 1] and cons == ring.prod


def test_walk_high_water_takes_the_crossing_record_and_no_more() -> None:
    ring = FakeRing(1 << 16)
    for i in range(50):
        ring.push(body(4, i))
    got, n, cons = run_walk(ring, budget=360 * 10 + 1)
    assert n == 11 and cons == 11 * 368 and len(got[4]) == 11 * 360


def body_at(ring: FakeRing, pos: int) -> bytes:
    at = pos & (ring.size - 1)
    size = int.from_bytes(ring.data[at : at + 4].tobytes(), "little") & (DISCARD_BIT - 1)
    return ring.data[at + HDR_SIZE : at + HDR_SIZE + size].tobytes()


# ---- kernel: both readers on one real ring -----------------------------------------------------


def consumer_page(fd: int) -> mmap.mmap:
    """The ring's consumer page, mapped by the test itself: lets it rewind consumer_pos."""
    return mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def by_kind(ring: object) -> dict[int, bytes]:
    return dict(ring.take())  # type: ignore[attr-defined]


def sh_in(cgroup: Path, script: str, *args: str) -> None:
    """Run a dash script inside `cgroup` (the move itself is not recorded: sh starts outside)."""
    sh = 'echo $$ > "$0/cgroup.procs" && ' + script
    subprocess.run(["sh", "-c", sh, str(cgroup), *args], check=True)


@pytest.mark.root
@pytest.mark.kernel
def test_mmap_reader_equals_callback_reader() -> None:
    from sensor.libbpf import RingBuffer
    from sensor.monitors import ProcessMonitor
    from sensor.ringbuf import MmapRing

    n = 40
    with cgroups("process.bpf.o") as cg, ProcessMonitor(pin_dir=cg.pin_dir) as mon:
        mon.watch(cg.watched_id)
        rb_map = mon.obj.map("as_proc_rb")
        fast, slow = MmapRing([rb_map]), RingBuffer([rb_map])
        page = consumer_page(rb_map.fd)
        try:
            tag = uuid.uuid4().hex[:8]
            sh_in(cg.watched, f"i=0; while [ $i -lt {n} ]; do /bin/true {tag}-$i; i=$((i+1)); done")
            start = int.from_bytes(page[:8], "little")
            assert fast.consume() > 0
            mapped = by_kind(fast)
            page[:8] = start.to_bytes(8, "little")  # rewind: the same records again, for libbpf
            slow.consume()
            called = by_kind(slow)
        finally:
            page.close()
            fast.close()
            slow.close()
    assert mapped == called  # every kind: same bytes, same order
    execs = np.frombuffer(mapped[Kind.EXEC], records.DTYPES[Kind.EXEC])
    assert [a[1] for a in records.argv(execs)] == [f"{tag}-{i}" for i in range(n)]
    assert len(mapped[Kind.FORK]) // 88 == n and len(mapped[Kind.EXIT]) // 88 == n + 1  # + sh


@pytest.mark.root
@pytest.mark.kernel
def test_one_page_ring_wraps_over_many_polls(tmp_path: Path) -> None:
    from enforcer.records import Visibility
    from sensor.monitors import FileMonitor
    from sensor.ringbuf import MmapRing

    rounds, per_round = 14, 9  # 9 x 368 bytes fit one page; 14 rounds wrap it 11 times
    files = [tmp_path / f"r{r:02d}-{i}" for r in range(rounds) for i in range(per_round)]
    for f in files:
        f.touch()
    with cgroups("file.bpf.o") as cg, FileMonitor(pin_dir=cg.pin_dir, ring_bytes=4096) as mon:
        mon.watch(cg.watched_id, Visibility.FILE)
        ring = mon.drain.ring
        assert isinstance(ring, MmapRing)
        got: list[str] = []
        for r in range(rounds):
            batch = [str(f) for f in files[r * per_round : (r + 1) * per_round]]
            sh_in(cg.watched, 'shift; for f in "$@"; do : < "$f"; done', "-", *batch)
            assert ring.consume() == per_round
            recs = np.frombuffer(by_kind(ring)[Kind.FILE], records.DTYPES[Kind.FILE])
            got += records.text(recs["path"])
        cons, prod = ring.positions()[0]
    assert got == [str(f) for f in files]
    assert cons == prod == rounds * per_round * 368 > 10 * 4096


# A test-only program: each getpgid(MAGIC | flags | seq) by any process emits one 16-byte
# record {kind 9, seq}; flag DISCARD discards it, flag SPIN keeps it reserved ~0.1 s first.
TEST_PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} as_test_rb SEC(".maps");

struct enter_getpgid { __u64 common; __u64 nr; __u64 pid; };
struct rec { __u16 kind; __u16 flags; __u32 seq; __u64 arg; };

static long spin(__u32 i, void *ctx) { return 0; }

SEC("tp/syscalls/sys_enter_getpgid")
int on_getpgid(struct enter_getpgid *ctx)
{
	__u64 arg = ctx->pid;
	if ((arg >> 20) != 0x5A5)
		return 0;
	struct rec *r = bpf_ringbuf_reserve(&as_test_rb, sizeof(*r), 0);
	if (!r)
		return 0;
	r->kind = 9;
	r->flags = (arg >> 16) & 0xf;
	r->seq = arg & 0xffff;
	r->arg = arg;
	if (arg & 0x10000) {
		bpf_ringbuf_discard(r, 0);
		return 0;
	}
	if (arg & 0x20000)
		for (int i = 0; i < 8; i++)
			bpf_loop(1 << 23, spin, 0, 0);
	bpf_ringbuf_submit(r, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
"""
MAGIC, DISCARD, SPIN = 0x5A5 << 20, 0x10000, 0x20000


@pytest.fixture
def test_prog(tmp_path: Path) -> Iterator[object]:
    from tests.conftest import need_root

    need_root()
    clang = need_tool("clang")
    need_tool("bpftool")
    need(Path("/sys/kernel/btf/vmlinux").exists(), "needs kernel BTF at /sys/kernel/btf/vmlinux")
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), ".output/vmlinux.h"], check=True)
    src = tmp_path / "ringbuf_test.bpf.c"
    src.write_text(TEST_PROG)
    obj_path = tmp_path / "ringbuf_test.bpf.o"
    build = subprocess.run([clang, "-g", "-O2", "-target", "bpf", f"-I{ROOT / 'bpf' / '.output'}",
                            "-c", str(src), "-o", str(obj_path)], capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr
    from sensor.libbpf import BpfError, Object
    from sensor.monitors import ensure_tracefs

    ensure_tracefs()
    obj = Object(obj_path)
    try:
        try:
            obj.load()
            obj.attach_all()
        except BpfError as e:
            need(False, f"the kernel refused the test program: {e}")
        yield obj
    finally:
        obj.close()


def seqs(ring: object) -> list[int]:
    raw = by_kind(ring).get(9, b"")
    return [int.from_bytes(raw[i + 4 : i + 8], "little") for i in range(0, len(raw), 16)]


def emit(seq: int, flags: int = 0) -> None:
    with contextlib.suppress(ProcessLookupError):  # no such process: the tracepoint fired already
        os.getpgid(MAGIC | flags | seq)


@pytest.mark.root
@pytest.mark.kernel
def test_discarded_records_are_skipped(test_prog: object) -> None:
    from sensor.libbpf import RingBuffer
    from sensor.ringbuf import MmapRing

    rb_map = test_prog.map("as_test_rb")  # type: ignore[attr-defined]
    fast, slow = MmapRing([rb_map]), RingBuffer([rb_map])
    page = consumer_page(rb_map.fd)
    try:
        for i in range(60):  # runs of kept records broken by discarded ones
            emit(i, DISCARD if i % 7 in (3, 4) else 0)
        start = int.from_bytes(page[:8], "little")
        got = seqs(fast) if fast.consume() else []
        page[:8] = start.to_bytes(8, "little")
        slow.consume()
        baseline = seqs(slow)
        assert fast.positions()[0][0] == fast.positions()[0][1] == 60 * 24  # discarded ones consumed too
    finally:
        page.close()
        fast.close()
        slow.close()
    assert got == baseline == [i for i in range(60) if i % 7 not in (3, 4)]


@pytest.mark.root
@pytest.mark.kernel
def test_busy_record_is_not_passed(test_prog: object) -> None:
    """A child's record stays reserved while its program spins; one committed after it must
    wait for it: nothing is taken, consumer_pos does not move, then both come in order.
    The test reads the busy bit through its own mapping of the ring, not the reader's."""
    from sensor.ringbuf import MmapRing

    rb_map = test_prog.map("as_test_rb")  # type: ignore[attr-defined]
    ring = MmapRing([rb_map])
    page = mmap.PAGESIZE
    area = mmap.mmap(rb_map.fd, page + 2 * 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def busy(pos: int) -> bool:
        return bool(int.from_bytes(area[page + (pos & 4095) : page + (pos & 4095) + 4], "little") & BUSY_BIT)

    observed = False
    try:
        for attempt in range(5):
            child = subprocess.Popen([sys.executable, "-c",
                                      f"import os\ntry: os.getpgid({MAGIC | SPIN | 1000 + attempt})\n"
                                      "except ProcessLookupError: pass"])  # fmt: skip
            got: list[int] = []
            deadline = time.monotonic() + 10
            while child.poll() is None and time.monotonic() < deadline:
                ring.consume()
                got += seqs(ring)
                cons, prod = ring.positions()[0]
                if prod > cons and busy(cons):  # reserved, not committed: the child is in its spin
                    emit(2000 + attempt)  # committed at once, after the busy one
                    n = ring.consume()
                    if busy(cons):  # still busy after the consume, so busy all through it
                        observed = True
                        assert n == 0 and ring.positions()[0][0] == cons  # nothing taken past it
                    got += seqs(ring)
                    break
            child.wait(30)
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                ring.poll(100)
                got += seqs(ring)
            if 2000 + attempt in got:
                assert got == [1000 + attempt, 2000 + attempt]  # never the later one first
            else:
                assert got == [1000 + attempt]  # the child finished before we saw it busy
            if observed:
                break
    finally:
        area.close()
        ring.close()
    need(observed, "the reader never caught the record busy (machine too loaded?)")
