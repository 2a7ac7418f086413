"""bpf/file.bpf.c in the running kernel: a child in a watched cgroup opens files every way the
syscalls allow (absolute, relative to the cwd, relative to a dirfd, through a symlink, open(2),
creat(2), openat2(2), failing) and each open is exactly one record with the absolute path,
flags, mode, result, inode, device and owner; a child in an unwatched cgroup produces none.

The child brackets its work between two failing opens of unique marker paths: the test
stops draining at the end marker, never after a sleep.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enforcer import records
from enforcer.records import Kind, Visibility
from tests.monitor_env import Cgroups, cgroups, collect, run_script

pytestmark = [pytest.mark.root, pytest.mark.kernel]

# Runs in the cgroup; argv: start marker, end marker. Prints the fds it got, in order.
CHILD = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_open, SYS_creat, SYS_openat2 = 2, 85, 437
class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
how = OpenHow(os.O_RDONLY, 0, 0)
cwd = os.getcwd()
def tryopen(*a, **kw):
    try:
        return os.open(*a, **kw)
    except FileNotFoundError:
        return -2
start, end = sys.argv[1:3]
tryopen(start, os.O_RDONLY)
fds = []
fds.append(os.open(cwd + "/owned.txt", os.O_RDONLY))
fds.append(os.open("rel.txt", os.O_WRONLY | os.O_APPEND))
d = os.open("sub", os.O_RDONLY | os.O_DIRECTORY); fds.append(d)
fds.append(os.open("in-sub.txt", os.O_RDONLY, dir_fd=d))
fds.append(tryopen("missing.txt", os.O_RDONLY))
fds.append(tryopen("nope/x", os.O_RDONLY, dir_fd=d))
fds.append(os.open("created.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
fds.append(os.open("link", os.O_RDONLY))
fds.append(libc.syscall(SYS_open, (cwd + "/rel.txt").encode(), os.O_RDONLY, 0))
fds.append(libc.syscall(SYS_creat, b"made-by-creat", 0o600))
fds.append(libc.syscall(SYS_openat2, d, b"in-sub.txt", ctypes.byref(how), ctypes.sizeof(how)))
tryopen(end, os.O_RDONLY)
print(json.dumps(fds))
"""


@dataclass
class Env:
    mon: object  # sensor.monitors.FileMonitor
    cg: Cgroups


@pytest.fixture(params=[False, True], ids=["plain-loads", "portable"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Each test runs on both builds of the monitor (bpf/cast.bpf.h): the same records."""
    portable: bool = request.param
    with cgroups("file.portable.bpf.o" if portable else "file.bpf.o") as cg:
        from sensor.monitors import FileMonitor

        e = Env(FileMonitor(pin_dir=cg.pin_dir, portable=portable), cg)
        try:
            e.mon.watch(cg.watched_id)  # type: ignore[attr-defined]
            yield e
        finally:
            e.mon.close()  # type: ignore[attr-defined]  # a test may have replaced it


def make_work(base: Path) -> Path:
    """A directory the child works in: files with known owners, a subdirectory, a symlink."""
    w = Path(os.path.realpath(base)) / "work dir"
    (w / "sub").mkdir(parents=True)
    (w / "owned.txt").write_text("a")
    os.chown(w / "owned.txt", 4321, 4322)
    (w / "rel.txt").write_text("b")
    (w / "sub" / "in-sub.txt").write_text("c")
    (w / "link").symlink_to(w / "sub" / "in-sub.txt")
    return w


def markers() -> tuple[str, str]:
    tag = uuid.uuid4().hex
    return f"/as-start-{tag}", f"/as-end-{tag}"


def between(recs: np.ndarray, pid: int, start: str, end: str) -> np.ndarray:
    """The child's records after its start marker and before its end marker."""
    mine = recs[recs["hdr"]["host_pid"] == pid]
    paths = records.text(mine["path"])
    out: np.ndarray = mine[paths.index(start) + 1 : paths.index(end)]
    return out


def until_path(pid: int, path: str) -> Callable[[dict[int, np.ndarray]], bool]:
    def done(got: dict[int, np.ndarray]) -> bool:
        f = got.get(Kind.FILE)
        return f is not None and path in records.text(f[f["hdr"]["host_pid"] == pid]["path"])

    return done


def test_opens_in_watched_cgroup(env: Env, tmp_path: Path) -> None:
    start, end = markers()
    # The same child in the unwatched sibling first: it must produce nothing at all.
    other_pid, _ = run_script(env.cg.other, make_work(tmp_path / "other"), CHILD, *markers())
    work = make_work(tmp_path)
    pid, fds = run_script(env.cg.watched, work, CHILD, start, end)
    got = collect(env.mon.drain, until_path(pid, end))  # type: ignore[attr-defined]

    files = got[Kind.FILE]
    assert set(files["hdr"]["cgroup_id"].tolist()) == {env.cg.watched_id}
    assert other_pid not in files["hdr"]["host_pid"].tolist()
    recs = between(files, pid, start, end)
    sub = work / "sub"
    cloexec = os.O_CLOEXEC  # os.open makes every fd non-inheritable
    want = [
        # path, flags, mode
        (work / "owned.txt", os.O_RDONLY | cloexec, 0),
        (work / "rel.txt", os.O_WRONLY | os.O_APPEND | cloexec, 0),
        (sub, os.O_RDONLY | os.O_DIRECTORY | cloexec, 0),
        (sub / "in-sub.txt", os.O_RDONLY | cloexec, 0),
        (work / "missing.txt", os.O_RDONLY | cloexec, 0),
        (sub / "nope/x", os.O_RDONLY | cloexec, 0),
        (work / "created.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o640),
        (sub / "in-sub.txt", os.O_RDONLY | cloexec, 0),  # "link": the file it points to
        (work / "rel.txt", os.O_RDONLY, 0),  # open(2)
        (work / "made-by-creat", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600),  # creat(2)
        (sub / "in-sub.txt", os.O_RDONLY, 0),  # openat2(2)
    ]
    cols = records.columns(recs)
    got_rows = list(
        zip(records.text(cols["path"]), cols["open_flags"].tolist(), cols["mode"].tolist(), strict=True)
    )
    assert got_rows == [(str(p), f, m) for p, f, m in want]
    assert cols["ret"].tolist() == fds
    assert fds[4] == fds[5] == -2  # ENOENT, as the kernel returned it

    for i, (path, _, _) in enumerate(want):
        if fds[i] < 0:
            assert (int(cols["ino"][i]), int(cols["dev"][i]), int(cols["owner_uid"][i])) == (0, 0, 0xFFFFFFFF)
            continue
        st = path.stat()
        assert (int(cols["ino"][i]), int(cols["dev"][i])) == (st.st_ino, st.st_dev), path
        assert int(cols["owner_uid"][i]) == st.st_uid
    assert int(cols["owner_uid"][0]) == 4321
    assert set(cols["uid"].tolist()) == {0}
    assert set(cols["flags"].tolist()) == {0}
    assert set(cols["comm"].tolist()) == {Path(sys.executable).name[:15].encode()}
    h = recs["hdr"][0]
    assert int(h["pid"]) == int(h["host_pid"]) == pid
    assert int(h["mnt_ns"]) == os.stat("/proc/self/ns/mnt").st_ino
    assert Kind.LOST not in got


def test_visibility_bits_are_respected(env: Env, tmp_path: Path) -> None:
    env.mon.watch(env.cg.watched_id, Visibility.NETWORK | Visibility.PROCESS)  # type: ignore[attr-defined]
    silent_pid, _ = run_script(env.cg.watched, make_work(tmp_path / "silent"), CHILD, *markers())
    work = make_work(tmp_path)
    env.mon.watch(env.cg.watched_id)  # type: ignore[attr-defined]  # FILE again
    start, end = markers()
    pid, _ = run_script(env.cg.watched, work, CHILD, start, end)
    got = collect(env.mon.drain, until_path(pid, end))  # type: ignore[attr-defined]
    assert silent_pid not in got[Kind.FILE]["hdr"]["host_pid"].tolist()


def test_relative_path_deeper_than_a_record_is_cut_and_flagged(env: Env, tmp_path: Path) -> None:
    components = [f"component-{i:02d}" for i in range(30)]  # deeper than AS_PATH_LEN
    deep = Path(os.path.realpath(tmp_path)).joinpath(*components)
    deep.mkdir(parents=True)
    start, end = markers()
    script = (
        "import os, sys\n"
        "for p in (sys.argv[1], 'nothing-here', sys.argv[2]):\n"
        "    try: os.open(p, os.O_RDONLY)\n"
        "    except OSError: pass\n"
    )
    pid, _ = run_script(env.cg.watched, deep, script, start, end)
    recs = between(collect(env.mon.drain, until_path(pid, end))[Kind.FILE], pid, start, end)  # type: ignore[attr-defined]
    assert len(recs) == 1
    path = records.text(recs["path"])[0]
    assert int(recs["hdr"]["flags"][0]) & records.Flag.TRUNC_PATH
    assert int(recs["hdr"]["ret"][0]) == -2
    # The cwd keeps its leaf end; the join keeps the start of the result.
    assert path.startswith("/") and len(path) == records.AS_PATH_LEN - 1
    assert (str(deep) + "/nothing-here").find(path[path.index("component") :]) >= 0


def test_host_visibility_reports_host_tasks_flagged() -> None:
    # No watched cgroup at all: this (host) process is reported because host visibility is on.
    with cgroups("file.bpf.o") as cg:
        from sensor.monitors import FileMonitor

        with FileMonitor(pin_dir=cg.pin_dir, host_visibility=Visibility.FILE) as mon:
            target = f"/as-host-{uuid.uuid4().hex}"
            with pytest.raises(FileNotFoundError):
                os.open(target, os.O_RDONLY)
            recs = collect(mon.drain, until_path(os.getpid(), target))[Kind.FILE]
    mine = recs[(recs["hdr"]["host_pid"] == os.getpid()) & (recs["path"] == target.encode())]
    assert len(mine) == 1
    assert int(mine["hdr"]["flags"][0]) == records.Flag.HOST
    assert int(mine["hdr"]["ret"][0]) == -2
    assert int(mine["hdr"]["cgroup_id"][0]) != cg.watched_id


def test_pinned_ring_and_watch_set_survive_restart(env: Env, tmp_path: Path) -> None:
    from sensor.monitors import FileMonitor

    start, end = markers()
    pid, _ = run_script(env.cg.watched, make_work(tmp_path), CHILD, start, end)  # left unread in the ring
    env.mon.close()  # type: ignore[attr-defined]
    env.mon = FileMonitor(pin_dir=env.cg.pin_dir)  # no watch(): the pinned as_watched is reused
    recs = between(collect(env.mon.drain, until_path(pid, end))[Kind.FILE], pid, start, end)
    assert len(recs) == 11


def test_a_kernel_that_refuses_the_plain_load_build_gets_the_portable_one(tmp_path: Path) -> None:
    """Kernels before 6.2 have no bpf_rdonly_cast: the sensor then loads %.portable.bpf.o and
    its start-up report says why. Here the plain build is made unloadable."""
    with cgroups("file.portable.bpf.o") as cg:
        from sensor.libbpf import BpfError
        from sensor.monitors import FileMonitor

        objects = tmp_path / "objects"
        objects.mkdir()
        (objects / "file.bpf.o").write_bytes(b"\x7fELF not really")
        shutil.copy(Path(__file__).resolve().parents[1] / "bpf" / ".output" / "file.portable.bpf.o", objects)
        with FileMonitor(pin_dir=cg.pin_dir, objects=objects) as mon:
            assert mon.path.name == "file.portable.bpf.o"
            assert mon.reads.startswith("helper reads (the plain-load build was refused: ")
            assert "as_exit_openat" in mon.hooks
        with pytest.raises(BpfError):
            FileMonitor(pin_dir=cg.pin_dir, objects=objects, portable=False)
