"""bpf/cap.bpf.c in the running kernel: a root child in a watched cgroup creates raw sockets
(CAP_NET_RAW granted), a uid-65534 child is refused one (CAP_NET_RAW denied); each is a
capability record with the capability, outcome, uid and syscall; repeats within the window
are reported once. An unwatched cgroup produces none. Where the kernel refuses the bpf LSM
(this VM: no BPF trampolines), the LSM variant fails with a reason an operator can read.

The kernel also makes silent capability probes of its own (CAP_SYS_ADMIN while accounting
memory, for one), so assertions look at CAP_NET_RAW, which only the test's sockets ask for.
Draining stops at a marker child's CAP_NET_RAW record, never after a sleep.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enforcer.records import Kind, Visibility
from tests.monitor_env import Cgroups, cgroups, collect, run_script

pytestmark = [pytest.mark.root, pytest.mark.kernel]

CAP_NET_RAW = 13
SYS_SOCKET = 41  # x86_64

RAW_SOCKETS = r"""
import socket, sys
for _ in range(int(sys.argv[1])):
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        pass
"""


@dataclass
class Env:
    cg: Cgroups


@pytest.fixture
def env() -> Iterator[Env]:
    with cgroups("cap.bpf.o") as cg:
        yield Env(cg)


def start(env: Env, **kw: object):  # type: ignore[no-untyped-def]
    from sensor.monitors import CapMonitor

    mon = CapMonitor(pin_dir=env.cg.pin_dir, **kw)  # type: ignore[arg-type]
    mon.watch(env.cg.watched_id, Visibility.CAPABILITIES)
    return mon


def net_raw_until_marker(mon, env: Env) -> tuple[np.ndarray, int]:  # type: ignore[no-untyped-def]
    """Run the marker child, drain until its CAP_NET_RAW arrives; all CAP_NET_RAW records."""
    marker, _ = run_script(env.cg.watched, Path("/"), RAW_SOCKETS, "1")

    def done(got: dict[int, np.ndarray]) -> bool:
        c = got.get(Kind.CAP)
        return c is not None and bool(((c["hdr"]["host_pid"] == marker) & (c["cap"] == CAP_NET_RAW)).any())

    caps = collect(mon.drain, done)[Kind.CAP]
    assert set(caps["hdr"]["cgroup_id"].tolist()) == {env.cg.watched_id}
    return caps[caps["cap"] == CAP_NET_RAW], marker


def test_granted_and_denied_capability_use(env: Env, tmp_path: Path) -> None:
    with start(env) as mon:
        assert mon.variant == "tp" and mon.hooks == ["as_cap_tp"]
        other, _ = run_script(env.cg.other, tmp_path, RAW_SOCKETS, "1")
        root, _ = run_script(env.cg.watched, tmp_path, RAW_SOCKETS, "3")  # 3 uses, one report
        nobody, _ = run_script(env.cg.watched, tmp_path, RAW_SOCKETS, "1", user=65534)
        raw, marker = net_raw_until_marker(mon, env)

    h = raw["hdr"]
    got = list(zip(h["host_pid"].tolist(), h["uid"].tolist(), h["ret"].tolist(), strict=True))
    assert got == [(root, 0, 0), (nobody, 65534, -errno.EPERM), (marker, 0, 0)]
    assert other not in h["host_pid"].tolist()
    assert set(raw["syscall"].tolist()) == {SYS_SOCKET}
    assert set(h["flags"].tolist()) == {0}


def test_zero_window_reports_every_check(env: Env, tmp_path: Path) -> None:
    with start(env, window_ns=0) as mon:
        pid, _ = run_script(env.cg.watched, tmp_path, RAW_SOCKETS, "3")
        raw, marker = net_raw_until_marker(mon, env)
    assert raw["hdr"]["host_pid"].tolist() == [pid] * 3 + [marker]


def test_lsm_variant_is_refused_with_a_reason_here(env: Env) -> None:
    from sensor.monitors import MonitorUnavailable, open_monitors

    try:
        mon = start(env, variant="lsm")
    except MonitorUnavailable as e:
        assert e.monitor == "capabilities"
        assert "lsm/capable" in e.reason and "not loadable on this kernel" in str(e)
        assert "Operation not permitted" in e.reason or "LSM list" in e.reason
    else:  # a kernel with BPF trampolines and the bpf LSM: then it must work
        mon.close()
        pytest.skip("this kernel loads lsm/capable; the refusal path cannot be exercised")
    # The sensor-facing entry point reports instead of raising, and starts the rest.
    started, refused = open_monitors(["capabilities"], pin_dir=env.cg.pin_dir)
    for m in started.values():
        m.close()
    assert list(started) == ["capabilities"] and refused == []  # tp variant here
