"""bpf/net.bpf.c in the running kernel: a child in a watched cgroup creates sockets, binds,
listens, connects on loopback over TCP/IPv4 and TCP/IPv6, accepts, fails to connect and to
bind, creates a raw ICMP socket, and as uid 65534 is refused one; each call is exactly one
record with the family, type, protocol, addresses, ports, fd and result the syscall really
had. A child in an unwatched cgroup produces none.

The child brackets its work between an AF_UNIX SOCK_SEQPACKET socket (start) and an
AF_UNIX SOCK_DGRAM socket (end); the test drains until the end marker, never sleeps.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enforcer import records
from enforcer.records import Kind, NetOp, Visibility
from tests.conftest import need
from tests.monitor_env import Cgroups, cgroups, collect, run_script

pytestmark = [pytest.mark.root, pytest.mark.kernel]

# Prints {"v4": {...}, "v6": {...}, "raw": fd, "refused": port, "inuse": ...}: fds and ports.
CHILD = r"""
import json, socket
A = socket
out = {}
socket.socket(A.AF_UNIX, A.SOCK_SEQPACKET)
for fam, host in ((A.AF_INET, "127.0.0.1"), (A.AF_INET6, "::1")):
    s = socket.socket(fam, A.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(8)
    port = s.getsockname()[1]
    c = socket.socket(fam, A.SOCK_STREAM)
    c.connect((host, port))
    a, peer = s.accept()
    out[str(fam)] = dict(s=s.fileno(), port=port, c=c.fileno(), cport=c.getsockname()[1], a=a.fileno(),
                         peer=peer[1])
    keep = out.setdefault("keep", [])
    keep += [s, c, a]
b = socket.socket(A.AF_INET, A.SOCK_STREAM)
b.bind(("127.0.0.1", 0))  # bound, not listening: connecting to it is refused
d = socket.socket(A.AF_INET, A.SOCK_STREAM)
try:
    d.connect(("127.0.0.1", b.getsockname()[1]))
except ConnectionRefusedError:
    pass
try:
    d.bind(("127.0.0.1", out[str(A.AF_INET)]["port"]))
except OSError:
    pass
r = socket.socket(A.AF_INET, A.SOCK_RAW, socket.IPPROTO_ICMP)
out.update(b=b.fileno(), bport=b.getsockname()[1], d=d.fileno(), r=r.fileno())
del out["keep"]
socket.socket(A.AF_UNIX, A.SOCK_DGRAM)
print(json.dumps(out))
"""

UNPRIVILEGED_RAW = r"""
import socket
socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
except PermissionError:
    pass
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
"""

AF_INET, AF_INET6, AF_UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
ANY = {AF_INET: "0.0.0.0", AF_INET6: "::"}  # an address field left empty
STREAM, RAW, TCP, ICMP = socket.SOCK_STREAM, socket.SOCK_RAW, socket.IPPROTO_TCP, socket.IPPROTO_ICMP


@dataclass
class Env:
    mon: object  # sensor.monitors.NetMonitor
    cg: Cgroups


def loopback_v6() -> bool:
    try:
        with socket.socket(AF_INET6, STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=[False, True], ids=["plain-loads", "portable"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Each test runs on both builds of the monitor (bpf/cast.bpf.h): the same records."""
    portable: bool = request.param
    need(loopback_v6(), "needs IPv6 on the loopback interface (::1)")
    with cgroups("net.portable.bpf.o" if portable else "net.bpf.o") as cg:
        from sensor.monitors import NetMonitor

        with NetMonitor(pin_dir=cg.pin_dir, portable=portable) as mon:
            mon.watch(cg.watched_id, Visibility.NETWORK)
            yield Env(mon, cg)


def is_marker(recs: np.ndarray, stype: int) -> np.ndarray:
    hit: np.ndarray = (recs["op"] == NetOp.SOCKET) & (recs["family"] == AF_UNIX) & (recs["type"] == stype)
    return hit


def between(recs: np.ndarray, pid: int) -> np.ndarray:
    mine = recs[recs["hdr"]["host_pid"] == pid]
    start = int(np.flatnonzero(is_marker(mine, socket.SOCK_SEQPACKET))[0])
    end = int(np.flatnonzero(is_marker(mine, socket.SOCK_DGRAM))[0])
    out: np.ndarray = mine[start + 1 : end]
    return out


def until_end(pid: int) -> Callable[[dict[int, np.ndarray]], bool]:
    def done(got: dict[int, np.ndarray]) -> bool:
        n = got.get(Kind.NET)
        return n is not None and bool(is_marker(n[n["hdr"]["host_pid"] == pid], socket.SOCK_DGRAM).any())

    return done


def rows(recs: np.ndarray) -> list[tuple[Any, ...]]:
    c = records.columns(recs)
    saddr, daddr = records.ip_strings(c["family"], c["saddr"]), records.ip_strings(c["family"], c["daddr"])
    return [
        (NetOp(op).name, fam, typ, proto, s, sp, d, dp, fd, ret)
        for op, fam, typ, proto, s, sp, d, dp, fd, ret in zip(
            c["op"].tolist(), c["family"].tolist(), c["type"].tolist(), c["protocol"].tolist(),
            saddr, c["sport"].tolist(), daddr, c["dport"].tolist(), c["fd"].tolist(), c["ret"].tolist(),
            strict=True,
        )
    ]  # fmt: skip


def test_socket_calls_in_watched_cgroup(env: Env, tmp_path: Path) -> None:
    other_pid, _ = run_script(env.cg.other, tmp_path, CHILD)
    pid, o = run_script(env.cg.watched, tmp_path, CHILD)
    got = collect(env.mon.drain, until_end(pid))  # type: ignore[attr-defined]
    net = got[Kind.NET]
    assert set(net["hdr"]["cgroup_id"].tolist()) == {env.cg.watched_id}
    assert other_pid not in net["hdr"]["host_pid"].tolist()
    recs = between(net, pid)

    want: list[tuple[Any, ...]] = []
    for fam, lo in ((AF_INET, "127.0.0.1"), (AF_INET6, "::1")):
        x, no = o[str(int(fam))], ANY[fam]
        want += [
            ("SOCKET", fam, STREAM, 0, no, 0, no, 0, x["s"], 0),
            ("BIND", fam, STREAM, TCP, lo, x["port"], no, 0, x["s"], 0),  # port 0 -> the kernel's choice
            ("LISTEN", fam, STREAM, TCP, lo, x["port"], no, 0, x["s"], 0),
            ("SOCKET", fam, STREAM, 0, no, 0, no, 0, x["c"], 0),
            ("CONNECT", fam, STREAM, TCP, lo, x["cport"], lo, x["port"], x["c"], 0),
            ("ACCEPT", fam, STREAM, TCP, lo, x["port"], lo, x["peer"], x["a"], 0),
        ]
    v4, no = o[str(int(AF_INET))], ANY[AF_INET]
    want += [
        ("SOCKET", AF_INET, STREAM, 0, no, 0, no, 0, o["b"], 0),
        ("BIND", AF_INET, STREAM, TCP, "127.0.0.1", o["bport"], no, 0, o["b"], 0),
        ("SOCKET", AF_INET, STREAM, 0, no, 0, no, 0, o["d"], 0),
        # Refused: the destination as asked; no source (the kernel released the one it picked).
        ("CONNECT", AF_INET, STREAM, TCP, no, 0, "127.0.0.1", o["bport"], o["d"], -errno.ECONNREFUSED),
        # In use: the address as asked (the socket stays as it was).
        ("BIND", AF_INET, STREAM, TCP, "127.0.0.1", v4["port"], no, 0, o["d"], -errno.EADDRINUSE),
        ("SOCKET", AF_INET, RAW, ICMP, no, 0, no, 0, o["r"], 0),
    ]  # fmt: skip
    assert rows(recs) == want
    assert v4["peer"] == v4["cport"]
    h = recs["hdr"]
    assert set(h["uid"].tolist()) == {0} and set(h["flags"].tolist()) == {0}
    assert Kind.LOST not in got


def test_refused_raw_socket_is_recorded_with_its_error(env: Env, tmp_path: Path) -> None:
    pid, _ = run_script(env.cg.watched, tmp_path, UNPRIVILEGED_RAW, user=65534)
    recs = between(collect(env.mon.drain, until_end(pid))[Kind.NET], pid)  # type: ignore[attr-defined]
    no = ANY[AF_INET]
    assert rows(recs) == [("SOCKET", AF_INET, RAW, ICMP, no, 0, no, 0, -1, -errno.EPERM)]
    assert recs["hdr"]["uid"].tolist() == [65534]


def test_unwatched_cgroup_and_other_visibility_are_silent(env: Env, tmp_path: Path) -> None:
    env.mon.watch(env.cg.watched_id, Visibility.FILE)  # type: ignore[attr-defined]
    silent_pid, _ = run_script(env.cg.watched, tmp_path, UNPRIVILEGED_RAW)
    env.mon.watch(env.cg.watched_id)  # type: ignore[attr-defined]  # NETWORK (the monitor's own bit)
    pid, _ = run_script(env.cg.watched, tmp_path, UNPRIVILEGED_RAW)
    net = collect(env.mon.drain, until_end(pid))[Kind.NET]  # type: ignore[attr-defined]
    assert set(net["hdr"]["host_pid"].tolist()) == {pid}
    assert silent_pid != pid
