"""Python mirror of bpf/armorstream.h: numpy dtypes over the kernel's binary records.

This is the only place in Python that knows a record offset. Every dtype is built with
explicit `offsets` and `itemsize`, so numpy never guesses the C layout, and
tests/test_record_layout.py compares each one with the BTF of the compiled header.
Records keep their common header as a nested field: `recs["hdr"]["pid"]` is a
zero-copy column, and `columns()` flattens a record array into such views.

Text and address helpers work on whole columns; Python objects are made only when a
caller asks for them (`text`, `argv`, `ip_strings`).
"""

from __future__ import annotations

import socket
from enum import IntEnum, IntFlag
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "AS_ADDR_LEN",
    "AS_ARGS_LEN",
    "AS_COMM_LEN",
    "AS_PATH_LEN",
    "AS_SCHEMA_VERSION",
    "CAP_DTYPE",
    "DTYPES",
    "EXEC_DTYPE",
    "EXIT_DTYPE",
    "FILE_DTYPE",
    "FORK_DTYPE",
    "HDR_DTYPE",
    "LOST_DTYPE",
    "NET_DTYPE",
    "STRUCT_NAMES",
    "Flag",
    "Kind",
    "NetOp",
    "Visibility",
    "args_joined",
    "argv",
    "columns",
    "ip_strings",
    "text",
    "wall_clock_ns",
]

# ---- #defines --------------------------------------------------------------------------
AS_SCHEMA_VERSION: Final = 1
AS_COMM_LEN: Final = 16
AS_PATH_LEN: Final = 256
AS_ARGS_LEN: Final = 512
AS_ADDR_LEN: Final = 16


# ---- enums (member NAME == C enumerator minus its prefix) -------------------------------
class Kind(IntEnum):
    """enum as_kind (prefix AS_KIND_). Numbers are never reused."""

    EXEC = 1
    EXIT = 2
    FORK = 3
    FILE = 4
    NET = 5
    CAP = 6
    LOST = 7  # the kernel dropped records: hdr.ret = count


class Flag(IntFlag):
    """enum as_flag (prefix AS_F_): bits of hdr.flags."""

    TRUNC_PATH = 1 << 0
    TRUNC_ARGS = 1 << 1
    BLOCKED = 1 << 2
    AUDITED = 1 << 3
    HOST = 1 << 4
    POSTURE = 1 << 5
    ENF_BPFLSM = 1 << 6  # the backend that decided a BLOCKED/AUDITED record
    ENF_FANOTIFY = 1 << 7
    ENF_CGROUP = 1 << 8


class NetOp(IntEnum):
    """enum as_net_op (prefix AS_NET_): as_net_rec.op."""

    SOCKET = 1
    CONNECT = 2
    BIND = 3
    LISTEN = 4
    ACCEPT = 5


class Visibility(IntFlag):
    """enum as_visibility (prefix AS_VIS_): as_watched map values, host visibility knob."""

    PROCESS = 1 << 0
    FILE = 1 << 1
    NETWORK = 1 << 2
    CAPABILITIES = 1 << 3


# ---- dtypes -----------------------------------------------------------------------------
def _struct(itemsize: int, fields: list[tuple[str, Any, int]]) -> np.dtype[np.void]:
    names, formats, offsets = zip(*fields, strict=True)
    return np.dtype(
        {"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": itemsize}
    )


# char[N] is 'S<N>' (numpy strips the trailing NULs on access); __u8[N] is a u1 sub-array.
HDR_DTYPE: Final = _struct(
    80,
    [
        ("kind", "<u2", 0),
        ("version", "<u2", 2),
        ("size", "<u4", 4),
        ("ktime_ns", "<u8", 8),
        ("cgroup_id", "<u8", 16),
        ("pid_ns", "<u4", 24),
        ("mnt_ns", "<u4", 28),
        ("host_pid", "<u4", 32),
        ("host_ppid", "<u4", 36),
        ("pid", "<u4", 40),
        ("ppid", "<u4", 44),
        ("uid", "<u4", 48),
        ("gid", "<u4", 52),
        ("ret", "<i4", 56),
        ("flags", "<u4", 60),
        ("comm", f"S{AS_COMM_LEN}", 64),
    ],
)

EXEC_DTYPE: Final = _struct(
    1144,
    [
        ("hdr", HDR_DTYPE, 0),
        ("argc", "<u4", 80),
        ("args_len", "<u4", 84),
        ("exe_ino", "<u8", 88),
        ("exe_uid", "<u4", 96),
        ("_pad0", "<u4", 100),
        ("parent_comm", f"S{AS_COMM_LEN}", 104),
        ("path", f"S{AS_PATH_LEN}", 120),
        ("cwd", f"S{AS_PATH_LEN}", 376),
        ("args", f"S{AS_ARGS_LEN}", 632),
    ],
)

EXIT_DTYPE: Final = _struct(88, [("hdr", HDR_DTYPE, 0), ("exit_code", "<i4", 80), ("_pad0", "<u4", 84)])

FORK_DTYPE: Final = _struct(
    88, [("hdr", HDR_DTYPE, 0), ("child_host_pid", "<u4", 80), ("child_pid", "<u4", 84)]
)

FILE_DTYPE: Final = _struct(
    360,
    [
        ("hdr", HDR_DTYPE, 0),
        ("open_flags", "<u4", 80),
        ("mode", "<u4", 84),
        ("ino", "<u8", 88),
        ("dev", "<u4", 96),
        ("owner_uid", "<u4", 100),
        ("path", f"S{AS_PATH_LEN}", 104),
    ],
)

NET_DTYPE: Final = _struct(
    128,
    [
        ("hdr", HDR_DTYPE, 0),
        ("op", "<u2", 80),
        ("family", "<u2", 82),
        ("type", "<u2", 84),
        ("protocol", "<u2", 86),
        ("sport", "<u2", 88),
        ("dport", "<u2", 90),
        ("fd", "<i4", 92),
        ("saddr", ("u1", (AS_ADDR_LEN,)), 96),
        ("daddr", ("u1", (AS_ADDR_LEN,)), 112),
    ],
)

CAP_DTYPE: Final = _struct(88, [("hdr", HDR_DTYPE, 0), ("cap", "<u4", 80), ("syscall", "<u4", 84)])

# A LOST record is a bare header (hdr.ret = number of records dropped).
LOST_DTYPE: Final = _struct(HDR_DTYPE.itemsize, [("hdr", HDR_DTYPE, 0)])

DTYPES: Final[dict[int, np.dtype[np.void]]] = {
    Kind.EXEC: EXEC_DTYPE,
    Kind.EXIT: EXIT_DTYPE,
    Kind.FORK: FORK_DTYPE,
    Kind.FILE: FILE_DTYPE,
    Kind.NET: NET_DTYPE,
    Kind.CAP: CAP_DTYPE,
    Kind.LOST: LOST_DTYPE,
}

# C struct behind each kind's dtype (what the layout test looks up in BTF).
STRUCT_NAMES: Final[dict[int, str]] = {
    Kind.EXEC: "as_exec_rec",
    Kind.EXIT: "as_exit_rec",
    Kind.FORK: "as_fork_rec",
    Kind.FILE: "as_file_rec",
    Kind.NET: "as_net_rec",
    Kind.CAP: "as_cap_rec",
    Kind.LOST: "as_hdr",
}


# ---- column helpers ---------------------------------------------------------------------
Records = npt.NDArray[np.void]


def columns(recs: Records) -> dict[str, np.ndarray[Any, Any]]:
    """Flat name -> column views (no copies); the header's fields come first, padding is dropped.

    Header and body field names never collide (the layout test checks it), so the names
    are the C member names without the `hdr.` prefix.
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    hdr = recs["hdr"]
    for name in HDR_DTYPE.names or ():
        out[name] = hdr[name]
    for name in recs.dtype.names or ():
        if name != "hdr" and not name.startswith("_pad"):
            out[name] = recs[name]
    return out


def text(col: np.ndarray[Any, Any]) -> list[str]:
    """A char-array column ('S' dtype) as Python strings; bad UTF-8 becomes U+FFFD."""
    return [b.decode("utf-8", "replace") for b in col.tolist()]


def args_joined(recs: Records) -> np.ndarray[Any, np.dtype[np.bytes_]]:
    """argv joined with single spaces, as KubeArmor prints it, for every exec record at once.

    Separators are NULs before `args_len`; the NUL ending the last argument and the unused
    tail become trailing NULs, which the 'S' dtype drops.
    """
    n = len(recs)
    used = np.minimum(recs["args_len"].astype(np.int64), AS_ARGS_LEN)[:, None]
    width = int(used.max()) if n else 0
    if width == 0:
        return np.zeros(n, dtype="S1")
    # Copy only the columns some record uses: argv is usually far shorter than AS_ARGS_LEN.
    if recs.flags.c_contiguous:
        start = EXEC_DTYPE.fields["args"][1]  # type: ignore[index]
        raw = recs.view(np.uint8).reshape(n, recs.dtype.itemsize)[:, start : start + width].copy()
    else:
        raw = np.array(recs["args"]).view(np.uint8).reshape(n, AS_ARGS_LEN)[:, :width].copy()
    pos = np.arange(width)[None, :]
    raw[(raw == 0) & (pos < used - 1)] = ord(" ")
    raw[pos >= used] = 0  # bytes past args_len are not part of argv
    return raw.view(f"S{width}").reshape(n)


def argv(recs: Records) -> list[list[str]]:
    """Each exec record's argv as a list of strings (one Python loop: only when needed)."""
    out: list[list[str]] = []
    for blob, n, used in zip(
        recs["args"].tolist(), recs["argc"].tolist(), recs["args_len"].tolist(), strict=True
    ):
        # The 'S' dtype dropped trailing NULs, and with them trailing empty arguments.
        parts = blob.ljust(min(used, AS_ARGS_LEN), b"\0")[:used].split(b"\0")
        out.append([p.decode("utf-8", "replace") for p in parts[:n]])
    return out


def ip_strings(family: np.ndarray[Any, Any], addr: np.ndarray[Any, Any]) -> list[str]:
    """Format address column `addr` (N x 16 bytes) by `family`; '' for non-IP families.

    Addresses repeat heavily in real traffic, so each distinct (family, address) pair is
    formatted once and the results are scattered back with numpy.
    """
    n = len(family)
    if n == 0:
        return []
    key = np.empty((n, AS_ADDR_LEN + 2), dtype=np.uint8)
    key[:, :2] = family.astype("<u2").view(np.uint8).reshape(n, 2)
    key[:, 2:] = addr
    uniq, inverse = np.unique(key.view(f"V{AS_ADDR_LEN + 2}").reshape(n), return_inverse=True)
    formatted = np.array([_format_ip(bytes(u)) for u in uniq.tolist()], dtype=object)
    return list(formatted[inverse.reshape(n)])


def _format_ip(key: bytes) -> str:
    fam = int.from_bytes(key[:2], "little")
    if fam == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, key[2:6])
    if fam == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, key[2:18])
    return ""


def wall_clock_ns(recs: Records, boot_wall_ns: int) -> npt.NDArray[np.int64]:
    """Wall-clock time of each record: the batch's boot-time offset plus hdr.ktime_ns."""
    return recs["hdr"]["ktime_ns"].astype(np.int64) + np.int64(boot_wall_ns)
