"""Validation: broken copies of KubeArmor's examples fail with the right field path and line."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from armorstream.cli import cli
from enforcer.errors import PolicyErrors
from enforcer.policy import (
    PolicyKind,
    json_schema,
    load_policies,
    openapi_schema,
    parse_text,
    validate_document,
)

MARK = "MARKER"  # a unique value whose line the error must point to

KSP_FILE = "multiubuntu-security-policies/ksp-ubuntu-3-proc-path-owner-allow.yaml"
HSP_FILE = "host-security-policies/hsp-k8s-kubearmor-dev-file-dir-allow-fromSource.yaml"
CSP_FILE = "nginx-csp-cluster-security-policies/csp-in-operator-block-file-access.yaml"
NET_FILE = "multiubuntu-security-policies/ksp-ubuntu-1-net-tcp-from-source-allow.yaml"
CAP_FILE = "multiubuntu-security-policies/ksp-ubuntu-1-cap-net-raw-block.yaml"
NSP_FILE = "network-security-policies/nsp-egress-block-dns.yaml"


def load(path: Path) -> Any:
    return YAML(typ="rt").load(path.read_text())


def dump(doc: Any) -> str:
    out = io.StringIO()
    YAML(typ="rt").dump(doc, out)
    return out.getvalue()


def line_of(text: str, needle: str) -> int:
    (line,) = [i for i, s in enumerate(text.splitlines(), 1) if needle in s]
    return line


Mutation = Callable[[Any], None]


def _set(*path: str | int, value: object) -> Mutation:
    def mutate(doc: Any) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(*path: str | int) -> Mutation:
    def mutate(doc: Any) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


# (example, mutation, field path, words in the reason, text on the line the error points to)
CASES: list[tuple[str, Mutation, str, str, str]] = [
    (KSP_FILE, _set("spec", "severity", value=MARK), "spec.severity", "must be an integer", MARK),
    (KSP_FILE, _set("spec", "severity", value=11), "spec.severity", "between 1 and 10, got 11",
     "severity: 11"),
    (KSP_FILE, _set("spec", "action", value=MARK), "spec.action", "one of Allow, Audit, Block", MARK),
    (KSP_FILE, _set("spec", "action", value="BlockWithAudit"), "spec.action", "dropped", "BlockWithAudit"),
    (KSP_FILE, _set("spec", "file", "matchPaths", 1, "path", value="root/" + MARK),
     "spec.file.matchPaths[1].path", "absolute path", MARK),
    (KSP_FILE, _set("spec", "file", "matchDirectories", 2, "dir", value="/lib" + MARK),
     "spec.file.matchDirectories[2].dir", "ending with '/'", MARK),
    (KSP_FILE, _set("spec", "file", "matchPaths", 0, "readonly", value=True),
     "spec.file.matchPaths[0].readonly", "did you mean 'readOnly'", "readonly: true"),
    (KSP_FILE, _set("spec", "process", "matchPaths", 0, "readOnly", value=True),
     "spec.process.matchPaths[0].readOnly", "only to file rules", "readOnly: true"),
    (KSP_FILE, _set("spec", "process", "matchDirectories", 0, "recursive", value=MARK),
     "spec.process.matchDirectories[0].recursive", "must be true or false", MARK),
    (KSP_FILE, _set("spec", "process", "matchPatterns", value=[{"pattern": "/tmp/[" + MARK}]),
     "spec.process.matchPatterns[0].pattern", "invalid glob", MARK),
    (KSP_FILE, _set("spec", "process", "matchPaths", 0, value={"ownerOnly": MARK == "x"}),
     "spec.process.matchPaths[0]", "needs path or execname", "ownerOnly: false"),
    (KSP_FILE, _set("apiVersion", value="security.kubearmor.com/v2" + MARK), "apiVersion",
     "must be security.kubearmor.com/v1", MARK),
    (KSP_FILE, _set("kind", value="KubeArmorPolicies"), "kind", "did you mean 'KubeArmorPolicy'",
     "KubeArmorPolicies"),
    (KSP_FILE, _delete("metadata", "name"), "metadata.name", "required field is missing", "metadata:"),
    (KSP_FILE, _set("metadata", "namespace", value="Multi_" + MARK), "metadata.namespace", "namespace name",
     MARK),
    (KSP_FILE, _set("spec", "selector", "matchLabels", "kubearmor.io/container.name", value="[a," + MARK),
     'spec.selector.matchLabels["kubearmor.io/container.name"]', "[name,...]", MARK),
    (KSP_FILE, _set("spec", "selector", "matchLabels", "tier", value=3), "spec.selector.matchLabels.tier",
     "must be a string, got integer 3", "tier: 3"),
    (HSP_FILE, _delete("spec", "nodeSelector"), "spec.nodeSelector", "required field is missing", "spec:"),
    (HSP_FILE, _set("spec", "file", "matchDirectories", 0, "fromSource", 0, value={"dir": "/" + MARK + "/"}),
     "spec.file.matchDirectories[0].fromSource[0].dir", "take only path", MARK),
    (CSP_FILE, _set("spec", "selector", "matchLabels", value={"app": MARK}), "spec.selector.matchLabels",
     "matchExpressions", "matchLabels:"),
    (CSP_FILE, _set("spec", "selector", "matchExpressions", 0, "key", value=MARK),
     "spec.selector.matchExpressions[0].key", "one of namespace, label", MARK),
    (CSP_FILE, _set("spec", "selector", "matchExpressions", 0, "operator", value="Exists" + MARK),
     "spec.selector.matchExpressions[0].operator", "one of In, NotIn", MARK),
    (NET_FILE, _set("spec", "network", "matchProtocols", 0, "protocol", value="x" + MARK + "tcp"),
     "spec.network.matchProtocols[0].protocol", "unknown protocol", MARK),
    (NET_FILE, _set("spec", "network", "matchProtocols", 0, "fromSource", 0, "path", value="curl" + MARK),
     "spec.network.matchProtocols[0].fromSource[0].path", "absolute path", MARK),
    (CAP_FILE, _set("spec", "capabilities", "matchCapabilities", 0, "capability", value="NET_RAW" + MARK),
     "spec.capabilities.matchCapabilities[0].capability", "capability KubeArmor supports", MARK),
    (CAP_FILE, _set("spec", "capabilities", "matchCapabilities", 0, "capability", value="xnet_raw"),
     "spec.capabilities.matchCapabilities[0].capability", "'xnet_raw' is not a capability", "xnet_raw"),
    (CAP_FILE, _set("spec", "capabilities", value={"matchCapabilities": []}), "spec", "no rules", "spec:"),
    (CAP_FILE, _set("spec", "syscalls", value={"matchSyscalls": [{"syscall": ["opne" + MARK]}]}),
     "spec.syscalls.matchSyscalls[0].syscall[0]", "unknown syscall", MARK),
    (NSP_FILE, _set("spec", "egress", 0, "to", 0, "ipBlock", "cidr", value="1.1.1.300/32" + MARK),
     "spec.egress[0].to[0].ipBlock.cidr", "not a valid CIDR", MARK),
    (NSP_FILE, _set("spec", "egress", 0, "ports", 0, "port", value="99999"), "spec.egress[0].ports[0].port",
     "between 1 and 65535", "99999"),
]  # fmt: skip


@pytest.mark.parametrize(("example", "mutate", "path", "words", "on_line"), CASES, ids=[c[2] for c in CASES])
def test_broken_copy_reports_path_and_line(
    examples_dir: Path, example: str, mutate: Mutation, path: str, words: str, on_line: str
) -> None:
    doc = load(examples_dir / example)
    mutate(doc)
    text = dump(doc)
    policies, errors = parse_text(text, "broken.yaml")
    assert policies == []
    assert [(e.file, e.path, e.document) for e in errors] == [("broken.yaml", path, 0)], errors
    assert words in errors[0].reason
    assert errors[0].line == line_of(text, on_line)


def test_every_error_of_every_document_is_reported() -> None:
    text = """\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: two-errors
spec:
  file:
    matchDirectories:
    - dir: /etc
    matchPaths:
    - path: /etc/passwd
      severity: 0
---
# an empty document is skipped

---
apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: ok
spec:
  nodeSelector:
    matchLabels: {kubernetes.io/hostname: node1}
  process:
    matchPaths:
    - path: /usr/bin/id
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-a-policy}
---
apiVersion: security.kubearmor.com/v1
kind: KubeArmorClusterPolicy
metadata:
  name: three
spec:
  network:
    matchProtocols:
    - protocol: icmp
      action: Deny
  unknown: 1
  capabilities:
    matchCapabilities:
    - capability: net_raw
      fromSource: [{}]
"""
    policies, errors = parse_text(text, "multi.yaml")
    assert [p.name for p in policies] == ["ok"]
    assert [(e.document, e.line, e.path) for e in errors] == [
        (0, 8, "spec.file.matchDirectories[0].dir"),
        (0, 11, "spec.file.matchPaths[0].severity"),
        (4, 39, "spec.network.matchProtocols[0].action"),
        (4, 40, "spec.unknown"),
        (4, 44, "spec.capabilities.matchCapabilities[0].fromSource[0].path"),
    ]
    assert str(errors[2]).startswith("multi.yaml:39 (document 5): spec.network.matchProtocols[0].action: ")


def test_yaml_syntax_error_has_a_line() -> None:
    text = "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorPolicy\nspec:\n  file: [\n    a: b\n"
    policies, errors = parse_text(text, "bad.yaml")
    assert policies == []
    (err,) = errors
    assert err.reason.startswith("invalid YAML")
    assert err.line is not None and 4 <= err.line <= 6


def test_duplicate_keys_are_errors() -> None:
    _, errors = parse_text("kind: KubeArmorPolicy\nkind: KubeArmorPolicy\n", "dup.yaml")
    assert [(e.line, "duplicate" in e.reason) for e in errors] == [(2, True)]


def test_not_a_mapping_and_non_string_keys() -> None:
    assert [e.reason for e in validate_document(["a"])] == ["a policy document must be a mapping, got a list"]
    errors = validate_document({1: "x", "kind": "KubeArmorPolicy"})
    assert "field names must be strings, got integer 1" in [e.reason for e in errors]


def test_network_policy_cel_rules() -> None:
    doc = {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorNetworkPolicy",
        "metadata": {"name": "n"},
        "spec": {
            "selector": {"matchLabels": {"app": "a"}},
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "*"}},
            "ingress": [{"limit": "10M"}],
        },
    }
    reasons = {e.path: e.reason for e in validate_document(doc)}
    assert "cannot target both" in reasons["spec"]
    assert "limit and duration" in reasons["spec.ingress[0]"]


def test_load_policies_reports_all_files(tmp_path: Path, examples_dir: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text((examples_dir / CAP_FILE).read_text())
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.yaml"
    bad.write_text((examples_dir / CAP_FILE).read_text().replace("net_raw", "net_rw"))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    with pytest.raises(PolicyErrors) as info:
        load_policies([tmp_path, tmp_path / "missing.yaml"])
    assert sorted((e.file, e.path) for e in info.value.errors) == [
        (str(tmp_path / "missing.yaml"), ""),
        (str(bad), "spec.capabilities.matchCapabilities[0].capability"),
    ]
    assert [p.name for p in load_policies([good])] == ["ksp-ubuntu-1-cap-net-raw-block"]


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def test_schema_agrees_with_kubearmor_crds(examples_dir: Path) -> None:
    seen = set()
    for crd_file in sorted((examples_dir / "crds").glob("*.yaml")):
        crd = YAML(typ="safe").load(crd_file.read_text())
        kind = crd["spec"]["names"]["kind"]
        (version,) = crd["spec"]["versions"]
        assert (crd["spec"]["group"], version["name"]) == ("security.kubearmor.com", "v1")
        # Same structure, enums, patterns, bounds and required fields; only descriptions differ.
        assert openapi_schema(kind) == _strip_descriptions(version["schema"]["openAPIV3Schema"]), kind
        seen.add(PolicyKind(kind))
    assert seen == set(PolicyKind)


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_json_schema_is_valid_draft_2020_12(kind: PolicyKind) -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema(kind))


def test_cli_validate_examples(examples_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["policy", "validate", str(examples_dir)])
    assert result.exit_code == 0, result.output
    count = len(load_policies([examples_dir]))
    assert result.output.strip().splitlines()[-1] == f"{count} policies valid, 0 errors in 0 files"


def test_cli_validate_broken_file(tmp_path: Path, examples_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (examples_dir / HSP_FILE).read_text().replace("dir: /etc/default/", "dir: /etc/default")
    bad.write_text(text)
    result = CliRunner().invoke(cli, ["policy", "validate", str(bad), str(examples_dir / CAP_FILE)])
    assert result.exit_code == 1
    line = line_of(text, "dir: /etc/default")
    assert (
        f"{bad}:{line}: spec.file.matchDirectories[0].dir: must be an absolute directory path ending with '/'"
        in result.output
    )
    assert result.output.strip().splitlines()[-1] == "1 policy valid, 1 error in 1 file"
    assert "Traceback" not in result.output


def test_cli_validate_missing_path() -> None:
    result = CliRunner().invoke(cli, ["policy", "validate", "/nonexistent/policy.yaml"])
    assert result.exit_code == 1
    assert "/nonexistent/policy.yaml: no such file or directory" in result.output
