"""The compiled maps, read by the kernel's lookup (in Python), against the reference matcher."""

from __future__ import annotations

import random
import socket

import pytest

from enforcer.compiler import (
    CAPABILITIES,
    FP_KEY,
    MAP_FP,
    MAP_NET,
    MAP_WL,
    RULE_MAPS,
    CompiledSet,
    CompileError,
    Scope,
    WlFlag,
    compile_workload,
    diff,
    lookup_capability,
    lookup_exec,
    lookup_open,
    lookup_socket,
    next_generation,
)
from enforcer.karmor_log import Event
from enforcer.matcher import Matcher
from enforcer.policy.model import (
    Action,
    Capability,
    FileRule,
    FromSource,
    NetworkRule,
    Operation,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    Target,
)
from enforcer.verdict import Verdict
from enforcer.workload import DefaultPosture, Posture, Workload

CG = 4242
WL = Workload.container("ns", {"app": "x"}, "c")

FILES = [
    "/bin/ls",
    "/bin/cat",
    "/bin/sh",
    "/usr/bin/apt",
    "/usr/bin/curl",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/ssl/cert.pem",
    "/etc/ssl/private/key.pem",
    "/tmp/x",
    "/etc",
    "/etc/ssl",
]
DIRS = ["/bin/", "/usr/", "/usr/bin/", "/etc/", "/etc/ssl/", "/etc/ssl/private/", "/tmp/"]
PATTERNS = ["/etc/*hado?", "/etc/**", "/bin/?at", "/etc/ssl/*.pem", "/usr/**/apt"]
SOURCES = ["/bin/sh", "/bin/bash", "/usr/bin/curl", "/bin/cat"]
SOCKETS = [
    (socket.AF_INET, socket.SOCK_STREAM, 0, "SOCK_STREAM"),
    (socket.AF_INET, socket.SOCK_STREAM, 6, "SOCK_STREAM"),
    (socket.AF_INET6, socket.SOCK_DGRAM, 0, "SOCK_DGRAM"),
    (socket.AF_INET, socket.SOCK_DGRAM, 1, "SOCK_DGRAM"),
    (socket.AF_INET, socket.SOCK_RAW, 1, "SOCK_RAW"),
    (socket.AF_INET6, socket.SOCK_RAW, 58, "SOCK_RAW"),
    (socket.AF_INET, socket.SOCK_RAW, 255, "SOCK_RAW"),
    (socket.AF_INET, socket.SOCK_STREAM, 132, "SOCK_STREAM"),
]
CAPS = ["net_raw", "sys_admin", "chown", "net_admin"]


def meta(action: Action, sev: int = 1) -> RuleMeta:
    return RuleMeta(action, sev, ("t",), f"{action} rule")


def policy(name: str, **rules: object) -> Policy:
    return Policy(PolicyKind.KSP, name, "ns", Selector(), None, 1, **rules)  # type: ignore[arg-type]


def random_sources(rng: random.Random) -> tuple[FromSource, ...]:
    r = rng.random()
    if r < 0.6:
        return ()
    if r < 0.9:
        return tuple(FromSource(path=p) for p in rng.sample(SOURCES, rng.randint(1, 2)))
    return (FromSource(dir=rng.choice(["/bin/", "/usr/"]), recursive=rng.random() < 0.5),)


def random_target(rng: random.Random) -> tuple[Target, str, bool]:
    r = rng.random()
    if r < 0.5:
        return Target.PATH, rng.choice(FILES), False
    if r < 0.85:
        return Target.DIR, rng.choice(DIRS), rng.random() < 0.5
    return Target.PATTERN, rng.choice(PATTERNS), False


def random_policies(rng: random.Random) -> list[Policy]:
    out = []
    for i in range(rng.randint(1, 4)):
        action = rng.choice(list(Action))
        proc, files, net, caps = [], [], [], []
        for _ in range(rng.randint(1, 4)):
            a = rng.choice(list(Action)) if rng.random() < 0.4 else action
            kind = rng.random()
            if kind < 0.35:
                t, v, rec = random_target(rng)
                exec_name = t is Target.PATH and rng.random() < 0.15
                proc.append(
                    ProcessRule(
                        t,
                        v.rpartition("/")[2] if exec_name else v,
                        meta(a, i),
                        rec,
                        owner_only=rng.random() < 0.25,
                        from_source=random_sources(rng),
                        exec_name=exec_name,
                    )
                )
            elif kind < 0.75:
                t, v, rec = random_target(rng)
                files.append(
                    FileRule(
                        t,
                        v,
                        meta(a, i),
                        rec,
                        owner_only=rng.random() < 0.25,
                        read_only=rng.random() < 0.25,
                        from_source=random_sources(rng),
                    )
                )
            elif kind < 0.9:
                net.append(
                    NetworkRule(rng.choice(["tcp", "udp", "icmp", "icmpv6", "raw", "sctp", "all"]), meta(a))
                )
            else:
                caps.append(Capability(rng.choice(CAPS), meta(a)))
        out.append(
            policy(
                f"p{i}", process=tuple(proc), file=tuple(files), network=tuple(net), capabilities=tuple(caps)
            )
        )
    return out


def random_event(rng: random.Random) -> Event:
    uid = rng.choice([0, 1000, None])
    owner = rng.choice([0, 1000, None])
    k = rng.random()
    if k < 0.35:
        path = rng.choice(FILES)
        return Event(
            Operation.PROCESS,
            path,
            process=path,
            parent=rng.choice(SOURCES),
            source=rng.choice(SOURCES),
            uid=uid,
            owner_uid=owner,
        )
    if k < 0.75:
        src = rng.choice(SOURCES)
        return Event(
            Operation.FILE,
            rng.choice(FILES),
            process=src,
            parent=rng.choice(SOURCES),
            source=src,
            uid=uid,
            owner_uid=owner,
            write=rng.random() < 0.5,
        )
    if k < 0.9:
        fam, _typ, proto, tname = rng.choice(SOCKETS)
        dom = "AF_INET" if fam == socket.AF_INET else "AF_INET6"
        return Event(Operation.NETWORK, f"domain={dom} type={tname} protocol={proto}")
    return Event(Operation.CAPABILITIES, "CAP_" + rng.choice(CAPS).upper())


def kernel_decide(cs: CompiledSet | dict[str, dict[bytes, bytes]], ev: Event) -> tuple[str, str, str]:
    if ev.operation is Operation.PROCESS:
        d = lookup_exec(cs, CG, ev.resource, (ev.source, ev.parent), ev.is_owner)
    elif ev.operation is Operation.FILE:
        d = lookup_open(cs, CG, ev.resource, (ev.source, ev.process, ev.parent), ev.is_owner, ev.write)
    elif ev.operation is Operation.NETWORK:
        f = dict(t.split("=") for t in ev.resource.split())
        fam = socket.AF_INET if f["domain"] == "AF_INET" else socket.AF_INET6
        d = lookup_socket(cs, CG, fam, getattr(socket, f["type"]), int(f["protocol"]))
    else:
        d = lookup_capability(cs, CG, CAPABILITIES[ev.resource.removeprefix("CAP_").lower()])
    v = d.verdict()
    return str(v.action), v.result, v.policy_name


def summary(v: Verdict) -> tuple[str, str, str]:
    return str(v.action), v.result, v.policy_name


def random_posture(rng: random.Random) -> DefaultPosture:
    return DefaultPosture(*(rng.choice(list(Posture)) for _ in range(3)))


@pytest.mark.parametrize("seed", range(8))
def test_compiled_maps_agree_with_matcher(seed: int) -> None:
    rng = random.Random(seed)
    disagreements = []
    cases = 0
    for _ in range(150):
        policies = random_policies(rng)
        posture = random_posture(rng)
        m = Matcher(policies, default_posture=posture)
        cs = compile_workload(m.policies_for(WL), CG, posture)
        assert not cs.limits
        for _ in range(30):
            ev = random_event(rng)
            want = summary(m.decide_uncached(WL, ev))
            got = kernel_decide(cs, ev)
            cases += 1
            if want != got:
                disagreements.append((policies, posture, ev, want, got))
    assert cases == 150 * 30
    assert not disagreements, f"{len(disagreements)} disagreements, first: {disagreements[0]}"


def test_userspace_only_route_agrees_with_kernel_route() -> None:
    rng = random.Random(99)
    for _ in range(200):
        policies = random_policies(rng)
        posture = random_posture(rng)
        k = compile_workload(policies, CG, posture)
        u = compile_workload(policies, CG, posture, kernel_fp=False)
        assert not u.maps[MAP_FP]
        for _ in range(20):
            ev = random_event(rng)
            assert kernel_decide(k, ev) == kernel_decide(u, ev), ev


def test_kernel_only_maps_decide_without_side_tables() -> None:
    # The kernel has no RuleRef table: it must still reach the same action and result.
    rng = random.Random(7)
    checked = 0
    for _ in range(200):
        policies = random_policies(rng)
        cs = compile_workload(policies, CG, random_posture(rng))
        if cs.user_rules:
            continue
        for _ in range(20):
            ev = random_event(rng)
            checked += 1
            assert kernel_decide(cs, ev)[:2] == kernel_decide(cs.maps, ev)[:2]
    assert checked > 500


def test_deterministic_bytes() -> None:
    pols = random_policies(random.Random(3))
    a = compile_workload(pols, CG, DefaultPosture(Posture.BLOCK))
    b = compile_workload(list(pols), CG, DefaultPosture(Posture.BLOCK))
    assert a.maps == b.maps and a.rules == b.rules


def test_directory_rule_expands_into_hints() -> None:
    p = policy("d", file=(FileRule(Target.DIR, "/etc/ssl/private/", meta(Action.BLOCK), recursive=True),))
    cs = compile_workload([p], CG)
    keys = [FP_KEY.unpack(k) for k in cs.maps[MAP_FP]]
    tree = sorted(k[5].rstrip(b"\0").decode() for k in keys if k[3] == Scope.TREE)
    assert tree == ["/", "/etc/", "/etc/ssl/", "/etc/ssl/private/"]
    assert lookup_open(cs, CG, "/etc/ssl/private/a/b").blocked
    assert not lookup_open(cs, CG, "/etc/ssl/cert.pem").blocked
    assert lookup_open(cs, CG, "/etc/ssl/private").blocked  # the directory itself (R2)


def test_patterns_go_to_user_space_and_flag_the_kind() -> None:
    p = policy("g", file=(FileRule(Target.PATTERN, "/etc/*hado?", meta(Action.BLOCK)),))
    cs = compile_workload([p], CG)
    assert cs.flags & WlFlag.USER_FILE and not cs.flags & WlFlag.USER_PROC
    assert not cs.maps[MAP_FP]
    assert lookup_open(cs, CG, "/etc/shadow").blocked
    assert lookup_open(cs, CG, "/etc/gshadow").blocked
    assert not lookup_open(cs, CG, "/etc/passwd").blocked
    assert lookup_open(cs, CG, "/etc/shadow").verdict().policy_name == "g"


def test_net_raw_capability_blocks_raw_sockets() -> None:
    p = policy("cap", capabilities=(Capability("net_raw", meta(Action.BLOCK)),))
    cs = compile_workload([p], CG)
    assert lookup_socket(cs, CG, socket.AF_INET, socket.SOCK_RAW, 1).blocked
    assert not lookup_socket(cs, CG, socket.AF_INET, socket.SOCK_STREAM, 0).blocked
    assert lookup_capability(cs, CG, CAPABILITIES["net_raw"]).blocked
    assert not lookup_socket(cs, CG + 1, socket.AF_INET, socket.SOCK_RAW, 1).blocked  # other workload


def test_network_from_source_is_a_reported_limit() -> None:
    r = NetworkRule("tcp", meta(Action.BLOCK), (FromSource(path="/usr/bin/curl"),))
    cs = compile_workload([policy("n", network=(r,))], CG)
    assert cs.limits and "not enforced" in cs.limits[0]
    assert not cs.maps[MAP_NET]


def test_unknown_capability_is_a_named_error() -> None:
    with pytest.raises(CompileError, match="policy bad: unknown capability"):
        compile_workload([policy("bad", capabilities=(Capability("frobnicate", meta(Action.BLOCK)),))], CG)


def test_diff_puts_new_generation_then_flips_then_deletes() -> None:
    p1 = policy("a", file=(FileRule(Target.PATH, "/etc/shadow", meta(Action.BLOCK)),))
    p2 = policy("b", file=(FileRule(Target.PATH, "/etc/passwd", meta(Action.BLOCK)),))
    old = compile_workload([p1], CG)
    new = compile_workload([p2], CG, generation=next_generation(old))
    d = diff(old, new)
    assert d.puts[-1].map == MAP_WL and all(op.map in RULE_MAPS for op in d.puts[:-1])
    assert all(op.value is None for op in d.deletes)
    # Replay in order against a dict "kernel", checking protection after every step.
    kernel: dict[str, dict[bytes, bytes]] = {name: dict(v) for name, v in old.maps.items()}
    for op in (*d.puts, *d.deletes):
        if op.value is None:
            del kernel[op.map][op.key]
        else:
            kernel[op.map][op.key] = op.value
        shadow = lookup_open(kernel, CG, "/etc/shadow").blocked
        passwd = lookup_open(kernel, CG, "/etc/passwd").blocked
        assert shadow != passwd  # exactly one complete rule set in force, never none or both
    assert kernel == new.maps
    # Same rules again: nothing to do.
    assert diff(new, compile_workload([p2], CG, generation=next_generation(new))).empty
    with pytest.raises(CompileError, match="reuses generation"):
        diff(old, compile_workload([p2], CG, generation=old.generation))
    gone = diff(new, None)
    assert gone.deletes[0].map == MAP_WL and not gone.puts
