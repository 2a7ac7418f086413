"""cgroup BPF network enforcement in the running kernel: denied in one cgroup, allowed next door."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enforcer.fanotify import CGROUP2_ROOT
from enforcer.policy.model import Action, Capability, NetworkRule, Policy, PolicyKind, RuleMeta, Selector
from enforcer.records import NET_DTYPE, Flag, Kind, NetOp
from enforcer.workload import DefaultPosture, Posture
from tests.conftest import need, need_root

pytestmark = [pytest.mark.root, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent
OBJ = ROOT / "bpf" / ".output" / "netblock.bpf.o"

CHILD = textwrap.dedent(
    """
    import os, socket, sys
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    what = sys.argv[2]
    try:
        if what == "raw":
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        elif what == "udp":
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        elif what == "connect":
            s = socket.socket()
            print("made", flush=True)
            sys.stdin.readline()  # the parent changes the rules in between
            s.settimeout(2)
            s.connect(("127.0.0.1", int(sys.argv[3])))
            s.close()
        print("ok", flush=True)
    except OSError as e:
        print(f"errno {e.errno}", flush=True)
    """
)


def meta(action: Action, sev: int = 3) -> RuleMeta:
    return RuleMeta(action, sev, (), "")


def policy(name: str, **rules: object) -> Policy:
    return Policy(PolicyKind.KSP, name, "ns", Selector(), None, 3, **rules)  # type: ignore[arg-type]


@dataclass
class Cgroups:
    parent: Path
    a: Path
    b: Path
    pins: Path

    @property
    def a_id(self) -> int:
        return self.a.stat().st_ino

    def run(self, cg: Path, *args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(cg / "cgroup.procs"), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    need_root()
    need(OBJ.exists(), f"{OBJ} not built (make -C bpf)")
    parent = Path(CGROUP2_ROOT) / f"astest-net-{os.getpid()}"
    pins = Path(f"/sys/fs/bpf/astest-net-{os.getpid()}")
    a, b = parent / "a", parent / "b"
    for d in (parent, a, b):
        d.mkdir()
    try:
        yield Cgroups(parent, a, b, pins)
    finally:
        from sensor.enforce import unpin_all

        unpin_all(pins / "enforce")
        unpin_all(pins / "shared")
        for d in (a, b, parent):
            d.rmdir()
        pins.rmdir() if pins.exists() else None


def kernel_rules(cg: Cgroups):  # type: ignore[no-untyped-def]
    from sensor.enforce import KernelRules

    try:
        return KernelRules([OBJ], cg.pins / "enforce", cg.pins / "shared").load()
    except Exception as e:  # a kernel that refuses cgroup programs: skip with the reason
        need(False, f"cannot load {OBJ.name}: {e}")
        raise


def records(rb) -> np.ndarray:  # type: ignore[no-untyped-def]
    rb.poll(100)
    out = [np.frombuffer(buf, NET_DTYPE) for kind, buf in rb.take() if kind == Kind.NET]
    return np.concatenate(out) if out else np.zeros(0, NET_DTYPE)


def test_raw_socket_blocked_in_one_cgroup_only(cgroups: Cgroups) -> None:
    kr = kernel_rules(cgroups)
    try:
        kr.attach_cgroup(cgroups.parent, pin=False)
        rb = kr.events()
        pol = policy(
            "ksp-ubuntu-1-cap-net-raw-block", capabilities=(Capability("net_raw", meta(Action.BLOCK)),)
        )
        meant = kr.set_rules([pol], cgroups.a_id)
        held = kr.current(cgroups.a_id)  # what the kernel holds, read back
        assert held is not None and held.maps == kr.kernel_view(meant).maps
        assert cgroups.run(cgroups.a, "raw") == f"errno {errno.EPERM}"
        assert cgroups.run(cgroups.a, "udp") == "ok"
        assert cgroups.run(cgroups.b, "raw") == "ok"
        recs = records(rb)
        assert len(recs) == 1, recs
        r = recs[0]
        assert r["hdr"]["cgroup_id"] == cgroups.a_id and r["hdr"]["kind"] == Kind.NET
        assert r["hdr"]["flags"] & Flag.BLOCKED and not r["hdr"]["flags"] & Flag.POSTURE
        assert r["hdr"]["flags"] & Flag.ENF_CGROUP  # the alert names CgroupBPF
        assert r["hdr"]["ret"] < 0 and r["hdr"]["comm"].startswith(b"python")
        assert (r["op"], r["family"], r["type"], r["protocol"]) == (
            NetOp.SOCKET,
            socket.AF_INET,
            socket.SOCK_RAW,
            socket.IPPROTO_ICMP,
        )
        assert r["fd"] == 1  # the deciding rule's id: the policy's first rule
        rb.close()
    finally:
        kr.close()


def test_connect_blocked_after_rule_change_and_allow_list(cgroups: Cgroups) -> None:
    kr = kernel_rules(cgroups)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = str(srv.getsockname()[1])
    try:
        kr.attach_cgroup(cgroups.parent, pin=False)
        rb = kr.events()

        def connect_with_rule_change(cg: Path, policies: list[Policy], posture: DefaultPosture | None) -> str:
            kr.set_rules([], cgroups.a_id)  # the socket is made with no rules in force
            with subprocess.Popen(
                [sys.executable, "-c", CHILD, str(cg / "cgroup.procs"), "connect", port],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as p:
                assert p.stdout is not None and p.stdin is not None
                try:
                    assert p.stdout.readline().strip() == "made"
                    kr.set_rules(policies, cgroups.a_id, posture)
                    p.stdin.write("\n")
                    p.stdin.flush()
                    return p.stdout.readline().strip()
                finally:
                    p.kill()

        block_tcp = [policy("block-tcp", network=(NetworkRule("tcp", meta(Action.BLOCK)),))]
        assert connect_with_rule_change(cgroups.a, block_tcp, None) == f"errno {errno.EPERM}"
        assert connect_with_rule_change(cgroups.b, block_tcp, None) == "ok"
        recs = records(rb)
        assert [int(r["op"]) for r in recs] == [NetOp.CONNECT]
        assert recs[0]["dport"] == int(port) and bytes(recs[0]["daddr"][:4]) == b"\x7f\0\0\1"

        # Allow-list: udp only, block posture; tcp falls to DefaultPosture.
        allow_udp = [policy("allow-udp", network=(NetworkRule("udp", meta(Action.ALLOW)),))]
        posture = DefaultPosture(network=Posture.BLOCK)
        assert connect_with_rule_change(cgroups.a, allow_udp, posture) == f"errno {errno.EPERM}"
        assert cgroups.run(cgroups.a, "udp") == "ok"
        recs = records(rb)
        assert len(recs) == 1 and recs[0]["hdr"]["flags"] & Flag.POSTURE
        rb.close()
    finally:
        srv.close()
        kr.close()


LOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sensor.enforce import KernelRules, PolicyCache
    from enforcer.policy.parse import parse_text
    obj, pins, cg, cgid, cache, mode = sys.argv[1:7]
    kr = KernelRules([Path(obj)], Path(pins) / "enforce", Path(pins) / "shared").load()
    kr.attach_cgroup(Path(cg), pin=True)
    if mode == "first":  # rules arrive (from the control topic, in the real sensor)
        policies, errors = parse_text(sys.stdin.read(), "policy.yaml")
        assert not errors, errors
        PolicyCache(Path(cache)).save(policies)
    else:  # restart with no broker: the local cache is all there is
        policies, _ = PolicyCache(Path(cache)).load()
    before = kr.current(int(cgid))
    kr.set_rules(policies, int(cgid))
    after = kr.current(int(cgid))
    print("ready", "unchanged" if before and after and before.generation == after.generation else "changed",
          flush=True)
    if mode == "first":
        time.sleep(600)
    kr.close()
    """
)

RAW_BLOCK = """
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: ksp-ubuntu-1-cap-net-raw-block
  namespace: multiubuntu
spec:
  severity: 1
  selector:
    matchLabels:
      container: ubuntu-1
  capabilities:
    matchCapabilities:
    - capability: net_raw
  action:
    Block
"""


def test_rules_hold_through_kill_9_and_a_restart_without_broker(cgroups: Cgroups, tmp_path: Path) -> None:
    kernel_rules(cgroups).close()  # skips early if this kernel cannot load the object
    from sensor.enforce import unpin_all

    unpin_all(cgroups.pins / "enforce")
    cache = tmp_path / "policies.json"
    argv = [sys.executable, "-c", LOADER, str(OBJ), str(cgroups.pins), str(cgroups.parent), str(cgroups.a_id),
            str(cache)]  # fmt: skip
    with subprocess.Popen(
        [*argv, "first"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as p:
        assert p.stdout is not None and p.stdin is not None
        try:
            p.stdin.write(RAW_BLOCK)
            p.stdin.close()
            assert p.stdout.readline().split()[0] == "ready"
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
    assert cgroups.run(cgroups.a, "raw") == f"errno {errno.EPERM}"  # still enforced, sensor gone
    assert cgroups.run(cgroups.b, "raw") == "ok"
    # Restart with no broker: rules come from the local cache, match what the kernel holds,
    # and nothing is rewritten.
    r = subprocess.run([*argv, "restart"], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    assert r.stdout.split() == ["ready", "unchanged"], r.stdout + r.stderr
    assert cgroups.run(cgroups.a, "raw") == f"errno {errno.EPERM}"
    unpin_all(cgroups.pins / "enforce")
    assert cgroups.run(cgroups.a, "raw") == "ok"  # pins gone: links detached


PROBE = textwrap.dedent(
    """
    import os, socket, sys
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    for spec in sys.argv[2:]:
        fam, typ, proto = map(int, spec.split(","))
        try:
            socket.socket(fam, typ, proto).close()
            print("ok")
        except OSError as e:
            print(e.errno)
    """
)
SOCKETS = [
    (socket.AF_INET, socket.SOCK_STREAM, 0),
    (socket.AF_INET6, socket.SOCK_STREAM, 6),
    (socket.AF_INET, socket.SOCK_DGRAM, 0),
    (socket.AF_INET6, socket.SOCK_DGRAM, 17),
    (socket.AF_INET, socket.SOCK_RAW, 1),
    (socket.AF_INET6, socket.SOCK_RAW, 58),
    (socket.AF_INET, socket.SOCK_RAW, 255),
    (socket.AF_INET, socket.SOCK_RAW, 6),
]


def test_kernel_decisions_match_the_compiled_model(cgroups: Cgroups) -> None:
    """Random network/capability policies: the kernel's answers and records equal lookup_socket's."""
    import random

    from enforcer.compiler import compile_workload, lookup_socket

    kr = kernel_rules(cgroups)
    rng = random.Random(11)
    try:
        kr.attach_cgroup(cgroups.parent, pin=False)
        rb = kr.events()
        specs = [f"{f},{t},{p}" for f, t, p in SOCKETS]
        for case in range(12):
            rules = tuple(
                NetworkRule(
                    rng.choice(["tcp", "udp", "icmp", "icmpv6", "raw", "all"]), meta(rng.choice(list(Action)))
                )
                for _ in range(rng.randint(0, 3))
            )
            caps = tuple(
                Capability("net_raw", meta(rng.choice(list(Action)))) for _ in range(rng.randint(0, 1))
            )
            posture = DefaultPosture(network=rng.choice(list(Posture)))
            pols = [policy(f"case{case}", network=rules, capabilities=caps)]
            kr.set_rules(pols, cgroups.a_id, posture)
            cs = compile_workload(pols, cgroups.a_id, posture)
            want = [lookup_socket(cs, cgroups.a_id, f, t, p) for f, t, p in SOCKETS]
            r = subprocess.run(
                [sys.executable, "-c", PROBE, str(cgroups.a / "cgroup.procs"), *specs],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            got = r.stdout.split()
            assert got == [str(errno.EPERM) if d.blocked else "ok" for d in want], (pols, posture)
            flags = []
            for d in want:
                if d.action is not Action.ALLOW or d.posture:
                    f = Flag.BLOCKED if d.blocked else Flag.AUDITED
                    flags.append(int(f | (Flag.POSTURE if d.posture else 0)))
            recs = records(rb)
            assert [int(x) & 0x2C for x in recs["hdr"]["flags"]] == flags, (pols, posture)
        rb.close()
    finally:
        kr.close()
