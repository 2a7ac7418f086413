"""The reference matcher, rule by rule (docs/policy-semantics.md numbers in brackets).

Policies are built from the typed model here so each test states exactly one rule;
tests/test_matcher_examples.py runs KubeArmor's own example policies through the parser.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from enforcer.karmor_log import Event
from enforcer.matcher import Matcher, glob_to_regex, network_protocols
from enforcer.policy.model import (
    Action,
    Capability,
    Expression,
    FileRule,
    FromSource,
    NetworkRule,
    Operation,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    SyscallRule,
    Target,
)
from enforcer.verdict import DEFAULT_POSTURE, DENIED, PASSED, LogType
from enforcer.workload import DefaultPosture, Posture, Workload

ALLOW, AUDIT, BLOCK = Action.ALLOW, Action.AUDIT, Action.BLOCK
W = Workload.container("ns", {"app": "web"}, "web")
BLOCK_ALL = DefaultPosture(Posture.BLOCK, Posture.BLOCK, Posture.BLOCK)


def meta(action: Action, severity: int = 5, tags: tuple[str, ...] = (), message: str = "") -> RuleMeta:
    return RuleMeta(action, severity, tags, message)


def src(*paths: str, dir: str | None = None, recursive: bool = False) -> tuple[FromSource, ...]:
    out = tuple(FromSource(path=p) for p in paths)
    return out + ((FromSource(dir=dir, recursive=recursive),) if dir else ())


def fpath(path: str, action: Action = BLOCK, **kw: object) -> FileRule:
    return FileRule(Target.PATH, path, meta(action), **kw)  # type: ignore[arg-type]


def fdir(path: str, action: Action = BLOCK, **kw: object) -> FileRule:
    return FileRule(Target.DIR, path, meta(action), **kw)  # type: ignore[arg-type]


def fpat(pattern: str, action: Action = BLOCK, **kw: object) -> FileRule:
    return FileRule(Target.PATTERN, pattern, meta(action), **kw)  # type: ignore[arg-type]


def ppath(path: str, action: Action = BLOCK, **kw: object) -> ProcessRule:
    return ProcessRule(Target.PATH, path, meta(action), **kw)  # type: ignore[arg-type]


def ksp(
    name: str, ns: str = "ns", labels: Sequence[tuple[str, str]] = (("app", "web"),), **kw: object
) -> Policy:
    return Policy(PolicyKind.KSP, name, ns, Selector(match_labels=tuple(labels)), None, 5, **kw)  # type: ignore[arg-type]


def fopen(
    path: str,
    uid: int = 0,
    owner: int | None = 0,
    write: bool = False,
    proc: str = "/bin/cat",
    parent: str = "/bin/bash",
) -> Event:
    return Event(Operation.FILE, path, proc, parent, proc, uid, owner, write)


def exe(path: str, parent: str = "/bin/bash", uid: int = 0, owner: int | None = 0) -> Event:
    return Event(Operation.PROCESS, path, path, parent, parent, uid, owner)


def net(resource: str, proc: str = "/usr/bin/curl") -> Event:
    return Event(Operation.NETWORK, resource, proc, "/bin/bash", proc, 0)


TCP = "domain=AF_INET type=SOCK_STREAM protocol=TCP"
UDP = "domain=AF_INET type=SOCK_DGRAM protocol=UDP"
RAW_ICMP = "domain=AF_INET type=SOCK_RAW protocol=ICMP"


def decide(policies: Sequence[Policy], ev: Event, w: Workload = W, **kw: object):  # type: ignore[no-untyped-def]
    m = Matcher(policies, **kw)  # type: ignore[arg-type]
    v = m.decide(w, ev)
    # The cached, compiled-only and uncached paths must agree on every decision.
    assert m.decide(w, ev) is v
    assert m.decide_uncached(w, ev) == v == m.decide_compiled_only(w, ev)
    return v


# ----------------------------------------------------------------------------- resources


def test_file_path_block_and_neighbour_passes() -> None:  # R1
    p = [ksp("p", file=(fpath("/etc/passwd"),))]
    v = decide(p, fopen("/etc/passwd"))
    assert (v.action, v.result, v.policy_name, v.type) == (BLOCK, DENIED, "p", LogType.MATCHED_POLICY)
    v = decide(p, fopen("/etc/hostname"))
    assert (v.action, v.result, v.policy_name, v.type) == (ALLOW, PASSED, "", LogType.CONTAINER_LOG)


def test_directory_non_recursive_matches_direct_children_only() -> None:  # R2
    p = [ksp("p", file=(fdir("/credentials/"),))]
    assert decide(p, fopen("/credentials/password")).blocked
    assert not decide(p, fopen("/credentials/keys/priv.key")).blocked
    assert not decide(p, fopen("/credentialsX/a")).blocked


def test_directory_recursive_matches_all_depths() -> None:  # R2
    p = [ksp("p", file=(fdir("/run/secrets/", recursive=True),))]
    assert decide(p, fopen("/run/secrets/kubernetes.io/serviceaccount/token")).blocked
    assert decide(p, fopen("/run/secrets/a")).blocked
    assert not decide(p, fopen("/run/other")).blocked


def test_directory_rule_matches_the_directory_itself() -> None:  # R2
    assert decide([ksp("p", file=(fdir("/credentials/"),))], fopen("/credentials")).blocked


def test_root_recursive_directory() -> None:
    assert decide([ksp("p", file=(fdir("/", recursive=True),))], fopen("/a/b/c")).blocked


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("/etc/*hado?", "/etc/shadow", True),
        ("/etc/*hado?", "/etc/gshadow", True),
        ("/etc/*hado?", "/etc/shadows", False),
        ("/home/user1/secret_data*", "/home/user1/secret_data1.txt", True),
        ("/home/*/x", "/home/a/b/x", False),  # * stays in one component
        ("/home/**/x", "/home/a/b/x", True),  # ** crosses "/"
        ("/tmp/[ab].txt", "/tmp/b.txt", True),
        ("/tmp/[!ab].txt", "/tmp/b.txt", False),
        ("/tmp/a+b.txt", "/tmp/a+b.txt", True),  # regex metacharacters are literal
        ("/etc/{passwd,shadow}", "/etc/shadow", True),
    ],
)
def test_patterns(pattern: str, path: str, hit: bool) -> None:  # R4
    assert bool(glob_to_regex(pattern).fullmatch(path)) is hit
    assert decide([ksp("p", file=(fpat(pattern),))], fopen(path)).blocked is hit


def test_process_path_dir_and_execname() -> None:  # R1, R2, R3
    p = [
        ksp(
            "p",
            process=(
                ppath("/bin/sleep"),
                ProcessRule(Target.DIR, "/sbin/", meta(BLOCK)),
                ProcessRule(Target.DIR, "/usr/", meta(BLOCK), recursive=True),
                ProcessRule(Target.PATH, "apt", meta(BLOCK), exec_name=True),
            ),
        )
    ]
    assert decide(p, exe("/bin/sleep")).blocked
    assert decide(p, exe("/sbin/route")).blocked
    assert not decide(p, exe("/sbin/x/route")).blocked
    assert decide(p, exe("/usr/local/bin/env")).blocked
    assert decide(p, exe("/opt/bin/apt")).blocked
    assert not decide(p, exe("/opt/bin/aptitude")).blocked
    assert not decide(p, exe("/bin/ls")).blocked


def test_process_rules_do_not_match_file_events() -> None:
    p = [ksp("p", process=(ppath("/bin/sleep"),))]
    assert not decide(p, fopen("/bin/sleep")).blocked


# ----------------------------------------------------------------------------- options


def test_owner_only_block_blocks_non_owners() -> None:  # O1
    p = [ksp("p", file=(fpath("/home/user1/s", owner_only=True),))]
    assert decide(p, fopen("/home/user1/s", uid=0, owner=1000)).blocked
    assert not decide(p, fopen("/home/user1/s", uid=1000, owner=1000)).blocked
    assert not decide(p, fopen("/home/user1/s", uid=1000, owner=1000, write=True)).blocked
    assert decide(p, fopen("/home/user1/s", uid=1000, owner=None)).blocked  # unknown owner


def test_read_only_block_blocks_writes_only() -> None:  # O1
    p = [ksp("p", file=(fdir("/credentials/", read_only=True),))]
    assert not decide(p, fopen("/credentials/password")).blocked
    assert decide(p, fopen("/credentials/password", write=True)).blocked


def test_owner_only_read_only_block_blocks_owner_writes_too() -> None:  # O1
    p = [ksp("p", file=(fdir("/home/user1/", recursive=True, owner_only=True, read_only=True),))]
    assert decide(p, fopen("/home/user1/d/k", uid=0, owner=1000)).blocked
    assert not decide(p, fopen("/home/user1/d/k", uid=1000, owner=1000)).blocked
    assert decide(p, fopen("/home/user1/d/k", uid=1000, owner=1000, write=True)).blocked


def test_owner_only_allow_refuses_non_owner_whatever_the_posture() -> None:  # O1, P5
    p = [ksp("p", file=(fpath("/home/user1/s", ALLOW, owner_only=True),))]
    v = decide(p, fopen("/home/user1/s", uid=0, owner=1000))
    assert (v.action, v.result, v.policy_name) == (BLOCK, DENIED, DEFAULT_POSTURE)
    v = decide(p, fopen("/home/user1/s", uid=1000, owner=1000))
    assert (v.action, v.result, v.policy_name, v.type) == (ALLOW, PASSED, "p", LogType.CONTAINER_LOG)


def test_read_only_allow_refuses_writes() -> None:  # O1
    p = [ksp("p", file=(fpath("/credentials/password", ALLOW, read_only=True),))]
    assert not decide(p, fopen("/credentials/password")).blocked
    assert decide(p, fopen("/credentials/password", write=True)).blocked


def test_audit_reports_what_block_would_have_blocked() -> None:  # P3, O1
    p = [ksp("p", file=(fpath("/s", AUDIT, read_only=True), fpath("/a", AUDIT, owner_only=True)))]
    v = decide(p, fopen("/s", write=True))
    assert (v.action, v.result, v.policy_name, v.type) == (AUDIT, PASSED, "p", LogType.MATCHED_POLICY)
    assert decide(p, fopen("/s")).policy_name == ""
    assert decide(p, fopen("/a", uid=0, owner=1000)).action is AUDIT
    assert decide(p, fopen("/a", uid=1000, owner=1000)).policy_name == ""


def test_process_owner_only_uses_binary_owner() -> None:  # O1
    p = [ksp("p", process=(ppath("/home/user1/hello", owner_only=True),))]
    assert decide(p, exe("/home/user1/hello", uid=0, owner=1000)).blocked
    assert not decide(p, exe("/home/user1/hello", uid=1000, owner=1000)).blocked


def test_from_source_path_matches_process_or_parent() -> None:  # F1
    p = [ksp("p", process=(ppath("/bin/ls", from_source=src("/bin/dash")),))]
    assert decide(p, exe("/bin/ls", parent="/bin/dash")).blocked
    assert not decide(p, exe("/bin/ls", parent="/bin/bash")).blocked
    f = [ksp("p", file=(fpath("/secret.txt", from_source=src("/bin/cat")),))]
    assert decide(f, fopen("/secret.txt", proc="/bin/cat")).blocked
    assert not decide(f, fopen("/secret.txt", proc="/usr/bin/head", parent="/bin/sh")).blocked
    # KubeArmor's user-space matcher also accepts the parent process.
    assert decide(f, fopen("/secret.txt", proc="/usr/bin/head", parent="/bin/cat")).blocked


def test_from_source_dir_recursive_and_not() -> None:  # F1
    flat = [ksp("p", file=(fpath("/s", from_source=src(dir="/usr/bin/")),))]
    deep = [ksp("p", file=(fpath("/s", from_source=src(dir="/usr/", recursive=True)),))]
    assert decide(flat, fopen("/s", proc="/usr/bin/cat", parent="/bin/sh")).blocked
    assert not decide(flat, fopen("/s", proc="/usr/bin/x/cat", parent="/bin/sh")).blocked
    assert decide(deep, fopen("/s", proc="/usr/bin/x/cat", parent="/bin/sh")).blocked
    assert not decide(deep, fopen("/s", proc="/opt/cat", parent="/bin/sh")).blocked


def test_per_rule_action_and_metadata_override_policy() -> None:
    rule = FileRule(Target.PATH, "/a", RuleMeta(AUDIT, 9, ("T1", "T2"), "rule message"))
    p = [Policy(PolicyKind.KSP, "p", "ns", Selector(), BLOCK, 3, ("P",), "policy message", file=(rule,))]
    v = decide(p, fopen("/a"))
    assert (v.action, v.result, v.severity, v.tags, v.message) == (
        AUDIT,
        PASSED,
        9,
        ("T1", "T2"),
        "rule message",
    )
    f = v.fields()
    assert f["Tags"] == "T1,T2" and f["ATags"] == ["T1", "T2"] and f["Severity"] == "9"


# ----------------------------------------------------------------------------- precedence


def test_block_wins_over_allow_and_audit() -> None:  # P1
    p = [
        ksp("allow", file=(fpath("/etc/passwd", ALLOW),)),
        ksp("audit", file=(fpath("/etc/passwd", AUDIT),)),
        ksp("block", file=(fdir("/etc/"),)),
    ]
    v = decide(p, fopen("/etc/passwd"))
    assert (v.action, v.policy_name, v.result) == (BLOCK, "block", DENIED)


def test_first_block_in_policy_order_names_the_alert() -> None:  # P4
    p = [ksp("b1", file=(fpath("/a"),)), ksp("b2", file=(fdir("/", recursive=True),))]
    assert decide(p, fopen("/a")).policy_name == "b1"
    assert decide(list(reversed(p)), fopen("/a")).policy_name == "b2"


def test_audit_alert_wins_over_allow_match() -> None:  # P3
    p = [ksp("allow", file=(fpath("/a", ALLOW),)), ksp("audit", file=(fpath("/a", AUDIT),))]
    v = decide(p, fopen("/a"))
    assert (v.action, v.policy_name, v.type) == (AUDIT, "audit", LogType.MATCHED_POLICY)


def test_from_source_allow_exempts_from_global_block() -> None:  # P2 (lenient allow-list)
    p = [
        ksp("sa-block", file=(fdir("/run/secrets/", recursive=True),)),
        ksp("cat-ok", file=(fdir("/run/secrets/", ALLOW, recursive=True, from_source=src("/bin/cat")),)),
    ]
    assert not decide(p, fopen("/run/secrets/token", proc="/bin/cat")).blocked
    v = decide(p, fopen("/run/secrets/token", proc="/usr/bin/head", parent="/bin/sh"))
    assert (v.action, v.policy_name) == (BLOCK, "sa-block")


# ----------------------------------------------------------------------------- posture


def test_no_allow_rule_means_no_posture() -> None:  # K1
    p = [ksp("p", file=(fpath("/a"),))]
    assert decide(p, fopen("/b"), default_posture=BLOCK_ALL).policy_name == ""


def test_allow_list_block_posture_denies_the_rest() -> None:  # K1, D1
    p = [ksp("p", file=(fpath("/secret.txt", ALLOW, from_source=src("/bin/cat")),))]
    assert not decide(p, fopen("/secret.txt"), default_posture=BLOCK_ALL).blocked
    v = decide(p, fopen("/etc/hostname"), default_posture=BLOCK_ALL)
    assert (v.action, v.result, v.policy_name, v.type, v.severity) == (
        BLOCK,
        DENIED,
        DEFAULT_POSTURE,
        LogType.MATCHED_POLICY,
        None,
    )


def test_allow_list_audit_posture_reports_the_rest() -> None:  # K2, D1
    p = [ksp("p", file=(fpath("/secret.txt", ALLOW),))]
    v = decide(p, fopen("/etc/hostname"))  # KubeArmor's default posture: audit
    assert (v.action, v.result, v.policy_name, v.type) == (
        AUDIT,
        PASSED,
        DEFAULT_POSTURE,
        LogType.MATCHED_POLICY,
    )


def test_file_allow_list_does_not_make_execs_default_deny() -> None:  # K1
    p = [ksp("p", file=(fpath("/secret.txt", ALLOW),))]
    v = decide(p, exe("/bin/ls"), default_posture=BLOCK_ALL)
    assert (v.result, v.policy_name) == (PASSED, "")
    # Under audit posture KubeArmor's feeder counts process and file Allow rules together (K2).
    assert decide(p, exe("/bin/ls")).policy_name == DEFAULT_POSTURE


def test_process_allow_list_blocks_other_execs() -> None:  # K1
    p = [ksp("p", process=(ProcessRule(Target.DIR, "/bin/", meta(ALLOW)),))]
    assert not decide(p, exe("/bin/ls"), default_posture=BLOCK_ALL).blocked
    assert decide(p, exe("/usr/bin/env"), default_posture=BLOCK_ALL).policy_name == DEFAULT_POSTURE
    assert not decide(p, fopen("/etc/hostname"), default_posture=BLOCK_ALL).blocked


def test_allow_list_is_per_kind_for_network() -> None:  # K1
    p = [ksp("p", file=(fpath("/a", ALLOW),))]
    assert not decide(p, net(UDP), default_posture=BLOCK_ALL).blocked
    p = [ksp("p", network=(NetworkRule("tcp", meta(ALLOW), src("/usr/bin/curl")),))]
    assert not decide(p, net(TCP), default_posture=BLOCK_ALL).blocked
    assert decide(p, net(UDP), default_posture=BLOCK_ALL).policy_name == DEFAULT_POSTURE
    assert not decide(p, fopen("/x"), default_posture=BLOCK_ALL).blocked


def test_audit_rule_does_not_count_as_allowed_under_block_posture() -> None:  # P5
    p = [ksp("p", file=(fpath("/ok", ALLOW), fpath("/seen", AUDIT)))]
    assert decide(p, fopen("/seen"), default_posture=BLOCK_ALL).policy_name == DEFAULT_POSTURE


def test_namespace_annotations_override_global_posture() -> None:  # D1
    p = [ksp("p", file=(fpath("/a", ALLOW),)), ksp("q", ns="other", file=(fpath("/a", ALLOW),))]
    ann = {"ns": {"kubearmor-file-posture": "block"}, "other": {"kubearmor-file-posture": "bogus"}}
    assert decide(p, fopen("/b"), namespace_annotations=ann).blocked
    other = Workload.container("other", {"app": "web"}, "web")
    v = decide(p, fopen("/b"), other, namespace_annotations=ann, default_posture=DefaultPosture())
    assert (v.action, v.result) == (AUDIT, PASSED)  # invalid value: the global posture
    # network posture untouched by the file annotation
    n = [ksp("n", network=(NetworkRule("tcp", meta(ALLOW)),))]
    assert decide(n, net(UDP), namespace_annotations=ann).action is AUDIT


# ----------------------------------------------------------------------------- selectors


def test_match_labels_all_must_match_and_namespace() -> None:  # S1
    p = [ksp("p", labels=(("app", "web"), ("tier", "db")), file=(fpath("/a"),))]
    assert not decide(p, fopen("/a")).blocked
    w = Workload.container("ns", {"app": "web", "tier": "db", "x": "y"}, "c")
    assert decide(p, fopen("/a"), w).blocked
    assert not decide(p, fopen("/a"), Workload.container("ns2", {"app": "web", "tier": "db"})).blocked


@pytest.mark.parametrize(
    ("names", "hit"),
    [
        (None, True),
        ((), True),
        (("",), True),
        (("[]",), True),
        (("web",), True),
        (("api", "web"), True),
        (("api",), False),
    ],
)
def test_container_name_forms(names: tuple[str, ...] | None, hit: bool) -> None:  # S2
    sel = Selector(match_labels=(("app", "web"),), container_names=names)
    p = [Policy(PolicyKind.KSP, "p", "ns", sel, BLOCK, 1, file=(fpath("/a"),))]
    assert decide(p, fopen("/a")).blocked is hit


@pytest.mark.parametrize(
    ("exprs", "hit"),
    [
        ((Expression("namespace", "In", ("ns", "x")),), True),
        ((Expression("namespace", "NotIn", ("ns",)),), False),
        ((Expression("label", "In", ("app=web",)),), True),
        ((Expression("label", "In", ("app=api",)),), False),
        ((Expression("label", "NotIn", ("app=api",)),), True),
        ((Expression("label", "In", ("app=web",)), Expression("label", "NotIn", ("app=web",))), False),
    ],
)
def test_cluster_policy_expressions(exprs: tuple[Expression, ...], hit: bool) -> None:  # S3
    p = [Policy(PolicyKind.CSP, "c", None, Selector(match_expressions=exprs), BLOCK, 1, file=(fpath("/a"),))]
    assert decide(p, fopen("/a")).blocked is hit


def test_host_events_match_host_policies_only() -> None:  # S4
    host = Workload.node("node-1")
    hsp = Policy(
        PolicyKind.HSP,
        "h",
        None,
        Selector(match_labels=(("kubernetes.io/hostname", "node-1"),)),
        BLOCK,
        2,
        file=(fpath("/etc/passwd"),),
    )
    kspp = ksp("k", file=(fpath("/etc/passwd"),))
    v = decide([hsp, kspp], fopen("/etc/passwd"), host)
    assert (v.policy_name, v.type) == ("h", LogType.MATCHED_HOST_POLICY)
    assert decide([hsp, kspp], fopen("/etc/passwd")).policy_name == "k"
    assert decide([hsp], fopen("/etc/hosts"), host).type is LogType.HOST_LOG
    assert not decide([hsp], fopen("/etc/passwd"), Workload.node("node-2")).blocked


def test_host_posture_ignores_namespace_annotations() -> None:  # D2
    hsp = Policy(PolicyKind.HSP, "h", None, Selector(), ALLOW, 2, file=(fpath("/a", ALLOW),))
    v = decide(
        [hsp],
        fopen("/b"),
        Workload.node("n"),
        namespace_annotations={"": {"kubearmor-file-posture": "block"}},
    )
    assert (v.action, v.type) == (AUDIT, LogType.MATCHED_HOST_POLICY)


# ----------------------------------------------------------------------------- network, caps, syscalls


@pytest.mark.parametrize(
    ("resource", "names"),
    [
        (TCP, {"tcp"}),
        ("domain=AF_INET type=SOCK_STREAM protocol=6", {"tcp"}),
        ("domain=AF_INET6 type=SOCK_DGRAM protocol=0", {"udp"}),
        (UDP, {"udp"}),
        (RAW_ICMP, {"icmp", "raw"}),
        ("domain=AF_INET type=SOCK_DGRAM protocol=ICMP", {"icmp"}),
        ("domain=AF_PACKET type=SOCK_RAW protocol=768", {"raw"}),
        ("domain=AF_INET6 type=SOCK_RAW protocol=58", {"icmpv6", "raw"}),
    ],
)
def test_network_protocols(resource: str, names: set[str]) -> None:  # N1
    assert network_protocols(resource) == names


def test_network_rules() -> None:  # N1, N2
    p = [ksp("p", network=(NetworkRule("raw", meta(BLOCK)), NetworkRule("icmp", meta(AUDIT))))]
    assert decide(p, net(RAW_ICMP)).policy_name == "p"
    assert decide(p, net(RAW_ICMP)).blocked
    assert decide(p, net("domain=AF_INET type=SOCK_DGRAM protocol=ICMP")).action is AUDIT
    assert not decide(p, net(TCP)).blocked
    every = [ksp("p", network=(NetworkRule("all", meta(BLOCK)),))]
    assert decide(every, net(UDP)).blocked


def test_network_from_source() -> None:  # F1
    p = [ksp("p", network=(NetworkRule("tcp", meta(BLOCK), src("/usr/bin/curl")),))]
    assert decide(p, net(TCP)).blocked
    assert not decide(p, net(TCP, proc="/usr/bin/wget")).blocked


def test_capability_net_raw_is_a_raw_socket() -> None:  # C2
    p = [ksp("p", capabilities=(Capability("net_raw", meta(BLOCK)),))]
    assert decide(p, net(RAW_ICMP)).blocked
    assert not decide(p, net(TCP)).blocked
    c = Event(Operation.CAPABILITIES, "CAP_NET_RAW", "/bin/ping", "/bin/bash", "/bin/ping", 0)
    assert decide(p, c).blocked


def test_capabilities_events_and_posture() -> None:  # C1
    p = [ksp("p", capabilities=(Capability("sys_admin", meta(ALLOW)),))]
    ev = Event(Operation.CAPABILITIES, "CAP_SYS_ADMIN", "/bin/mount", "/bin/sh", "/bin/mount", 0)
    other = Event(Operation.CAPABILITIES, "CAP_SYS_PTRACE", "/bin/gdb", "/bin/sh", "/bin/gdb", 0)
    assert not decide(p, ev, default_posture=BLOCK_ALL).blocked
    assert decide(p, other, default_posture=BLOCK_ALL).policy_name == DEFAULT_POSTURE
    cap_audit = DefaultPosture(Posture.BLOCK, Posture.BLOCK, Posture.AUDIT)
    assert decide(p, other, default_posture=cap_audit).action is AUDIT


def test_syscall_rules_only_audit() -> None:  # Y1
    rules = (
        SyscallRule(("unlink",), meta(BLOCK)),
        SyscallRule(("rmdir",), meta(BLOCK), path="/tmp/", recursive=False),
    )
    p = [ksp("p", syscalls=rules)]
    unlink = Event(Operation.SYSCALL, "/x", "/bin/rm", "/bin/sh", "/bin/rm", 0, syscall="UNLINK")
    v = decide(p, unlink)
    assert (v.action, v.result, v.policy_name) == (AUDIT, PASSED, "p")
    rmdir = Event(Operation.SYSCALL, "/tmp/d", "/bin/rmdir", "/bin/sh", "/bin/rmdir", 0, syscall="RMDIR")
    assert decide(p, rmdir).action is AUDIT
    deep = Event(Operation.SYSCALL, "/tmp/a/d", "/bin/rmdir", "/bin/sh", "/bin/rmdir", 0, syscall="RMDIR")
    assert decide(p, deep).policy_name == ""


# ----------------------------------------------------------------------------- caches


def test_decision_cache_is_bounded_and_per_workload() -> None:
    p = [ksp("p", file=(fdir("/d/"),))]
    m = Matcher(p, cache_size=4)
    for i in range(10):
        assert m.decide(W, fopen(f"/d/{i}")).blocked
    assert len(m._compiled[W].cache) == 4
    other = Workload.container("ns", {"app": "api"}, "api")
    assert not m.decide(other, fopen("/d/1")).blocked
    assert [v.blocked for v in m.decide_many(W, [fopen("/d/1"), fopen("/e/1")])] == [True, False]


def test_pods_of_one_deployment_share_compiled_rules() -> None:
    a = Workload.container("ns", {"app": "web"}, "web", "web-1")
    b = Workload.container("ns", {"app": "web"}, "web", "web-2")
    assert a == b and hash(a) == hash(b)
    m = Matcher([ksp("p", file=(fpath("/a"),))])
    m.decide(a, fopen("/a"))
    m.decide(b, fopen("/a"))
    assert len(m._compiled) == 1
