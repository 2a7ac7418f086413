"""Raw record arrays -> event columns carrying KubeArmor's field values.

Sans-I/O: a decoded batch (header + numpy structured array, from
enforcer.envelope) goes in, an `EventColumns` comes out. Numeric fields stay
numpy arrays; the string fields KubeArmor prints (Resource, Data, ProcessName,
...) are built once per record with list comprehensions, never with a Python
object per event beyond the string itself.

Process names: records carry only `comm`, so a `ProcessTable` per node keeps
host pid -> executable path from exec records (fork copies it to the child,
exit removes it). Raw topics are keyed by node, so one worker sees all of a
node's records in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from enforcer.records import Kind, NetOp, ip_strings

__all__ = ["EventColumns", "ProcessTable", "decode_records", "result_strings"]

# KubeArmor's Operation per record kind; kinds absent here (exit, fork, lost)
# update state or counters but are not KubeArmor events.
OPERATION: dict[int, str] = {
    Kind.EXEC: "Process",
    Kind.FILE: "File",
    Kind.NET: "Network",
    Kind.CAP: "Capabilities",
}

_AF = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET"}
_SOCK = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM", 5: "SOCK_SEQPACKET"}
_PROTO = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 255: "RAW"}
_NET_SYSCALL = {
    NetOp.SOCKET: "SYS_SOCKET",
    NetOp.CONNECT: "SYS_CONNECT",
    NetOp.BIND: "SYS_BIND",
    NetOp.LISTEN: "SYS_LISTEN",
    NetOp.ACCEPT: "SYS_ACCEPT",
}
_CAPS = (  # CAP_* names by number
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# O_* flag names as strace and KubeArmor print them (x86-64 values).
_O_FLAGS = (
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o200000, "O_DIRECTORY"),
    (0o400000, "O_NOFOLLOW"), (0o2000000, "O_CLOEXEC"), (0o20000000, "O_PATH"),
)
_WRITE_BITS = 0o100 | 0o1000 | 0o2000  # O_CREAT, O_TRUNC, O_APPEND (as enforcer.karmor_log reads Data)


def _col(arr: np.ndarray, name: str) -> np.ndarray:
    """A field of the record body, or of its nested common header."""
    return arr[name] if name in (arr.dtype.names or ()) else arr["hdr"][name]


def _strings(col: np.ndarray) -> list[str]:
    """Fixed-size C char arrays -> str (up to the first NUL)."""
    if col.dtype.kind != "S":  # declared as uint8[N]: view the same bytes as S<N>
        col = np.ascontiguousarray(col).view(f"S{col.shape[-1]}").reshape(col.shape[:-1])
    raw = col.tolist()  # numpy drops the trailing NULs
    # The whole column in one decode: a NUL ends any UTF-8 sequence, so each string decodes
    # (errors replaced) exactly as alone. A string with bytes after its first NUL (a reused
    # buffer) shows up as an extra piece; then each is cut at its NUL.
    out = b"\0".join(raw).decode("utf-8", "replace").split("\0")
    if len(out) == len(raw):
        return out
    return [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in raw]


_OPEN_DATA: dict[int, str] = {}


def _open_data(flags: list[int]) -> list[str]:
    """Data of each open: a few distinct flag sets per batch, so one string each, then a C-level map."""
    for f in set(flags).difference(_OPEN_DATA):
        _OPEN_DATA[f] = f"syscall=SYS_OPENAT flags={_flags_text(f)}"
    return list(map(_OPEN_DATA.__getitem__, flags))


def _flags_text(flags: int) -> str:
    acc = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & 3]
    return "|".join([acc, *(name for bit, name in _O_FLAGS if flags & bit)])


_RESULTS: dict[int, str] = {}


def result_strings(ret: np.ndarray) -> list[str]:
    """KubeArmor's Result: "Passed", or the errno's message ("Permission denied")."""
    out = []
    for r in ret.tolist():
        s = _RESULTS.get(r)
        if s is None:
            s = _RESULTS[r] = "Passed" if r >= 0 else os.strerror(-r)
        out.append(s)
    return out


@dataclass
class ProcessTable:
    """host pid -> executable path for one node, bounded (oldest entries go first)."""

    max_entries: int = 65536
    exe: dict[int, str] = field(default_factory=dict)

    def names(self, pids: Sequence[int], fallback: Sequence[str]) -> list[str]:
        if len(pids) != len(fallback):
            raise ValueError("pids and fallback differ in length")
        return list(map(self.exe.get, pids, fallback))  # no empty paths are kept (update)

    def update(self, pids: Sequence[int], paths: Sequence[str]) -> None:
        self.exe.update((p, e) for p, e in zip(pids, paths, strict=True) if e)
        self._trim()

    def forked(self, parents: Sequence[int], children: Sequence[int]) -> None:
        get = self.exe.get
        self.exe.update((c, e) for p, c in zip(parents, children, strict=True) if (e := get(p)))
        self._trim()

    def exited(self, pids: Sequence[int]) -> None:
        pop = self.exe.pop
        for p in pids:
            pop(p, None)

    def _trim(self) -> None:
        if len(self.exe) > self.max_entries:  # dicts keep insertion order: drop the oldest half
            keep = list(self.exe.items())[len(self.exe) // 2 :]
            self.exe = dict(keep)


@dataclass
class EventColumns:
    """One raw batch as columns. `operation` is None for kinds that are not KubeArmor events."""

    node: str
    seq: int
    kind: int
    operation: str | None
    ts_ns: np.ndarray  # wall clock, ns since the epoch
    cgroup_id: np.ndarray
    host_pid: np.ndarray
    host_ppid: np.ndarray
    pid: np.ndarray
    ppid: np.ndarray
    uid: np.ndarray
    ret: np.ndarray
    flags: np.ndarray
    index: np.ndarray  # position of each row in its raw batch (event_index in ClickHouse)
    process_name: list[str] = field(default_factory=list)
    parent_process_name: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    resource: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    cwd: list[str] = field(default_factory=list)
    owner_uid: np.ndarray | None = None  # owner of the file/binary (ownerOnly rules)
    write: np.ndarray | None = None  # File: the open may write (for readOnly rules)
    # String columns as Arrow arrays, set by the SIEM encoder (which builds them anyway) and
    # reused for the ClickHouse insert: each string converted once (stream.worker.groups_table).
    arrow: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ts_ns)

    def take(self, idx: np.ndarray) -> EventColumns:
        """The rows at `idx` (an index array), as a new EventColumns."""
        il = idx.tolist()
        gather = itemgetter(*il) if len(il) > 1 else None  # one C-level gather per list column

        def pick(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return v[idx]
            if isinstance(v, list):
                if not v:
                    return v
                return list(gather(v)) if gather is not None else [v[i] for i in il]
            return v

        return EventColumns(**{k: pick(v) for k, v in self.__dict__.items() if k != "arrow"})


def _net_resource(arr: np.ndarray) -> tuple[list[str], list[str]]:
    ops = _col(arr, "op").tolist()
    fams = _col(arr, "family").tolist()
    types = _col(arr, "type").tolist()
    protos = _col(arr, "protocol").tolist()
    dports = _col(arr, "dport").tolist()
    sports = _col(arr, "sport").tolist()
    fds = _col(arr, "fd").tolist()
    family = _col(arr, "family")
    dip = ip_strings(family, _col(arr, "daddr"))
    sip = ip_strings(family, _col(arr, "saddr"))
    resource, data = [], []
    for i, op in enumerate(ops):
        fam, typ, proto = fams[i], types[i] & 0xF, protos[i]  # type may carry SOCK_NONBLOCK/CLOEXEC bits
        pname = _PROTO.get(proto) or ("TCP" if typ == 1 else "UDP" if typ == 2 else str(proto))
        sysname = _NET_SYSCALL.get(op, f"op{op}")
        if op == NetOp.SOCKET:
            resource.append(
                f"domain={_AF.get(fam, fam)} type={_SOCK.get(typ, typ)} protocol={proto}"
            )
            data.append(f"syscall={sysname}")
            continue
        ip, port = (dip[i], dports[i]) if op == NetOp.CONNECT else (sip[i], sports[i])
        if op == NetOp.CONNECT:
            resource.append(f"remoteip={ip} port={port} protocol={pname}")
        else:
            resource.append(f"localip={ip} port={port} protocol={pname}")
        data.append(f"syscall={sysname} fd={fds[i]}")
    return resource, data


def decode_records(
    arr: np.ndarray, *, kind: int, node: str, seq: int, boot_wall_ns: int, procs: ProcessTable
) -> EventColumns:
    """Turn one batch's structured array into columns; updates `procs` (exec/fork/exit)."""
    ktime = _col(arr, "ktime_ns").astype(np.int64)
    host_pid = _col(arr, "host_pid")
    host_ppid = _col(arr, "host_ppid")
    cols = EventColumns(
        node=node, seq=seq, kind=kind, operation=OPERATION.get(kind),
        ts_ns=ktime + np.int64(boot_wall_ns),
        cgroup_id=_col(arr, "cgroup_id"), host_pid=host_pid, host_ppid=host_ppid,
        pid=_col(arr, "pid"), ppid=_col(arr, "ppid"), uid=_col(arr, "uid"),
        ret=_col(arr, "ret"), flags=_col(arr, "flags"), index=np.arange(len(arr), dtype=np.uint32),
    )
    pids, ppids = host_pid.tolist(), host_ppid.tolist()
    if kind == Kind.FORK:
        procs.forked(pids, _col(arr, "child_host_pid").tolist())
        return cols
    if kind == Kind.EXIT:
        procs.exited(pids)
        return cols
    if cols.operation is None:  # lost-records markers and kinds this version does not know
        return cols
    comm = _strings(_col(arr, "comm"))
    n = len(arr)
    if kind == Kind.EXEC:
        path = _strings(_col(arr, "path"))
        pcomm = _strings(_col(arr, "parent_comm"))
        parent = procs.names(ppids, pcomm)
        procs.update(pids, path)
        args = [
            a[:used].strip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
            for a, used in zip(
                _col(arr, "args").tolist(), _col(arr, "args_len").tolist(), strict=True
            )
        ]
        # argv[0] is already in the path; KubeArmor prints "path arg1 arg2".
        rest = [a.split(" ", 1)[1] if " " in a else "" for a in args]
        cols.process_name = path
        cols.parent_process_name = parent
        cols.source = parent
        cols.resource = [f"{p} {r}" if r else p for p, r in zip(path, rest, strict=True)]
        cols.data = ["syscall=SYS_EXECVE"] * n
        cols.cwd = _strings(_col(arr, "cwd"))
        cols.owner_uid = _col(arr, "exe_uid")
        return cols
    proc = procs.names(pids, comm)
    cols.process_name = proc
    cols.source = proc
    cols.parent_process_name = procs.names(ppids, [""] * n)
    if kind == Kind.FILE:
        cols.resource = _strings(_col(arr, "path"))
        cols.data = _open_data(_col(arr, "open_flags").tolist())
        cols.owner_uid = _col(arr, "owner_uid")
        of = _col(arr, "open_flags")
        cols.write = ((of & 3) != 0) | ((of & _WRITE_BITS) != 0)
    elif kind == Kind.NET:
        cols.resource, cols.data = _net_resource(arr)
    elif kind == Kind.CAP:
        caps = _col(arr, "cap").tolist()
        cols.resource = [f"CAP_{_CAPS[c]}" if c < len(_CAPS) else f"CAP_{c}" for c in caps]
        cols.data = [f"syscall={s} capability={c}" for s, c in zip(
            _col(arr, "syscall").tolist(), caps, strict=True)]
    return cols
