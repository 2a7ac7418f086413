"""Parsing KubeArmor policies into the model: the published examples, defaults and selectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from enforcer.errors import PolicyErrors
from enforcer.policy import (
    Action,
    Expression,
    FromSource,
    Policy,
    PolicyKind,
    Target,
    compile_pattern,
    load_policies,
    parse_file,
    parse_policy,
    parse_text,
    policy_files,
)

KINDS = {k.value for k in PolicyKind}


def one(path: Path) -> Policy:
    policies, errors = parse_file(path)
    assert errors == []
    assert len(policies) == 1
    return policies[0]


def test_every_example_validates_and_parses(examples_dir: Path) -> None:
    files, errors = policy_files([examples_dir])
    assert errors == []
    expected = 0
    parsed: list[Policy] = []
    for f in files:
        # Count the KubeArmor documents with an independent loader.
        expected += sum(
            1
            for d in YAML(typ="safe").load_all(f.read_text())
            if isinstance(d, dict) and d.get("kind") in KINDS
        )
        policies, errs = parse_file(f)
        assert errs == [], f"{f}: {errs}"
        parsed += policies
    assert expected >= 90
    assert len(parsed) == expected
    assert {p.kind for p in parsed} == set(PolicyKind)
    assert load_policies([examples_dir]) == parsed


def test_file_pattern_owner_readonly(examples_dir: Path) -> None:
    p = one(
        examples_dir / "multiubuntu-security-policies/ksp-ubuntu-1-file-pattern-owner-readonly-block.yaml"
    )
    assert (p.kind, p.name, p.namespace) == (
        PolicyKind.KSP,
        "ksp-ubuntu-1-file-pattern-owner-readonly-block",
        "multiubuntu",
    )
    assert p.selector.match_labels == (("container", "ubuntu-1"),)
    assert p.selector.container_names is None
    (rule,) = p.file
    assert (rule.target, rule.value, rule.owner_only, rule.read_only) == (
        Target.PATTERN,
        "/home/user1/secret_data*",
        True,
        True,
    )
    assert rule.meta.action is Action.BLOCK
    assert rule.meta.severity == 5
    assert rule.meta.message == "block files following a pattern for user1"


def test_process_and_file_directories_recursive(examples_dir: Path) -> None:
    p = one(examples_dir / "multiubuntu-security-policies/ksp-ubuntu-3-proc-path-owner-allow.yaml")
    assert p.action is Action.ALLOW
    first, *dirs = p.process
    assert (first.target, first.value, first.owner_only) == (Target.PATH, "/home/user1/hello", True)
    assert [(d.target, d.value, d.recursive) for d in dirs] == [
        (Target.DIR, "/bin/", True),
        (Target.DIR, "/usr/bin/", True),
    ]
    assert [r.value for r in p.file if r.target is Target.DIR] == [
        "/etc/",
        "/proc/",
        "/lib/",
        "/sys/",
        "/pts/",
    ]
    assert all(r.meta.action is Action.ALLOW and r.meta.severity == 7 for r in p.process + p.file)


def test_from_source(examples_dir: Path) -> None:
    p = one(examples_dir / "multiubuntu-security-policies/ksp-group-2-file-path-allow-from-source-path.yaml")
    (rule,) = p.file
    assert rule.value == "/secret.txt"
    assert rule.from_source == (FromSource(path="/bin/cat"),)
    assert rule.meta.action is Action.ALLOW


def test_cluster_policy_match_expressions(examples_dir: Path) -> None:
    p = one(examples_dir / "nginx-csp-cluster-security-policies/csp-matchlabels-in-block-process.yaml")
    assert p.kind is PolicyKind.CSP
    assert p.namespace is None
    assert p.selector.match_expressions == (
        Expression("namespace", "In", ("nginx1",)),
        Expression("label", "In", ("app=nginx", "app=nginx-dev")),
    )
    assert [r.value for r in p.process] == ["/usr/bin/apt"]


def test_execname_and_label_expressions(examples_dir: Path) -> None:
    p = one(examples_dir / "multiubuntu-security-policies/ksp-match-expression-in-notin-block-process.yaml")
    (rule,) = p.process
    assert (rule.value, rule.exec_name) == ("apt", True)
    assert [e.operator for e in p.selector.match_expressions] == ["In", "NotIn"]


def test_container_name_label_and_default_namespace(examples_dir: Path) -> None:
    p = one(examples_dir / "workloads/kubearmor_containerpolicy.yaml")
    assert p.namespace == "default"  # no metadata.namespace: kubectl's default namespace
    assert p.selector.container_names == ("lb",)
    assert p.selector.match_labels == ()
    assert {r.meta.tags for r in p.process} == {("WARNING",)}


def test_host_policy_node_selector(examples_dir: Path) -> None:
    p = one(examples_dir / "host-security-policies/hsp-k8s-kubearmor-dev-file-dir-allow-fromSource.yaml")
    assert p.kind is PolicyKind.HSP
    assert p.namespace is None
    assert p.selector.match_labels == (("kubernetes.io/hostname", "kubearmor-dev"),)
    (rule,) = p.file
    assert (rule.value, rule.recursive, rule.from_source) == (
        "/etc/default/",
        True,
        (FromSource(path="/usr/bin/head"),),
    )


def test_network_and_capabilities(examples_dir: Path) -> None:
    net = one(examples_dir / "multiubuntu-security-policies/ksp-ubuntu-1-net-tcp-from-source-allow.yaml")
    (rule,) = net.network
    assert (rule.protocol, rule.from_source, rule.meta.action) == (
        "tcp",
        (FromSource(path="/usr/bin/curl"),),
        Action.ALLOW,
    )
    cap = one(examples_dir / "multiubuntu-security-policies/ksp-ubuntu-1-cap-net-raw-block.yaml")
    assert [c.name for c in cap.capabilities] == ["net_raw"]
    assert cap.severity == 1  # not given: KubeArmor's documented default


def test_network_policy(examples_dir: Path) -> None:
    p = one(examples_dir / "network-security-policies/nsp-egress-block-dns.yaml")
    assert p.kind is PolicyKind.NSP
    (rule,) = p.egress
    assert rule.cidrs == ("1.1.1.1/32",)
    assert [(x.port, x.protocol) for x in rule.ports] == [("dns", "udp")]
    assert (rule.meta.action, rule.meta.severity) == (Action.BLOCK, 5)
    assert p.ingress == ()


POLICY = """\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: layered
  namespace: ns1
spec:
  severity: 2
  tags: [spec-tag]
  message: spec message
  selector:
    matchLabels:
      app: web
      kubearmor.io/container.name: "{containers}"
  process:
    severity: 6
    action: Audit
    matchPaths:
    - path: /bin/sh
    - path: /bin/ls
      severity: 9
      tags: [rule-tag]
      message: rule message
      action: Allow
  file:
    matchDirectories:
    - dir: /etc/
      readOnly: true
  network:
    matchProtocols:
    - protocol: tcp, UDP
  capabilities:
    tags: [cap-tag]
    matchCapabilities:
    - capability: cap_sys_admin,net_raw
      action: Audit
  syscalls:
    severity: 4
    matchSyscalls:
    - syscall: [unlink, rmdir]
      fromSource:
      - dir: /usr/bin/
        recursive: true
    matchPaths:
    - path: /etc/
      recursive: true
      syscall: [open]
  action: Block
"""


def layered(containers: str = "[a, b]") -> Policy:
    policies, errors = parse_text(POLICY.replace("{containers}", containers), "layered.yaml")
    assert errors == []
    return policies[0]


def test_rule_section_spec_inheritance() -> None:
    p = layered()
    sh, ls = p.process
    # Rule value first, then the section's, then the spec's (KubeArmor's CreateSecurityPolicy).
    assert (sh.meta.severity, sh.meta.action, sh.meta.tags, sh.meta.message) == (
        6,
        Action.AUDIT,
        ("spec-tag",),
        "spec message",
    )
    assert (ls.meta.severity, ls.meta.action, ls.meta.tags, ls.meta.message) == (
        9,
        Action.ALLOW,
        ("rule-tag",),
        "rule message",
    )
    (etc,) = p.file
    assert (etc.read_only, etc.meta.severity, etc.meta.action) == (True, 2, Action.BLOCK)


def test_comma_lists_expand_like_kubearmor() -> None:
    p = layered()
    assert [r.protocol for r in p.network] == ["tcp", "udp"]
    assert [(c.name, c.meta.action, c.meta.tags) for c in p.capabilities] == [
        ("sys_admin", Action.AUDIT, ("cap-tag",)),
        ("net_raw", Action.AUDIT, ("cap-tag",)),
    ]


def test_syscall_rules() -> None:
    calls, paths = layered().syscalls
    assert calls.syscalls == ("unlink", "rmdir")
    assert calls.from_source == (FromSource(dir="/usr/bin/", recursive=True),)
    assert (calls.meta.action, calls.meta.severity) == (Action.AUDIT, 4)
    assert (paths.path, paths.recursive, paths.syscalls) == ("/etc/", True, ("open",))


@pytest.mark.parametrize(
    ("label", "expected"),
    [("[a, b]", ("a", "b")), ("[web]", ("web",)), ("[]", ()), ("", ()), ("a,b", ("a", "b"))],
)
def test_container_name_forms(label: str, expected: tuple[str, ...]) -> None:
    p = layered(label)
    assert p.selector.container_names == expected
    assert p.selector.match_labels == (("app", "web"),)


def test_container_names_absent_is_none() -> None:
    text = POLICY.replace('      kubearmor.io/container.name: "{containers}"\n', "")
    (p,), errors = parse_text(text, "x.yaml")
    assert errors == []
    assert p.selector.container_names is None


def api_object() -> dict[str, Any]:
    """A policy as the Kubernetes API returns it (server-set metadata and status included)."""
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorClusterPolicy",
        "metadata": {
            "name": "csp",
            "namespace": "ignored",
            "uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "resourceVersion": "42",
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {
            "selector": {
                "matchExpressions": [{"key": "namespace", "operator": "NotIn", "values": ["kube-system"]}]
            },
            "file": {"matchPaths": [{"path": "/etc/shadow", "readOnly": True}]},
            "severity": 7,
        },
        "status": {"status": "OK"},
    }


def test_parse_policy_accepts_api_objects() -> None:
    p = parse_policy(api_object(), file="k8s:csp")
    assert (p.kind, p.namespace, p.source_file) == (PolicyKind.CSP, None, "k8s:csp")
    assert p.action is Action.BLOCK  # no action anywhere: KubeArmor's default
    assert p.file[0].meta.severity == 7
    assert p.raw["status"] == {"status": "OK"}


def test_parse_policy_raises_every_error() -> None:
    doc = api_object()
    doc["spec"]["severity"] = 0
    doc["spec"]["file"]["matchPaths"][0]["path"] = "etc/shadow"
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc, file="k8s:csp")
    assert sorted((e.path, e.line) for e in info.value.errors) == [
        ("spec.file.matchPaths[0].path", None),
        ("spec.severity", None),
    ]


@pytest.mark.parametrize(
    ("glob", "matches", "misses"),
    [
        ("/etc/*hado?", ["/etc/shadow", "/etc/gshadow"], ["/etc/x/shadow"]),
        (
            "/home/user1/secret_data*",
            ["/home/user1/secret_data", "/home/user1/secret_data1"],
            ["/home/user1/secret_data/x"],
        ),
        ("/var/log/**", ["/var/log/a", "/var/log/a/b/c"], ["/var/logs"]),
        ("/etc/{passwd,group}", ["/etc/passwd", "/etc/group"], ["/etc/shadow"]),
        ("/tmp/[!a-c]x", ["/tmp/dx"], ["/tmp/ax", "/tmp/bx"]),
        ("/a/\\*", ["/a/*"], ["/a/b"]),
    ],
)
def test_compile_pattern(glob: str, matches: list[str], misses: list[str]) -> None:
    rx = compile_pattern(glob)
    assert all(rx.fullmatch(m) for m in matches)
    assert not any(rx.fullmatch(m) for m in misses)
