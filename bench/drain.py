"""Ring-buffer drain: libbpf's per-record ctypes callback vs the mapped batch reader, one run.

Each trial fills a real ring with a storm in a watched cgroup while nobody reads, then
drains it to per-kind batches of bytes (consume, take, until empty, as the agent does),
alternately with each reader; both readers are open on the same ring. Reported: records/s,
CPU time per record (this thread's), the speed-up, and that both took the same records.

    file ring     N x open+close of one file: one record kind, 360 bytes
    process ring  N x fork+exec /bin/true: exec, fork and exit records interleaved

Run (root): .venv/bin/python bench/drain.py [--open-n 100000] [--exec-n 400] [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from enforcer.records import Visibility
from sensor.agent import build_objects
from sensor.drain import Drain, Ring
from sensor.identity import cgroup2_mount
from sensor.libbpf import Map, RingBuffer, ensure_bpffs
from sensor.monitors import FileMonitor, ProcessMonitor
from sensor.ringbuf import MmapRing

OPEN_STORM = """
import os, sys
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
path, n = sys.argv[2], int(sys.argv[3])
for _ in range(n):
    os.close(os.open(path, os.O_RDONLY))
"""
EXEC_STORM = 'echo $$ > "$0/cgroup.procs"; i=0; while [ $i -lt $1 ]; do /bin/true; i=$((i+1)); done'


@dataclass
class Trial:
    records: int
    wall_ns: int
    cpu_ns: int

    @property
    def rate(self) -> float:
        return self.records / (self.wall_ns / 1e9)

    @property
    def cpu_per_record_us(self) -> float:
        return self.cpu_ns / 1e3 / max(self.records, 1)


def drain_all(ring: Ring, drops: Map) -> Trial:
    """Consume and take until the ring is empty; what the agent's drain loop does per tick."""
    d = Drain(ring, drops)
    n = 0
    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    while True:
        ring.consume()
        got = sum(b.count for b in d.take())
        if not got:
            break
        n += got
    return Trial(n, time.perf_counter_ns() - t0, time.thread_time_ns() - c0)


def run_case(name: str, rb: Map, drops: Map, fill: Callable[[], object], trials: int) -> bool:
    readers: dict[str, Ring] = {"callback": RingBuffer([rb]), "mmap": MmapRing([rb])}
    res: dict[str, list[Trial]] = {k: [] for k in readers}
    try:
        drain_all(readers["mmap"], drops)  # whatever an earlier run left
        for t in range(trials):
            order = list(readers) if t % 2 == 0 else list(reversed(readers))
            for k in order:
                fill()
                res[k].append(drain_all(readers[k], drops))
    finally:
        for r in readers.values():
            r.close()
    counts = {k: sorted({x.records for x in v}) for k, v in res.items()}
    same = counts["callback"] == counts["mmap"]
    mismatch = "" if same else f" (callback: {counts['callback']}) MISMATCH"
    print(f"\n{name}: {trials} trials per reader, records per trial {counts['mmap']}{mismatch}")
    print(f"  {'reader':<9} {'records/s':>13} {'CPU us/record':>14}   (median of trials)")
    med = {}
    for k, v in res.items():
        med[k] = (statistics.median(x.rate for x in v), statistics.median(x.cpu_per_record_us for x in v))
        print(f"  {k:<9} {med[k][0]:>13,.0f} {med[k][1]:>14.3f}")
    print(f"  mmap / callback: {med['mmap'][0] / med['callback'][0]:.1f}x records/s, "
          f"{med['callback'][1] / med['mmap'][1]:.1f}x less CPU per record")  # fmt: skip
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--open-n", type=int, default=100_000)
    p.add_argument("--exec-n", type=int, default=400)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--ring-mb", type=int, default=64)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (BPF, cgroups)")
    err = build_objects()
    if err:
        sys.exit(f"cannot build the BPF objects: {err}")
    ensure_bpffs()
    top = cgroup2_mount() / f"as-bench-drain-{uuid.uuid4().hex[:8]}"
    cg = top / f"cri-containerd-{uuid.uuid4().hex * 2}.scope"
    cg.mkdir(parents=True)
    pins = Path(f"/sys/fs/bpf/as-bench-drain-{top.name[-8:]}")
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="as-bench-drain-") as tmp:
            target = Path(tmp) / "storm-file"
            target.write_bytes(b"x")
            argv = [sys.executable, "-I", "-c", OPEN_STORM, str(cg), str(target), str(a.open_n)]
            with FileMonitor(pin_dir=pins, ring_bytes=a.ring_mb << 20) as fm:
                fm.watch(cg.stat().st_ino, Visibility.FILE)
                fm.drain.ring.close()  # this bench opens its own readers on the ring
                ok &= run_case(f"file ring, {a.open_n:,} opens", fm.obj.map(fm.RING), fm.obj.map("as_drops"),
                               lambda: subprocess.run(argv, check=True), a.trials)  # fmt: skip
            if a.exec_n:
                sh = ["sh", "-c", EXEC_STORM, str(cg), str(a.exec_n)]
                with ProcessMonitor(pin_dir=pins, ring_bytes=a.ring_mb << 20) as pm:
                    pm.watch(cg.stat().st_ino)
                    pm.drain.ring.close()
                    ok &= run_case(f"process ring, {a.exec_n:,} fork+exec+exit", pm.obj.map("as_proc_rb"),
                                   pm.obj.map("as_drops"), lambda: subprocess.run(sh, check=True),
                                   a.trials)  # fmt: skip
    finally:
        for f in pins.iterdir() if pins.exists() else []:
            f.unlink()
        if pins.exists():
            pins.rmdir()
        cg.rmdir()
        top.rmdir()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
