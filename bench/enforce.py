"""Enforcement overhead, one run (as root): exec, open and connect storms, as ratios to no sensor.

    none          no enforcement attached
    cgroup/0      netblock (cgroup BPF) attached above the storm's cgroup, no rules
    cgroup/1000   the same with 1,000 rules compiled for the storm's workload
    fan/0         fanotify watching the storm's mount (tmpfs), the workload has no rules
    fan/1000      the same with 1,000 rules (none naming the storm's files: ignore marks)
    fan/unwatched fanotify with 1,000 rules watching another mount, the storm on its own
    lsm/...       BPF-LSM: skipped where trampolines are refused (tests/vm runs it in qemu)

Each storm is a small C loop (so syscalls dominate) run in a test cgroup; trials
alternate with the baseline, and the median time per operation is compared with the
baseline's median from the same run. Targets: cgroup and LSM <= 1.05x; fanotify <= 1.3x
on watched workloads and <= 1.02x on unwatched ones.

Run: .venv/bin/python bench/enforce.py [--exec-n 300] [--open-n 50000] [--connect-n 3000] [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enforcer.compiler import compile_workload  # noqa: E402
from enforcer.fanotify import CGROUP2_ROOT, CompiledDecider, FanotifyEnforcer  # noqa: E402
from enforcer.policy.model import (  # noqa: E402
    Action,
    FileRule,
    NetworkRule,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    Target,
)

STORM_C = r"""
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <spawn.h>
extern char **environ;
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w"); fprintf(f, "%d", getpid()); fclose(f);  /* join the cgroup */
    const char *mode = argv[2]; const char *arg = argv[3]; long n = atol(argv[4]);
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (!strcmp(mode, "exec")) {
            pid_t pid; char *av[] = {(char *)arg, NULL};
            if (posix_spawn(&pid, arg, NULL, NULL, av, environ)) return 2;
            waitpid(pid, NULL, 0);
        } else if (!strcmp(mode, "open")) {
            int fd = open(arg, O_RDONLY); if (fd < 0) return 3; close(fd);
        } else {  /* connect to our own listener (made before the clock started) */
            static int l = -1; static struct sockaddr_in sa; socklen_t len = sizeof(sa);
            if (l < 0) {
                l = socket(AF_INET, SOCK_STREAM, 0); sa.sin_family = AF_INET;
                sa.sin_addr.s_addr = htonl(0x7f000001);
                if (bind(l, (struct sockaddr *)&sa, sizeof(sa)) || listen(l, 64)) return 6;
                getsockname(l, (struct sockaddr *)&sa, &len);
                clock_gettime(CLOCK_MONOTONIC, &a);
            }
            int s = socket(AF_INET, SOCK_STREAM, 0); if (s < 0) return 4;
            if (connect(s, (struct sockaddr *)&sa, sizeof(sa))) return 5;
            close(accept(l, NULL, NULL)); close(s);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


def thousand_rules(mnt: Path) -> list[Policy]:
    """1,000 rules for the storm's workload, none naming what the storms touch."""
    meta = RuleMeta(Action.BLOCK, 1)
    files = tuple(FileRule(Target.PATH, f"/etc/bench/f{i}", meta) for i in range(600))
    dirs = tuple(FileRule(Target.DIR, f"/srv/bench/d{i}/", meta, recursive=True) for i in range(100))
    procs = tuple(ProcessRule(Target.PATH, f"/usr/bench/p{i}", meta) for i in range(290))
    nets = tuple(NetworkRule(p, meta) for p in ("udp", "icmp", "icmpv6", "sctp", "raw")) * 2
    return [Policy(PolicyKind.KSP, "bench-1000", "ns", Selector(), None, 1, process=procs,
                   file=files + dirs, network=nets)]  # fmt: skip


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="as-bench-enforce-"))
        self.mnt = self.work / "mnt"
        self.other = self.work / "other"
        self.parent = Path(CGROUP2_ROOT) / f"as-bench-enforce-{os.getpid()}"
        self.cg = self.parent / "storm"
        self.storm = self.work / "storm"

    def setup(self) -> None:
        cc = shutil.which("clang") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("needs a C compiler (clang)")
        (self.work / "storm.c").write_text(STORM_C)
        subprocess.run([cc, "-O2", "-o", str(self.storm), str(self.work / "storm.c")], check=True)
        for d in (self.mnt, self.other):
            d.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "asbench", str(d)], check=True)
        shutil.copy2("/bin/true", self.mnt / "true")
        (self.mnt / "file").write_text("x")
        self.parent.mkdir()
        self.cg.mkdir()

    def teardown(self) -> None:
        for d in (self.mnt, self.other):
            subprocess.run(["umount", "-l", str(d)], check=False)
        for d in (self.cg, self.parent):
            with suppress(OSError):
                d.rmdir()
        shutil.rmtree(self.work, ignore_errors=True)

    def run_storm(self, mode: str) -> float:
        arg = {"exec": str(self.mnt / "true"), "open": str(self.mnt / "file"), "connect": "-"}[mode]
        n = {"exec": self.args.exec_n, "open": self.args.open_n, "connect": self.args.connect_n}[mode]
        r = subprocess.run([str(self.storm), str(self.cg / "cgroup.procs"), mode, arg, str(n)],
                           capture_output=True, text=True, check=True)  # fmt: skip
        return float(r.stdout)

    def measure(self, mode: str, setup: Callable[[], Iterator[None]]) -> tuple[float, float]:
        """(baseline median ns/op, candidate median ns/op), trials interleaved."""
        base, cand = [], []
        self.run_storm(mode)  # warm-up
        for _ in range(self.args.trials):
            base.append(self.run_storm(mode))
            with contextmanager(setup)():
                self.run_storm(mode)  # warm (ignore marks, caches)
                cand.append(self.run_storm(mode))
        return statistics.median(base), statistics.median(cand)

    # -- candidates ------------------------------------------------------------------------

    def cgroup(self, rules: bool) -> Callable[[], Iterator[None]]:
        def setup() -> Iterator[None]:
            from sensor.enforce import NETBLOCK_OBJ, KernelRules, unpin_all

            pins = Path(f"/sys/fs/bpf/as-bench-enforce-{os.getpid()}")
            kr = KernelRules([NETBLOCK_OBJ], pins / "e", pins / "s").load()
            kr.attach_cgroup(self.parent, pin=False)
            kr.set_rules(thousand_rules(self.mnt) if rules else [], self.cg.stat().st_ino)
            try:
                yield
            finally:
                kr.close()
                unpin_all(pins / "e")
                unpin_all(pins / "s")
                pins.rmdir()

        return setup

    def fanotify(self, rules: bool, watched: bool) -> Callable[[], Iterator[None]]:
        def setup() -> Iterator[None]:
            cg = self.cg.stat().st_ino
            cs = compile_workload(thousand_rules(self.mnt) if rules else [], cg)
            d = CompiledDecider({cg: cs})
            fan = FanotifyEnforcer(
                d, None, [str(self.mnt if watched else self.other)], static=d.static
            ).start()
            try:
                yield
            finally:
                fan.stop()

        return setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exec-n", type=int, default=300)
    ap.add_argument("--open-n", type=int, default=50000)
    ap.add_argument("--connect-n", type=int, default=3000)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    b = Bench(args)
    b.setup()
    try:
        rows = [
            ("cgroup/0", "connect", b.cgroup(False)),
            ("cgroup/1000", "connect", b.cgroup(True)),
            ("cgroup/1000", "open", b.cgroup(True)),
            ("fan/0", "exec", b.fanotify(False, True)),
            ("fan/0", "open", b.fanotify(False, True)),
            ("fan/1000", "exec", b.fanotify(True, True)),
            ("fan/1000", "open", b.fanotify(True, True)),
            ("fan/unwatched", "exec", b.fanotify(True, False)),
            ("fan/unwatched", "open", b.fanotify(True, False)),
        ]
        print(f"{'candidate':<15}{'storm':<9}{'none ns/op':>12}{'with ns/op':>12}{'ratio':>8}")
        for name, mode, setup in rows:
            base, cand = b.measure(mode, setup)
            print(f"{name:<15}{mode:<9}{base:>12.0f}{cand:>12.0f}{cand / base:>7.3f}x", flush=True)
        from enforcer.backends import select
        from sensor.enforce import probe

        p = probe()
        if not p.lsm_loads:
            print(
                f"lsm/*          skipped: {select(p).notes[0] if select(p).notes else 'BPF-LSM unavailable'}"
            )
    finally:
        b.teardown()


if __name__ == "__main__":
    main()
