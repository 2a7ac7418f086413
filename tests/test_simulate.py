"""`armorstream policy simulate`: KubeArmor Log records in, KubeArmor's Alert/Log out."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from armorstream.simulate_cmd import SimulationError, parse_default_posture, simulate
from enforcer.workload import DefaultPosture, Posture

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

POLICY = """\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: ksp-web-protect
  namespace: shop
spec:
  severity: 7
  tags: ["MITRE", "T1552"]
  message: "secret read"
  selector:
    matchLabels:
      app: web
  file:
    matchDirectories:
    - dir: /run/secrets/
      recursive: true
    matchPaths:
    - path: /etc/passwd
      action: Audit
      severity: 2
  process:
    matchPaths:
    - path: /usr/bin/nc
      action: Allow
  action: Block
"""


def rec(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "Timestamp": 1764000000,
        "ClusterName": "default",
        "HostName": "node-1",
        "NamespaceName": "shop",
        "PodName": "web-1",
        "Labels": "app=web,tier=front",
        "ContainerID": "abc",
        "ContainerName": "web",
        "HostPID": 10,
        "UID": 0,
        "ProcessName": "/bin/cat",
        "ParentProcessName": "/bin/bash",
        "Source": "/bin/cat /run/secrets/token",
        "Operation": "File",
        "Data": "syscall=SYS_OPENAT fd=-100 flags=O_RDONLY",
    }
    base.update(kw)
    return base


def run(tmp_path: Path, lines: list[bytes], *args: str) -> tuple[int, list[dict[str, object]], str]:
    (tmp_path / "p.yaml").write_text(POLICY)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(line + b"\n" for line in lines))
    result = CliRunner().invoke(simulate, ["-f", str(tmp_path / "p.yaml"), "--events", str(events), *args])
    out = [orjson.loads(x) for x in result.stdout.splitlines()]
    return result.exit_code, out, result.stderr


def test_simulate_outputs_kubearmor_fields(tmp_path: Path) -> None:
    lines = [
        orjson.dumps(rec(Resource="/run/secrets/kubernetes.io/serviceaccount/token")),
        orjson.dumps(rec(Resource="/etc/passwd", Extra="kept")),
        orjson.dumps(rec(Resource="/etc/hostname")),
        orjson.dumps(
            rec(
                Operation="Process",
                Resource="/usr/bin/nc -l 80",
                ProcessName="/usr/bin/nc",
                Source="/bin/bash",
                Data="syscall=SYS_EXECVE",
            )
        ),
        orjson.dumps(rec(NamespaceName="", PodName="", ContainerID="", Resource="/run/secrets/x")),
    ]
    code, out, err = run(tmp_path, lines)
    assert code == 0, err
    assert len(out) == 5
    picked = [
        {k: o[k] for k in ("Action", "Result", "PolicyName", "Severity", "Tags", "ATags", "Message", "Type")}
        for o in out
    ]
    assert picked == [
        {
            "Action": "Block",
            "Result": "Permission denied",
            "PolicyName": "ksp-web-protect",
            "Severity": "7",
            "Tags": "MITRE,T1552",
            "ATags": ["MITRE", "T1552"],
            "Message": "secret read",
            "Type": "MatchedPolicy",
        },
        {
            "Action": "Audit",
            "Result": "Passed",
            "PolicyName": "ksp-web-protect",
            "Severity": "2",
            "Tags": "MITRE,T1552",
            "ATags": ["MITRE", "T1552"],
            "Message": "secret read",
            "Type": "MatchedPolicy",
        },
        # the process Allow rule puts file access in allow-list mode under audit posture (K2)
        {
            "Action": "Audit",
            "Result": "Passed",
            "PolicyName": "DefaultPosture",
            "Severity": "",
            "Tags": "",
            "ATags": [],
            "Message": "",
            "Type": "MatchedPolicy",
        },
        {
            "Action": "Allow",
            "Result": "Passed",
            "PolicyName": "ksp-web-protect",
            "Severity": "7",
            "Tags": "MITRE,T1552",
            "ATags": ["MITRE", "T1552"],
            "Message": "secret read",
            "Type": "ContainerLog",
        },
        {
            "Action": "Allow",
            "Result": "Passed",
            "PolicyName": "",
            "Severity": "",
            "Tags": "",
            "ATags": [],
            "Message": "",
            "Type": "HostLog",
        },
    ]
    # every input field is kept, unchanged
    assert out[1]["Extra"] == "kept" and out[1]["Resource"] == "/etc/passwd" and out[1]["HostPID"] == 10


def test_allow_list_posture_from_flag_and_annotations(tmp_path: Path) -> None:
    lines = [
        orjson.dumps(rec(Operation="Process", Resource="/bin/sh", ProcessName="/bin/sh", Source="/bin/bash"))
    ]
    code, out, _ = run(tmp_path, lines)
    assert code == 0
    assert (out[0]["Action"], out[0]["PolicyName"], out[0]["Result"]) == ("Audit", "DefaultPosture", "Passed")
    code, out, _ = run(tmp_path, lines, "--default-posture", "block")
    assert code == 0
    assert (out[0]["Action"], out[0]["PolicyName"], out[0]["Result"]) == (
        "Block",
        "DefaultPosture",
        "Permission denied",
    )
    ann = tmp_path / "ns.yaml"
    ann.write_text("shop:\n  kubearmor-file-posture: block\n")
    _, out, _ = run(tmp_path, lines, "--namespace-annotations", str(ann))
    assert out[0]["Result"] == "Permission denied"


def test_owner_and_write_extra_fields(tmp_path: Path) -> None:
    policy = POLICY.replace(
        "    - dir: /run/secrets/\n      recursive: true\n",
        "    - dir: /run/secrets/\n      recursive: true\n      ownerOnly: true\n      readOnly: true\n",
    )
    (tmp_path / "q.yaml").write_text(policy)
    events = tmp_path / "e.jsonl"
    events.write_bytes(
        b"\n".join(
            [
                orjson.dumps(rec(Resource="/run/secrets/t", UID=1000, OwnerUID=1000)),
                orjson.dumps(
                    rec(Resource="/run/secrets/t", UID=1000, OwnerUID=1000, Data="flags=O_WRONLY|O_APPEND")
                ),
                orjson.dumps(rec(Resource="/run/secrets/t", UID=1000, OwnerUID=1000, Write=True)),
                orjson.dumps(rec(Resource="/run/secrets/t", UID=0, OwnerUID=1000)),
            ]
        )
    )
    result = CliRunner().invoke(simulate, ["-f", str(tmp_path / "q.yaml"), "--events", str(events)])
    assert [orjson.loads(x)["Result"] for x in result.stdout.splitlines()] == [
        "Passed",
        "Permission denied",
        "Permission denied",
        "Permission denied",
    ]


def test_bad_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    lines = [
        b"{not json",
        orjson.dumps(rec(Resource="/etc/hostname")),
        b"[1, 2]",
        orjson.dumps(rec(Operation="Teleport")),
        orjson.dumps(rec(UID="root")),
        b"",
        orjson.dumps(rec(Resource="/run/secrets/a")),
    ]
    code, out, err = run(tmp_path, lines)
    assert code == 1
    assert [o["Resource"] for o in out] == ["/etc/hostname", "/run/secrets/a"]
    assert "events.jsonl:1: not valid JSON" in err
    assert "events.jsonl:3: expected a JSON object" in err
    assert "events.jsonl:4: Operation: expected one of" in err
    assert "events.jsonl:5: UID: expected an integer" in err
    assert "4 bad event line(s)" in err
    assert "Traceback" not in err


def test_bad_policy_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(POLICY.replace("action: Block", "action: Maybe"))
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"")
    result = CliRunner().invoke(simulate, ["-f", str(tmp_path / "bad.yaml"), "--events", str(events)])
    assert result.exit_code == 1
    assert "bad.yaml" in result.stderr and "action" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_posture_option() -> None:
    assert parse_default_posture([]) == DefaultPosture()
    assert parse_default_posture(["block"]) == DefaultPosture(Posture.BLOCK, Posture.BLOCK, Posture.BLOCK)
    assert parse_default_posture(["block", "network=audit"]) == DefaultPosture(
        Posture.BLOCK, Posture.AUDIT, Posture.BLOCK
    )
    with pytest.raises(SimulationError):
        parse_default_posture(["deny"])
    with pytest.raises(SimulationError):
        parse_default_posture(["process=block"])


def test_shipped_examples_simulate_cleanly() -> None:
    result = CliRunner().invoke(
        simulate,
        [
            "-f",
            str(EXAMPLES / "policies"),
            "--namespace-annotations",
            str(EXAMPLES / "namespace-annotations.yaml"),
            "--events",
            str(EXAMPLES / "events.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    out = [orjson.loads(x) for x in result.stdout.splitlines()]
    assert len(out) == len((EXAMPLES / "events.jsonl").read_bytes().splitlines())
    by_policy = {o["PolicyName"] for o in out}
    assert {
        "ksp-checkout-protect-secrets",
        "csp-block-raw-sockets",
        "hsp-node-protect-shadow",
        "DefaultPosture",
        "ksp-shop-audit-passwd",
    } <= by_policy
