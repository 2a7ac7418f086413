"""bpf/process.bpf.c in the running kernel: processes in a watched cgroup (named like a
kubelet pod cgroup, optionally in their own pid/mount/uts namespaces) produce exactly
the expected exec/fork/exit records; processes elsewhere produce none.

Each test ends on a marker exec inside the watched cgroup, never on a sleep, and uses
its own cgroup and bpffs pin directory, removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enforcer import records
from enforcer.envelope import decode_batch, encode_batch
from enforcer.records import Kind
from tests.conftest import ROOT, need, need_cgroup2, need_root, need_tool

pytestmark = [pytest.mark.root, pytest.mark.kernel]



@dataclass
class Env:
    mon: object  # sensor.monitors.ProcessMonitor
    cgroup: Path
    cgroup_id: int
    pin_dir: Path


@pytest.fixture(params=[False, True], ids=["plain-loads", "portable"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Each test runs on both builds of the monitor (bpf/cast.bpf.h): the same records."""
    portable: bool = request.param
    need_root()
    need_tool("clang")
    need_tool("bpftool")
    need(Path("/sys/kernel/btf/vmlinux").exists(), "needs kernel BTF at /sys/kernel/btf/vmlinux")
    cg_root = need_cgroup2()
    obj = "process.portable.bpf.o" if portable else "process.bpf.o"
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), f".output/{obj}"], check=True)

    from sensor.libbpf import ensure_bpffs
    from sensor.monitors import ProcessMonitor

    ensure_bpffs()
    run = uuid.uuid4().hex
    pin_dir = Path("/sys/fs/bpf") / f"armorstream-test-{run[:12]}"
    # kubelet (cgroupfs driver) + containerd naming: kubepods/pod<uid>/<container id>
    pod = cg_root / f"as-test-{run[:8]}" / "kubepods" / f"pod{uuid.uuid4()}"
    cgroup = pod / (run + run)[:64]
    cgroup.mkdir(parents=True)
    mon, env_ = None, None
    try:
        mon = ProcessMonitor(pin_dir=pin_dir, portable=portable)
        assert mon.reads == ("helper reads" if portable else "plain loads")
        cgid = cgroup.stat().st_ino  # the cgroup v2 id is the kernfs inode number
        mon.watch(cgid)
        env_ = Env(mon, cgroup, cgid, pin_dir)
        mon = None  # owned by env_ from here
        yield env_
    finally:
        if mon is not None:
            mon.close()
        if env_ is not None:
            env_.mon.close()  # type: ignore[attr-defined]  # a test may have replaced it
        # Pins are files; tests may pin into subdirectories.
        for p in sorted(pin_dir.rglob("*"), reverse=True) if pin_dir.exists() else []:
            p.rmdir() if p.is_dir() else p.unlink()
        if pin_dir.exists():
            pin_dir.rmdir()
        for d in (cgroup, pod, pod.parent, pod.parent.parent):
            if d.exists():
                d.rmdir()


def run_in_cgroup(cgroup: Path, cwd: Path, *argv: str) -> None:
    """sh moves itself into the cgroup, changes directory, then execs argv (not recorded: sh
    started outside the cgroup; its exec of argv[0] is)."""
    script = 'echo $$ > "$0/cgroup.procs" && cd "$1" && shift && exec "$@"'
    subprocess.run(["sh", "-c", script, str(cgroup), str(cwd), *argv], check=True)


def collect(env: Env, marker: str, timeout: float = 10.0) -> dict[int, np.ndarray]:
    """Drain until the marker exec arrives; every batch goes through the Kafka envelope."""
    run_in_cgroup(env.cgroup, Path("/"), "/bin/true", marker)
    got: dict[int, list[np.ndarray]] = {}
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        for b in env.mon.drain.poll(100):  # type: ignore[attr-defined]
            hdr, recs = decode_batch(encode_batch(b.kind, b.records, node="test-node", seq=seq))
            seq += 1
            assert (hdr.kind, hdr.count) == (b.kind, b.count)
            got.setdefault(b.kind, []).append(recs)
        execs = got.get(Kind.EXEC, [])
        if any(marker in a for e in execs for a in records.argv(e)):
            return {k: np.concatenate(v) for k, v in got.items()}
    raise AssertionError(f"marker {marker} never arrived; got kinds {sorted(got)}")


def before_marker(recs: np.ndarray, marker: str) -> np.ndarray:
    return recs[[marker not in av for av in records.argv(recs)]]


def test_exec_in_watched_cgroup(env: Env, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    tag = f"arg-{uuid.uuid4().hex[:8]}"
    outside = f"outside-{uuid.uuid4().hex[:8]}"
    marker = f"marker-{uuid.uuid4().hex}"

    # Not in the watched cgroup, and host visibility is off: must produce nothing.
    subprocess.run(["/bin/true", outside], check=True)
    # setpriv drops to uid/gid 65534 and execs /bin/true with a known argv.
    run_in_cgroup(
        env.cgroup, work, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "/bin/true", tag, "two words", "",
    )  # fmt: skip
    got = collect(env, marker)

    ex = got[Kind.EXEC]
    cols = records.columns(ex)
    assert set(cols["cgroup_id"].tolist()) == {env.cgroup_id}
    assert all(outside not in av for av in records.argv(ex))
    mine = before_marker(ex, marker)
    assert [av[0] for av in records.argv(mine)] == ["setpriv", "/bin/true"]
    true = mine[1:]
    assert records.text(true["path"]) == [os.path.realpath("/bin/true")]
    assert records.argv(true) == [["/bin/true", tag, "two words", ""]]
    assert records.args_joined(true).tolist() == [f"/bin/true {tag} two words ".encode()]
    assert records.text(true["cwd"]) == [str(work)]
    h = true["hdr"][0]
    assert (int(h["uid"]), int(h["gid"])) == (65534, 65534)
    assert int(h["host_ppid"]) == os.getpid()
    assert int(h["pid"]) == int(h["host_pid"])  # host pid namespace
    assert h["comm"] == b"true"
    assert true["parent_comm"][0] == Path(f"/proc/{os.getpid()}/comm").read_text().strip().encode()
    st = Path(os.path.realpath("/bin/true")).stat()
    assert (int(true["exe_ino"][0]), int(true["exe_uid"][0])) == (st.st_ino, st.st_uid)
    assert int(h["flags"]) == 0
    assert int(h["mnt_ns"]) == os.stat("/proc/self/ns/mnt").st_ino
    assert int(h["pid_ns"]) == os.stat("/proc/self/ns/pid").st_ino

    # Exits: /bin/true (as uid 65534, status 0) and the marker; no fork (sh forked outside).
    ex_exit = got[Kind.EXIT]
    assert int(h["host_pid"]) in ex_exit["hdr"]["host_pid"].tolist()
    assert set(ex_exit["exit_code"].tolist()) == {0}
    assert Kind.FORK not in got
    assert Kind.LOST not in got
    assert env.mon.drain.lost_kernel == {}  # type: ignore[attr-defined]


def test_container_namespaces_and_fork(env: Env, tmp_path: Path) -> None:
    need_tool("unshare")
    marker = f"marker-{uuid.uuid4().hex}"
    tag = f"in-container-{uuid.uuid4().hex[:8]}"
    # unshare forks a child that is pid 1 of a new pid namespace, with its own mount/uts.
    run_in_cgroup(env.cgroup, tmp_path, "unshare", "--pid", "--fork", "--mount", "--uts", "/bin/true", tag)
    got = collect(env, marker)

    ex = before_marker(got[Kind.EXEC], marker)
    assert [av[0] for av in records.argv(ex)] == ["unshare", "/bin/true"]
    unshare, true = ex[0]["hdr"], ex[1]["hdr"]
    assert int(true["pid"]) == 1
    assert int(true["ppid"]) == 0  # the parent is outside the container's pid namespace
    assert int(true["host_ppid"]) == int(unshare["host_pid"])
    assert int(true["host_pid"]) != 1
    assert int(true["pid_ns"]) != int(unshare["pid_ns"])
    assert int(true["mnt_ns"]) != int(unshare["mnt_ns"])
    assert records.argv(ex[1:]) == [["/bin/true", tag]]
    assert records.text(ex[1:]["cwd"]) == [str(tmp_path)]

    fork = got[Kind.FORK]
    assert len(fork) == 1
    assert int(fork["hdr"]["host_pid"][0]) == int(unshare["host_pid"])
    assert int(fork["child_host_pid"][0]) == int(true["host_pid"])
    assert int(fork["child_pid"][0]) == 1


def test_unwatched_cgroup_is_silent(env: Env, tmp_path: Path) -> None:
    assert env.mon.unwatch(env.cgroup_id)  # type: ignore[attr-defined]
    run_in_cgroup(env.cgroup, tmp_path, "/bin/true", "silent")
    env.mon.watch(env.cgroup_id)  # type: ignore[attr-defined]
    marker = f"marker-{uuid.uuid4().hex}"
    got = collect(env, marker)
    assert [av[0] for av in records.argv(got[Kind.EXEC])] == ["/bin/true"]  # the marker only
    assert records.argv(got[Kind.EXEC]) == [["/bin/true", marker]]


def test_full_ring_is_counted_and_reported(env: Env, tmp_path: Path) -> None:
    from sensor.monitors import ProcessMonitor

    env.mon.close()  # type: ignore[attr-defined]
    # One page of ring: three exec records fit, the rest of the storm must be counted.
    env.mon = ProcessMonitor(pin_dir=env.pin_dir / "small", ring_bytes=4096)
    env.mon.watch(env.cgroup_id)
    storm = 10
    for i in range(storm):
        run_in_cgroup(env.cgroup, tmp_path, "/bin/true", f"storm-{i}")
    drain = env.mon.drain
    drain.ring.consume()
    first = drain.take()
    got = collect(env, f"marker-{uuid.uuid4().hex}")  # drained above, so the marker fits
    seen = {b.kind: b.count for b in first if b.kind != Kind.LOST}
    lost = [
        decode_batch(encode_batch(b.kind, b.records, node="n", seq=0))[1]
        for b in first
        if b.kind == Kind.LOST
    ]
    assert lost, "a one-page ring took a 10-exec storm without dropping"
    lost_by_kind = {r["hdr"]["comm"].decode(): int(r["hdr"]["ret"]) for batch in lost for r in batch}
    # Every record of the storm (an exec and an exit each) is either delivered or counted.
    assert seen.get(Kind.EXEC, 0) + lost_by_kind.get("EXEC", 0) == storm
    assert seen.get(Kind.EXIT, 0) + lost_by_kind.get("EXIT", 0) == storm
    assert drain.lost_kernel == {Kind[k]: v for k, v in lost_by_kind.items()}
    assert Kind.LOST not in got  # nothing more was lost after the drain


def test_pinned_state_survives_restart(env: Env, tmp_path: Path) -> None:
    from sensor.monitors import ProcessMonitor

    run_in_cgroup(env.cgroup, tmp_path, "/bin/true", "before-restart")  # left unread in the ring
    env.mon.close()  # type: ignore[attr-defined]
    env.mon = ProcessMonitor(pin_dir=env.pin_dir)  # no watch(): the pinned as_watched is reused
    marker = f"marker-{uuid.uuid4().hex}"
    got = collect(env, marker)
    assert records.argv(got[Kind.EXEC]) == [["/bin/true", "before-restart"], ["/bin/true", marker]]


def test_high_water_stops_without_losing_or_repeating(env: Env, tmp_path: Path) -> None:
    # Every record crosses the high-water mark, so every poll stops right after one sample:
    # libbpf must already have consumed that sample (no repeat) and keep the rest (no loss).
    env.mon.drain.ring.high_water = 1  # type: ignore[attr-defined]
    for i in range(5):
        run_in_cgroup(env.cgroup, tmp_path, "/bin/true", f"hw-{i}")
    got = collect(env, f"marker-{uuid.uuid4().hex}")
    assert [av[1] for av in records.argv(got[Kind.EXEC])][:5] == [f"hw-{i}" for i in range(5)]
    exec_pids = got[Kind.EXEC]["hdr"]["host_pid"].tolist()
    exit_pids = got[Kind.EXIT]["hdr"]["host_pid"].tolist()  # the marker's exit may still be pending
    assert len(exec_pids) == len(set(exec_pids)) == 6
    assert len(exit_pids) == len(set(exit_pids)) and set(exec_pids[:5]) <= set(exit_pids)


def test_long_cwd_is_cut_and_flagged(env: Env, tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*[f"component-{i:02d}" for i in range(30)])  # > AS_PATH_LEN
    deep.mkdir(parents=True)
    marker = f"marker-{uuid.uuid4().hex}"
    run_in_cgroup(env.cgroup, deep, "/bin/true", "deep")
    ex = before_marker(collect(env, marker)[Kind.EXEC], marker)
    cwd = records.text(ex["cwd"])[0]
    assert int(ex["hdr"]["flags"][0]) & records.Flag.TRUNC_PATH
    # The leaf end is kept: the most specific part of the path.
    assert str(deep).endswith(cwd) and cwd.startswith("/") and len(cwd) < records.AS_PATH_LEN
    assert len(cwd) > records.AS_PATH_LEN - len("/component-00") - 1
