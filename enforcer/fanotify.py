"""fanotify permission backend: exec and open decided in user space, for kernels without BPF-LSM.

The kernel holds each FAN_OPEN_EXEC_PERM / FAN_OPEN_PERM event until we write
FAN_ALLOW or FAN_DENY for it. So the loop here must always answer: any error while
deciding allows the access and is counted, the sensor's own threads are always allowed,
and closing the group (also by a crash) makes the kernel allow whatever is pending.

Cost control: marks go only on the mounts of watched workloads (a container's root
mount), and once a file is known to be allowed for everyone (no rule can name it, no
workload is in allow-list mode) its inode gets an ignore mark and never comes back.
`reset()` swaps in a fresh group (new marks first, then the old group closes) to drop
those ignore marks when the rules change, with no moment unwatched.

Pure ctypes over libc; x86_64 syscall numbers for reading the opener's flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from enforcer.compiler import (
    FP_KEY,
    MAP_FP,
    RULE_VAL,
    RV_HINT,
    CompiledSet,
    Decision,
    FpKind,
    Scope,
    WlFlag,
    lookup_exec,
    lookup_open,
)
from enforcer.errors import ArmorstreamError
from enforcer.matcher import glob_to_regex
from enforcer.policy.model import Action, Target

__all__ = [
    "FAN_OPEN_EXEC_PERM",
    "FAN_OPEN_PERM",
    "Access",
    "CompiledDecider",
    "FanotifyEnforcer",
    "FanotifyError",
    "Stats",
    "cgroup_id_of",
    "fanotify_available",
]

ENFORCER_NAME: Final = "Fanotify"

FAN_CLOEXEC: Final = 0x01
FAN_NONBLOCK: Final = 0x02
FAN_CLASS_CONTENT: Final = 0x04
FAN_UNLIMITED_QUEUE: Final = 0x10
FAN_UNLIMITED_MARKS: Final = 0x20
FAN_REPORT_TID: Final = 0x100
FAN_OPEN_PERM: Final = 0x0001_0000
FAN_OPEN_EXEC_PERM: Final = 0x0004_0000
FAN_MARK_ADD: Final = 0x01
FAN_MARK_MOUNT: Final = 0x10
FAN_MARK_IGNORED_MASK: Final = 0x20
FAN_MARK_IGNORED_SURV_MODIFY: Final = 0x40
FAN_ALLOW: Final = 0x01
FAN_DENY: Final = 0x02
FAN_NOFD: Final = -1
METADATA_VERSION: Final = 3
AT_FDCWD: Final = -100

_META: Final = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_RESPONSE: Final = struct.Struct("=iI")  # fd, response
_O_ACCMODE: Final = 0o3
_O_WRITE_BITS: Final = os.O_CREAT | os.O_TRUNC | os.O_APPEND
# x86_64: syscall number -> index of the flags argument in /proc/TID/syscall
_OPEN_SYSCALLS: Final = {2: 1, 257: 2, 85: -1, 437: -2}  # open, openat, creat, openat2
CGROUP2_ROOT: Final = (
    "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


class FanotifyError(ArmorstreamError):
    """fanotify_init/fanotify_mark failed (the message names the call, path and errno)."""


def _init(flags: int, event_flags: int) -> int:
    fd = int(_libc.fanotify_init(flags, event_flags))
    if fd < 0:
        e = ctypes.get_errno()
        raise FanotifyError(f"fanotify_init(0x{flags:x}): {os.strerror(e)} (errno {e})")
    return fd


def _mark(fd: int, flags: int, mask: int, path: str | None, dirfd: int = AT_FDCWD) -> None:
    ret = _libc.fanotify_mark(fd, flags, mask, dirfd, None if path is None else path.encode())
    if ret < 0:
        e = ctypes.get_errno()
        raise FanotifyError(f"fanotify_mark(0x{flags:x}, {path!r}): {os.strerror(e)} (errno {e})")


def fanotify_available() -> str | None:
    """None if permission events work here, else why not."""
    try:
        os.close(_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY))
    except FanotifyError as e:
        return str(e)
    return None


def cgroup_id_of(pid: int) -> int:
    """cgroup v2 id of a process: the inode of its directory under the cgroup2 mount."""
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        for line in f:
            if line.startswith(b"0::"):
                rel = line[3:].strip().decode()
                return os.stat(CGROUP2_ROOT + rel).st_ino
    raise FileNotFoundError(f"/proc/{pid}/cgroup has no cgroup v2 line")


@dataclass(frozen=True, slots=True)
class Access:
    """One held exec or open, as the decider sees it (paths relative to the process's root)."""

    kind: FpKind  # PROCESS (exec) or FILE (open)
    path: str
    pid: int  # thread group id on the host
    tid: int
    ppid: int
    cgroup_id: int
    uid: int
    owner_uid: int
    write: bool
    process: str  # the acting binary (for an exec: the caller, not the new image)
    parent: str

    @property
    def is_owner(self) -> bool:
        return self.uid == self.owner_uid

    def log(self, d: Decision) -> dict[str, object]:
        """KubeArmor Log/Alert fields for this access (`karmor logs --json` names)."""
        v = d.verdict()
        rec: dict[str, object] = {
            "HostPID": self.pid,
            "HostPPID": self.ppid,
            "UID": self.uid,
            "ProcessName": self.path if self.kind is FpKind.PROCESS else self.process,
            "ParentProcessName": self.process if self.kind is FpKind.PROCESS else self.parent,
            "Source": self.process,
            "Operation": "Process" if self.kind is FpKind.PROCESS else "File",
            "Resource": self.path,
            "Data": "syscall=SYS_EXECVE" if self.kind is FpKind.PROCESS else "syscall=SYS_OPENAT",
            "Enforcer": ENFORCER_NAME,
            "CgroupID": self.cgroup_id,
        }
        rec.update(v.fields())
        return rec


Decider = Callable[[Access], Decision]
Reporter = Callable[[Access, Decision], None]


@dataclass
class Stats:
    events: int = 0
    allowed: int = 0
    denied: int = 0
    audited: int = 0
    own: int = 0  # the sensor's own accesses, always allowed
    errors: int = 0  # decisions that failed and were allowed
    ignored_inodes: int = 0
    interpreters: int = 0  # ld.so / script interpreters opened during an exec: not judged
    last_error: str = ""


class CompiledDecider:
    """Decides accesses from compiled rule sets keyed by cgroup id (the kernel's logic).

    `static(kind, path)` says whether the answer is "allow, nothing to report" for every
    process of every watched workload, which makes the inode safe to ignore. Decisions
    are cached per (workload, kind, path, sources, owner, write) until `replace`.
    """

    def __init__(self, sets: Mapping[int, CompiledSet] | None = None, cache_size: int = 65536) -> None:
        self.sets: dict[int, CompiledSet] = {}
        self.cache_size = cache_size
        self._cache: dict[tuple[object, ...], Decision] = {}
        self._allow_all = False
        self.replace(sets or {})

    def replace(self, sets: Mapping[int, CompiledSet]) -> None:
        self.sets = dict(sets)
        self._cache = {}
        exact: dict[FpKind, set[str]] = {FpKind.PROCESS: set(), FpKind.FILE: set()}
        names: set[str] = set()
        dirs: dict[FpKind, set[str]] = {FpKind.PROCESS: set(), FpKind.FILE: set()}
        listing = False
        for cs in self.sets.values():
            f = cs.flags
            listing |= bool(f & (WlFlag.ALLOW_PROC | WlFlag.ALLOW_FILE))
            for k, v in cs.maps[MAP_FP].items():
                _cg, _gen, kind, scope, _pad, raw_path, _src = FP_KEY.unpack(k)
                variants, flags = RULE_VAL.unpack(v)[:2]
                path = raw_path.rstrip(b"\0").decode()
                if kind == FpKind.EXECNAME:
                    names.add(path)
                elif scope == Scope.EXACT:
                    exact[FpKind(kind)].add(path)
                elif variants or not flags & RV_HINT:
                    dirs[FpKind(kind)].add(path)
        self._exact, self._names, self._dirs, self._allow_all = exact, names, dirs, listing
        self._user = [
            (r.kind, r, glob_to_regex(r.value) if r.target is Target.PATTERN else None)
            for cs in self.sets.values()
            for r in cs.user_rules
        ]

    def static(self, kind: FpKind, path: str) -> bool:
        if self._allow_all or path in self._exact[kind]:
            return False
        if kind is FpKind.PROCESS and path.rpartition("/")[2] in self._names:
            return False
        dirs = self._dirs[kind]
        if dirs:
            if path + "/" in dirs:
                return False
            i = path.find("/")
            while i != -1:
                if path[: i + 1] in dirs:
                    return False
                i = path.find("/", i + 1)
        for k, r, rx in self._user:
            if k is not kind:
                continue
            if rx is not None:
                if rx.match(path):
                    return False
            elif r.exec_name:
                if path.rpartition("/")[2] == r.value:
                    return False
            elif path == r.value or path.startswith(r.value if r.value.endswith("/") else r.value + "/"):
                return False
        return True

    def __call__(self, a: Access) -> Decision:
        key = (a.cgroup_id, a.kind, a.path, a.process, a.parent, a.is_owner, a.write)
        d = self._cache.get(key)
        if d is None:
            d = self._decide(a)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # FIFO: cheap, and hits dominate
            self._cache[key] = d
        return d

    def _decide(self, a: Access) -> Decision:
        cs = self.sets.get(a.cgroup_id)
        if cs is None:
            return Decision(Action.ALLOW)
        if a.kind is FpKind.PROCESS:
            # KubeArmor's exec event: Source and ParentProcessName are both the exec-ing
            # binary, ProcessName the new one (lookup_exec adds it).
            return lookup_exec(cs, a.cgroup_id, a.path, (a.process,), a.is_owner)
        return lookup_open(cs, a.cgroup_id, a.path, (a.process, a.parent), a.is_owner, a.write)


def _status(tid: int) -> tuple[int, int, int]:
    """(tgid, ppid, fsuid) of a thread."""
    tgid = ppid = uid = -1
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                tgid = int(line.split()[1])
            elif line.startswith(b"PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith(b"Uid:"):
                uid = int(line.split()[4])  # fsuid: the id file access checks use
                break
    return tgid, ppid, uid


def _open_writes(tid: int) -> bool:
    """Whether the thread's pending open asks for write access (from /proc/TID/syscall).

    Unknown (another syscall, a read failure): True, so a readOnly rule errs on denying.
    """
    try:
        with open(f"/proc/{tid}/syscall", "rb") as f:
            fields = f.read().split()
        nr = int(fields[0])
        idx = _OPEN_SYSCALLS.get(nr)
        if idx is None:
            return True
        if idx == -1:  # creat
            return True
        if idx == -2:  # openat2(dfd, path, struct open_how *how, size): flags at how+0
            addr = int(fields[3], 16)
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
            try:
                flags = struct.unpack("<Q", os.pread(fd, 8, addr))[0]
            finally:
                os.close(fd)
        else:
            flags = int(fields[1 + idx], 16)
    except (OSError, ValueError, IndexError, struct.error):
        return True
    return bool((flags & _O_ACCMODE) != os.O_RDONLY or flags & _O_WRITE_BITS)


_EXEC_SYSCALLS: Final = {59: 0, 322: 1}  # x86_64 execve, execveat -> index of the filename argument


def _read_cstring(tid: int, addr: int, limit: int = 4096) -> bytes:
    fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, limit, addr).split(b"\0", 1)[0]
    except OSError:
        # The string may end near a page boundary: read up to it.
        return os.pread(fd, 4096 - (addr & 4095), addr).split(b"\0", 1)[0]
    finally:
        os.close(fd)


def _is_exec_target(tid: int, efd: int) -> bool:
    """Whether the held FAN_OPEN_EXEC_PERM open is the binary named to execve.

    The kernel also opens an ELF interpreter (ld.so) or a script's interpreter with
    exec intent inside the same execve; BPF-LSM's bprm_check_security judges only the
    program, so we do too. Unknown (cannot read the syscall): judge it.
    """
    try:
        with open(f"/proc/{tid}/syscall", "rb") as f:
            fields = f.read().split()
        idx = _EXEC_SYSCALLS.get(int(fields[0]))
        if idx is None:
            return True
        name = _read_cstring(tid, int(fields[1 + idx], 16)).decode(errors="surrogateescape")
        if not name:
            return True  # execveat(fd, "", AT_EMPTY_PATH): the fd is the program
        if name.startswith("/"):
            target = f"/proc/{tid}/root{name}"
        elif idx == 1 and int(fields[1], 16) & 0xFFFFFFFF != AT_FDCWD & 0xFFFFFFFF:
            target = f"/proc/{tid}/fd/{int(fields[1], 16)}/{name}"
        else:
            target = f"/proc/{tid}/cwd/{name}"
        a, b = os.stat(target), os.fstat(efd)
    except (OSError, ValueError, IndexError):
        return True
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _in_root(path: str, root: str) -> str:
    """A host path as the process sees it (strip its root directory, e.g. a container rootfs)."""
    if root != "/" and path.startswith(root + "/"):
        return path[len(root) :]
    return path


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


class FanotifyEnforcer:
    """One fanotify group answering exec/open permission events for marked mounts."""

    def __init__(
        self,
        decide: Decider,
        report: Reporter | None = None,
        mounts: Iterable[str] = (),
        exec_only: bool = False,
        static: Callable[[FpKind, str], bool] | None = None,
    ) -> None:
        self.decide = decide
        self.report = report
        self.mask = FAN_OPEN_EXEC_PERM | (0 if exec_only else FAN_OPEN_PERM)
        self.mounts: list[str] = []
        self.static = static
        self.stats = Stats()
        self._fd = -1
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fd = self._new_group()
        for m in mounts:
            self.watch(m)

    def _new_group(self) -> int:
        # FAN_DENY fails the syscall with EPERM, as a BPF-LSM denial does (6.14's custom
        # errnos exclude EACCES). FAN_REPORT_TID: /proc/TID/syscall shows the open flags.
        flags = FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID
        return _init(
            flags | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
        )

    @property
    def fd(self) -> int:
        return self._fd

    def watch(self, mount: str) -> None:
        """Mark the mount that `mount` lies on (a container's root: /proc/PID/root)."""
        _mark(self._fd, FAN_MARK_ADD | FAN_MARK_MOUNT, self.mask, mount)
        self.mounts.append(mount)

    def watch_process(self, pid: int, path: str = "/") -> None:
        """Mark the mount at `path` as process `pid` sees it, in its own mount namespace.

        A container's root is `watch_process(pid)`: the magic link /proc/PID/root leads to
        the container's root mount, which the host's view of the rootfs directory is not.
        """
        self.watch(f"/proc/{pid}/root{path.rstrip('/')}")

    def reset(self) -> None:
        """Drop ignore marks after a rule change: new group and marks first, then the old closes."""
        fd = self._new_group()
        for m in self.mounts:
            _mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, self.mask, m)
        with self._lock:
            old, self._fd = self._fd, fd
        os.write(self._wake_w, b"r")
        # The new group already judges every access. Closing the old one makes the kernel
        # allow what it still holds (the new group holds the same accesses), and close()
        # can wait on the kernel: never in the loop thread, never under our lock.
        threading.Thread(target=os.close, args=(old,), name="fanotify-retire", daemon=True).start()

    # -- the event loop ------------------------------------------------------------------

    def start(self) -> FanotifyEnforcer:
        self._thread = threading.Thread(target=self._run, name="fanotify-enforcer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"s")
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # the kernel allows whatever was still pending
        for p in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(p)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        while not self._stop.is_set():
            fd = self._fd
            if fd < 0:
                return
            try:
                ready, _, _ = select.select([fd, self._wake_r], [], [], 1.0)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                continue
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            if fd in ready:
                try:
                    self._drain(fd)
                except Exception as e:  # the loop must outlive any error: unanswered means hung
                    self.stats.errors += 1
                    self.stats.last_error = f"loop: {type(e).__name__}: {e}"

    def poll_once(self) -> int:
        """Handle what is queued now (for callers that run their own loop)."""
        return self._drain(self._fd)

    def _drain(self, fd: int) -> int:
        handled = 0
        while True:
            try:
                buf = os.read(fd, 64 * 1024)
            except BlockingIOError:
                return handled
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL):
                    return handled
                raise
            if not buf:
                return handled
            off = 0
            while off + _META.size <= len(buf):
                event_len, vers, _r, _meta_len, mask, efd, tid = _META.unpack_from(buf, off)
                if event_len < _META.size:
                    break
                off += event_len
                handled += 1
                if vers != METADATA_VERSION or efd == FAN_NOFD:
                    continue
                try:
                    self._handle(fd, efd, mask, tid)
                finally:
                    os.close(efd)

    def _handle(self, gfd: int, efd: int, mask: int, tid: int) -> None:
        st = self.stats
        st.events += 1
        allow = True
        try:
            if os.path.exists(f"/proc/self/task/{tid}"):
                st.own += 1
            else:
                allow = self._judge(gfd, efd, mask, tid)
        except Exception as e:  # a failing decision must never hang the caller
            st.errors += 1
            st.last_error = f"{type(e).__name__}: {e}"
            allow = True
        finally:
            self._respond(gfd, efd, allow)
        if allow:
            st.allowed += 1
        else:
            st.denied += 1

    def _respond(self, gfd: int, efd: int, allow: bool) -> None:
        try:
            os.write(gfd, _RESPONSE.pack(efd, FAN_ALLOW if allow else FAN_DENY))
        except OSError as e:  # ENOENT: already answered by a closing group
            self.stats.errors += 1
            self.stats.last_error = f"response: {e}"

    def _judge(self, gfd: int, efd: int, mask: int, tid: int) -> bool:
        kind = FpKind.PROCESS if mask & FAN_OPEN_EXEC_PERM else FpKind.FILE
        if kind is FpKind.PROCESS and not _is_exec_target(tid, efd):
            self.stats.interpreters += 1
            return True
        host_path = os.readlink(f"/proc/self/fd/{efd}")
        tgid, ppid, uid = _status(tid)
        try:
            root = os.readlink(f"/proc/{tgid}/root")
        except OSError:
            root = "/"
        path = _in_root(host_path, root)
        if self.static is not None and self.static(FpKind.FILE, path) and self.static(FpKind.PROCESS, path):
            # Allowed for everyone, as a file and as a program: never ask about this inode
            # again (until reset()). An ignore mark covers the inode under every name.
            try:
                _mark(
                    gfd,
                    FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY,
                    self.mask,
                    None,
                    efd,
                )
                self.stats.ignored_inodes += 1
            except FanotifyError:
                pass
            return True
        a = Access(
            kind=kind,
            path=path,
            pid=tgid,
            tid=tid,
            ppid=ppid,
            cgroup_id=cgroup_id_of(tgid),
            uid=uid,
            owner_uid=os.fstat(efd).st_uid,
            write=kind is FpKind.FILE and _open_writes(tid),
            process=_in_root(_exe(tgid), root),
            parent=_in_root(_exe(ppid), root) if ppid > 0 else "",
        )
        d = self.decide(a)
        if d.action is not Action.ALLOW or d.posture:
            if d.action is Action.AUDIT:
                self.stats.audited += 1
            if self.report is not None:
                try:
                    self.report(a, d)
                except Exception as e:  # a failing decision must never hang the caller
                    self.stats.errors += 1
                    self.stats.last_error = f"report: {type(e).__name__}: {e}"
        return not d.blocked
