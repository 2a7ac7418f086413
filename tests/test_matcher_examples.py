"""KubeArmor's example policies, parsed as users write them, against the outcomes their
test comments state (the `# test` blocks under ../shared/kubearmor-examples).

KubeArmor ran those scenarios with the default posture `block`, so we do too. Every
example file is either covered here or listed in NOT_COVERED with the reason, so a new
example cannot slip through unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer.karmor_log import Event
from enforcer.matcher import Matcher
from enforcer.policy.model import Action, Operation
from enforcer.verdict import DENIED, PASSED, LogType
from enforcer.workload import DefaultPosture, Posture, Workload
from tests.conftest import EXAMPLES

BLOCK_ALL = DefaultPosture(Posture.BLOCK, Posture.BLOCK, Posture.BLOCK)
ROOT, USER1 = 0, 1000


def ubuntu(n: int) -> Workload:
    group = "group-1" if n <= 3 else "group-2"
    return Workload.container(
        "multiubuntu", {"group": group, "container": f"ubuntu-{n}"}, f"ubuntu-{n}-container"
    )


NGINX1 = Workload.container("nginx1", {"app": "nginx"}, "nginx")
NGINX2 = Workload.container("nginx2", {"app": "nginx"}, "nginx")
WORDPRESS = Workload.container("wordpress-mysql", {"app": "wordpress"}, "wordpress")
MYSQL = Workload.container("wordpress-mysql", {"app": "mysql"}, "mysql")
DEV_HOST = Workload.node("kubearmor-dev")


def _owner(path: str) -> int:
    return USER1 if path.startswith("/home/user1/") else ROOT


def read(path: str, uid: int = ROOT, proc: str = "/bin/cat", parent: str = "/bin/bash") -> Event:
    return Event(Operation.FILE, path, proc, parent, proc, uid, _owner(path), False)


def write(path: str, uid: int = ROOT, proc: str = "/bin/bash", parent: str = "/bin/bash") -> Event:
    return Event(Operation.FILE, path, proc, parent, proc, uid, _owner(path), True)


def run(binary: str, parent: str = "/bin/bash", uid: int = ROOT) -> Event:
    return Event(Operation.PROCESS, binary, binary, parent, parent, uid, _owner(binary))


def sock(resource: str, proc: str) -> Event:
    return Event(Operation.NETWORK, resource, proc, "/bin/bash", proc, ROOT)


RAW_ICMP = "domain=AF_INET type=SOCK_RAW protocol=ICMP"
RAW_PACKET = "domain=AF_PACKET type=SOCK_RAW protocol=0"
TCP = "domain=AF_INET type=SOCK_STREAM protocol=TCP"
UDP = "domain=AF_INET type=SOCK_DGRAM protocol=UDP"
RW = "/readwrite"

MU = "multiubuntu-security-policies/"
HS = "host-security-policies/"
CS = "nginx-csp-cluster-security-policies/"
WP = "wordpress-mysql-security-policies/"

# (example file, workload, event, expected): "deny" = Permission denied; "audit" = an Audit
# alert, Passed; "pass" = Passed with no alert ("no log" or silently allowed).
CASES: list[tuple[str, Workload, Event, str]] = [
    (MU + "ksp-group-1-proc-path-block-from-source", ubuntu(1), run("/bin/ls", parent="/bin/dash"), "deny"),
    (MU + "ksp-group-1-proc-path-block-from-source", ubuntu(1), run("/bin/cat", parent="/bin/dash"), "pass"),
    (MU + "ksp-group-1-proc-path-block", ubuntu(1), run("/bin/sleep"), "deny"),
    (MU + "ksp-group-2-file-path-allow-from-source-path", ubuntu(4), read("/secret.txt"), "pass"),
    (MU + "ksp-group-2-file-path-allow-from-source-path", ubuntu(4), read("/etc/hostname"), "deny"),
    (MU + "ksp-group-2-file-path-audit-from-source-path", ubuntu(4), read("/secret.txt"), "audit"),
    (MU + "ksp-group-2-file-path-audit-from-source-path", ubuntu(4), read("/etc/hostname"), "pass"),
    (MU + "ksp-group-2-file-path-block-from-source-path", ubuntu(4), read("/secret.txt"), "deny"),
    (MU + "ksp-group-2-file-path-block-from-source-path", ubuntu(4), read("/etc/hostname"), "pass"),
    (
        MU + "ksp-group-2-file-path-owner-allow-from-source-path",
        ubuntu(4),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-group-2-file-path-owner-allow-from-source-path",
        ubuntu(4),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-group-2-file-path-owner-allow-from-source-path",
        ubuntu(4),
        read("/etc/hostname", USER1),
        "deny",
    ),
    (
        MU + "ksp-group-2-file-path-owner-block-from-source-path",
        ubuntu(4),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-group-2-file-path-owner-block-from-source-path",
        ubuntu(4),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-group-2-file-path-owner-block-from-source-path",
        ubuntu(4),
        read("/etc/hostname", USER1),
        "pass",
    ),
    (MU + "ksp-group-2-proc-path-audit", ubuntu(4), run("/bin/sleep"), "audit"),
    (MU + "ksp-match-expression-in-notin-block-process", ubuntu(1), run("/usr/bin/apt"), "deny"),
    (MU + "ksp-match-expression-in-notin-block-process", ubuntu(3), run("/usr/bin/apt"), "pass"),
    (MU + "ksp-match-expression-notin-block-process", ubuntu(1), run("/usr/bin/apt"), "pass"),
    (MU + "ksp-match-expression-notin-block-process", ubuntu(2), run("/usr/bin/apt"), "deny"),
    (MU + "ksp-ubuntu-1-cap-net-raw-block", ubuntu(1), sock(RAW_PACKET, "/usr/sbin/arping"), "deny"),
    (MU + "ksp-ubuntu-1-file-path-audit", ubuntu(1), read("/etc/passwd"), "audit"),
    (MU + "ksp-ubuntu-1-file-path-audit", ubuntu(1), write("/secret.txt"), "audit"),
    (MU + "ksp-ubuntu-1-file-path-audit", ubuntu(1), write("/credentials/password"), "audit"),
    (MU + "ksp-ubuntu-1-file-path-block", ubuntu(1), read("/etc/passwd"), "deny"),
    (MU + "ksp-ubuntu-1-file-path-block", ubuntu(1), write("/secret.txt"), "deny"),
    (MU + "ksp-ubuntu-1-file-path-block", ubuntu(1), write("/credentials/password"), "deny"),
    (MU + "ksp-ubuntu-1-file-pattern-allow", ubuntu(1), read("/etc/hosts"), "deny"),
    (MU + "ksp-ubuntu-1-file-pattern-allow", ubuntu(1), read("/etc/shadow"), "pass"),
    (MU + "ksp-ubuntu-1-file-pattern-allow", ubuntu(1), read("/etc/gshadow"), "pass"),
    (MU + "ksp-ubuntu-1-file-pattern-allow", ubuntu(1), run("/bin/cat"), "pass"),
    (MU + "ksp-ubuntu-1-file-pattern-audit", ubuntu(1), read("/etc/shadow"), "audit"),
    (MU + "ksp-ubuntu-1-file-pattern-audit", ubuntu(1), read("/etc/gshadow"), "audit"),
    (MU + "ksp-ubuntu-1-file-pattern-block", ubuntu(1), read("/etc/shadow"), "deny"),
    (MU + "ksp-ubuntu-1-file-pattern-block", ubuntu(1), read("/etc/gshadow"), "deny"),
    (MU + "ksp-ubuntu-1-file-pattern-owner-allow", ubuntu(1), read("/home/user1/secret_data1.txt"), "deny"),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-allow",
        ubuntu(1),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-allow",
        ubuntu(1),
        read("/home/user1/otherfile.txt", USER1),
        "deny",
    ),
    (MU + "ksp-ubuntu-1-file-pattern-owner-block", ubuntu(1), read("/home/user1/secret_data1.txt"), "deny"),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-block",
        ubuntu(1),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-readonly-block",
        ubuntu(1),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-readonly-block",
        ubuntu(1),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-readonly-block",
        ubuntu(1),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-1-file-pattern-owner-readonly-block",
        ubuntu(1),
        write("/home/user1/secret_data1.txt", USER1),
        "deny",
    ),
    (MU + "ksp-ubuntu-1-net-raw-block", ubuntu(1), sock(RAW_ICMP, "/bin/ping"), "deny"),
    (MU + "ksp-ubuntu-1-net-tcp-from-source-allow", ubuntu(1), sock(TCP, "/usr/bin/curl"), "pass"),
    (MU + "ksp-ubuntu-1-net-tcp-from-source-allow", ubuntu(1), sock(UDP, "/usr/bin/curl"), "deny"),
    (MU + "ksp-ubuntu-1-proc-dir-block", ubuntu(1), run("/sbin/route"), "deny"),
    (MU + "ksp-ubuntu-2-file-dir-owner-allow", ubuntu(2), read("/home/user1/secret_data1.txt"), "deny"),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-allow",
        ubuntu(2),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-block",
        ubuntu(2),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-allow",
        ubuntu(2),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-allow",
        ubuntu(2),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-allow",
        ubuntu(2),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-allow",
        ubuntu(2),
        write("/home/user1/secret_data1.txt", USER1),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-block",
        ubuntu(2),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-block",
        ubuntu(2),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-block",
        ubuntu(2),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-owner-readonly-block",
        ubuntu(2),
        write("/home/user1/secret_data1.txt", USER1),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-allow-from-source-path",
        ubuntu(2),
        read("/credentials/password"),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-allow-from-source-path",
        ubuntu(2),
        read("/credentials/keys/priv.key"),
        "pass",
    ),
    (MU + "ksp-ubuntu-2-file-dir-recursive-allow-from-source-path", ubuntu(2), read("/etc/hostname"), "deny"),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-audit-from-source-path",
        ubuntu(2),
        read("/credentials/password"),
        "audit",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-audit-from-source-path",
        ubuntu(2),
        read("/credentials/keys/priv.key"),
        "audit",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-audit-from-source-path",
        ubuntu(2),
        read("/credentials/password", proc="/usr/bin/head"),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-block-from-source-path",
        ubuntu(2),
        read("/credentials/password"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-block-from-source-path",
        ubuntu(2),
        read("/credentials/keys/priv.key"),
        "deny",
    ),
    (MU + "ksp-ubuntu-2-file-dir-recursive-block-from-source-path", ubuntu(2), read("/etc/hostname"), "pass"),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-block",
        ubuntu(2),
        read("/run/secrets/kubernetes.io/serviceaccount/token"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-allow",
        ubuntu(2),
        read("/home/user1/dir1/key1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-allow",
        ubuntu(2),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-allow",
        ubuntu(2),
        read("/home/user1/dir1/key1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-allow",
        ubuntu(2),
        write("/home/user1/secret_data1.txt", USER1),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        read("/home/user1/dir1/key1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        read("/home/user1/dir1/key1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        write("/home/user1/secret_data1.txt", USER1),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-block",
        ubuntu(2),
        write("/home/user1/dir1/key1.txt", USER1),
        "deny",
    ),
    (MU + "ksp-ubuntu-2-proc-dir-recursive-block", ubuntu(2), run("/usr/bin/env"), "deny"),
    (MU + "ksp-ubuntu-2-proc-dir-recursive-block", ubuntu(2), run("/usr/bin/whoami"), "deny"),
    (MU + "ksp-ubuntu-3-file-dir-allow-from-source-path", ubuntu(3), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-3-file-dir-allow-from-source-path", ubuntu(3), read("/etc/hostname"), "deny"),
    (MU + "ksp-ubuntu-3-file-dir-audit-from-source-path", ubuntu(3), read("/credentials/password"), "audit"),
    (MU + "ksp-ubuntu-3-file-dir-audit-from-source-path", ubuntu(3), read("/etc/hostname"), "pass"),
    (MU + "ksp-ubuntu-3-file-dir-block-from-source-path", ubuntu(3), read("/credentials/password"), "deny"),
    (MU + "ksp-ubuntu-3-file-dir-block-from-source-path", ubuntu(3), read("/etc/hostname"), "pass"),
    (
        MU + "ksp-ubuntu-3-file-dir-readonly-allow-from-source-path",
        ubuntu(3),
        read("/credentials/password", proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-3-file-dir-readonly-allow-from-source-path",
        ubuntu(3),
        write("/credentials/password", proc=RW),
        "deny",
    ),
    (MU + "ksp-ubuntu-3-file-dir-readonly-allow", ubuntu(3), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-3-file-dir-readonly-allow", ubuntu(3), read("/credentials/keys/priv.key"), "deny"),
    (MU + "ksp-ubuntu-3-file-dir-readonly-allow", ubuntu(3), write("/credentials/password"), "deny"),
    (
        MU + "ksp-ubuntu-3-file-dir-readonly-block-from-source-path",
        ubuntu(3),
        read("/credentials/password", proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-3-file-dir-readonly-block-from-source-path",
        ubuntu(3),
        write("/credentials/password", proc=RW),
        "deny",
    ),
    (MU + "ksp-ubuntu-3-file-dir-readonly-block", ubuntu(3), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-3-file-dir-readonly-block", ubuntu(3), write("/credentials/password"), "deny"),
    (MU + "ksp-ubuntu-3-file-path-owner-allow", ubuntu(3), read("/home/user1/secret_data1.txt"), "deny"),
    (
        MU + "ksp-ubuntu-3-file-path-owner-allow",
        ubuntu(3),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-3-file-path-owner-allow",
        ubuntu(3),
        write("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (MU + "ksp-ubuntu-3-file-path-owner-block", ubuntu(3), read("/home/user1/secret_data1.txt"), "deny"),
    (
        MU + "ksp-ubuntu-3-file-path-owner-block",
        ubuntu(3),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-3-file-path-owner-block",
        ubuntu(3),
        write("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (MU + "ksp-ubuntu-3-proc-dir-allow", ubuntu(3), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-3-proc-dir-allow", ubuntu(3), read("/etc/hostname"), "deny"),
    (MU + "ksp-ubuntu-3-proc-path-owner-allow", ubuntu(3), run("/home/user1/hello"), "deny"),
    (MU + "ksp-ubuntu-3-proc-path-owner-allow", ubuntu(3), run("/home/user1/hello", uid=USER1), "pass"),
    (MU + "ksp-ubuntu-3-proc-path-owner-block", ubuntu(3), run("/home/user1/hello"), "deny"),
    (MU + "ksp-ubuntu-3-proc-path-owner-block", ubuntu(3), run("/home/user1/hello", uid=USER1), "pass"),
    (MU + "ksp-ubuntu-4-file-dir-allow", ubuntu(4), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-4-file-dir-allow", ubuntu(4), read("/credentials/keys/priv.key"), "deny"),
    (MU + "ksp-ubuntu-4-file-dir-audit", ubuntu(4), read("/credentials/password"), "audit"),
    (MU + "ksp-ubuntu-4-file-dir-audit", ubuntu(4), read("/credentials/keys/priv.key"), "pass"),
    (MU + "ksp-ubuntu-4-file-dir-block", ubuntu(4), read("/credentials/password"), "deny"),
    (MU + "ksp-ubuntu-4-file-dir-block", ubuntu(4), read("/credentials/keys/priv.key"), "pass"),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-allow-from-source-path",
        ubuntu(4),
        read("/credentials/password", proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-allow-from-source-path",
        ubuntu(4),
        write("/credentials/password", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-allow-from-source-path",
        ubuntu(4),
        read("/secret.txt", proc=RW),
        "deny",
    ),
    (MU + "ksp-ubuntu-4-file-path-readonly-allow", ubuntu(4), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-4-file-path-readonly-allow", ubuntu(4), write("/credentials/password"), "deny"),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-block-from-source-path",
        ubuntu(4),
        read("/credentials/password", proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-block-from-source-path",
        ubuntu(4),
        write("/credentials/password", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-4-file-path-readonly-block-from-source-path",
        ubuntu(4),
        read("/secret.txt", proc=RW),
        "pass",
    ),
    (MU + "ksp-ubuntu-4-file-path-readonly-block", ubuntu(4), read("/credentials/password"), "pass"),
    (MU + "ksp-ubuntu-4-file-path-readonly-block", ubuntu(4), write("/credentials/password"), "deny"),
    (MU + "ksp-ubuntu-5-file-dir-recursive-block", ubuntu(5), read("/credentials/password"), "deny"),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-allow",
        ubuntu(5),
        read("/home/user1/dir1/key1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-allow",
        ubuntu(5),
        read("/home/user1/dir1/key1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-allow",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-allow",
        ubuntu(5),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-block",
        ubuntu(5),
        read("/home/user1/dir1/key1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-block",
        ubuntu(5),
        read("/home/user1/dir1/key1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-block",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-owner-block",
        ubuntu(5),
        write("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-readonly-allow",
        ubuntu(5),
        read("/credentials/keys/priv.key"),
        "pass",
    ),
    (MU + "ksp-ubuntu-5-file-dir-recursive-readonly-allow", ubuntu(5), read("/credentials/password"), "pass"),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-readonly-allow",
        ubuntu(5),
        write("/credentials/keys/priv.key"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-readonly-allow",
        ubuntu(5),
        write("/credentials/password"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-readonly-block",
        ubuntu(5),
        read("/credentials/keys/priv.key"),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-dir-recursive-readonly-block",
        ubuntu(5),
        write("/credentials/password"),
        "deny",
    ),
    # Its comment also lets the owner write through /readwrite; the kernel's readOnly check
    # refuses that (rule O1) and ksp-ubuntu-2-file-dir-owner-readonly-allow agrees, so not listed.
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow-from-source-path",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow-from-source-path",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow-from-source-path",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", USER1, proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow",
        ubuntu(5),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-allow",
        ubuntu(5),
        read("/home/user1/otherfile.txt", USER1),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block-from-source-path",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", USER1, proc=RW),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block-from-source-path",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", USER1, proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block-from-source-path",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block-from-source-path",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block",
        ubuntu(5),
        read("/home/user1/secret_data1.txt", USER1),
        "pass",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block",
        ubuntu(5),
        write("/home/user1/secret_data1.txt", USER1, proc=RW),
        "deny",
    ),
    (
        MU + "ksp-ubuntu-5-file-path-owner-readonly-block",
        ubuntu(5),
        read("/home/user1/secret_data1.txt"),
        "deny",
    ),
    (MU + "ksp-ubuntu-5-net-icmp-audit", ubuntu(5), sock(RAW_ICMP, "/bin/ping"), "audit"),
    (CS + "csp-in-operator-block-process", NGINX1, run("/usr/bin/apt", parent="/bin/dash"), "deny"),
    (CS + "csp-in-operator-block-process", NGINX2, run("/usr/bin/apt", parent="/bin/dash"), "pass"),
    (CS + "csp-not-in-operator-block-process", NGINX2, run("/usr/bin/apt", parent="/bin/dash"), "deny"),
    (CS + "csp-not-in-operator-block-process", NGINX1, run("/usr/bin/apt", parent="/bin/dash"), "pass"),
    (CS + "csp-in-operator-block-file-access", NGINX2, read("/etc/host.conf", proc="/usr/bin/cat"), "deny"),
    (
        CS + "csp-not-in-operator-block-file-access",
        NGINX2,
        read("/etc/host.conf", proc="/usr/bin/cat"),
        "pass",
    ),
    (
        CS + "csp-not-in-operator-block-file-access",
        NGINX1,
        read("/etc/host.conf", proc="/usr/bin/cat"),
        "deny",
    ),
    (CS + "csp-matchlabels-in-block-process", NGINX1, run("/usr/bin/apt"), "deny"),
    (CS + "csp-matchlabels-in-block-process", NGINX2, run("/usr/bin/apt"), "pass"),
    (CS + "csp-matchlabels-not-in-block-process", NGINX1, run("/usr/bin/apt"), "pass"),
    (
        HS + "hsp-k8s-kubearmor-dev-file-dir-allow-fromSource",
        DEV_HOST,
        read("/etc/default/useradd", proc="/usr/bin/head"),
        "pass",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-dir-allow-fromSource",
        DEV_HOST,
        read("/etc/hostname", proc="/usr/bin/head"),
        "deny",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-dir-block-fromSource",
        DEV_HOST,
        read("/etc/default/useradd", proc="/usr/bin/head"),
        "deny",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-dir-block-fromSource",
        DEV_HOST,
        read("/etc/hostname", proc="/usr/bin/head"),
        "pass",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-path-allow-fromSource",
        DEV_HOST,
        read("/etc/hostname", proc="/usr/bin/head"),
        "pass",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-path-allow-fromSource",
        DEV_HOST,
        read("/etc/hosts", proc="/usr/bin/head"),
        "deny",
    ),
    (HS + "hsp-k8s-kubearmor-dev-file-path-audit", DEV_HOST, read("/etc/passwd"), "audit"),
    (
        HS + "hsp-k8s-kubearmor-dev-file-path-audit",
        DEV_HOST,
        read("/etc/passwd", proc="/usr/bin/head"),
        "audit",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-path-block-fromSource",
        DEV_HOST,
        read("/etc/hostname", proc="/usr/bin/head"),
        "deny",
    ),
    (
        HS + "hsp-k8s-kubearmor-dev-file-path-block-fromSource",
        DEV_HOST,
        read("/etc/hosts", proc="/usr/bin/head"),
        "pass",
    ),
    (HS + "hsp-k8s-kubearmor-dev-file-path-block", DEV_HOST, read("/etc/hostname"), "deny"),
    (HS + "hsp-k8s-kubearmor-dev-proc-path-allow-fromSource", DEV_HOST, run("/bin/date"), "pass"),
    (HS + "hsp-k8s-kubearmor-dev-proc-path-allow-fromSource", DEV_HOST, run("/usr/bin/ls"), "deny"),
    (HS + "hsp-k8s-kubearmor-dev-proc-path-block-fromSource", DEV_HOST, run("/bin/date"), "deny"),
    (HS + "hsp-k8s-kubearmor-dev-proc-path-block-fromSource", DEV_HOST, run("/usr/bin/ls"), "pass"),
    (HS + "hsp-k8s-kubearmor-dev-proc-path-block", DEV_HOST, run("/usr/bin/diff"), "deny"),
    (
        HS + "hsp-nonk8s-kubearmor-dev-file-dir-block-fromsource",
        Workload.node("any-host"),
        read("/etc/default/useradd", proc="/usr/bin/head"),
        "deny",
    ),
    (WP + "ksp-mysql-audit-dir", MYSQL, write("/var/lib/mysql/test", proc="/usr/bin/touch"), "audit"),
    (WP + "ksp-wordpress-block-config", WORDPRESS, read("/var/www/html/wp-config.php"), "deny"),
    (WP + "ksp-wordpress-block-process", WORDPRESS, run("/usr/bin/apt-get"), "deny"),
    (
        WP + "ksp-wordpress-block-sa",
        WORDPRESS,
        read("/run/secrets/kubernetes.io/serviceaccount/token"),
        "deny",
    ),
]

NOT_COVERED = {
    # Their comments describe the AppArmor-era audit of *permitted* owner/read accesses; the
    # current feeder audits what Block would block (docs/policy-semantics.md O1).
    MU + "ksp-group-2-file-path-owner-audit-from-source-path": "stale audit comment (O1)",
    MU + "ksp-ubuntu-1-file-pattern-owner-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-2-file-dir-owner-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-2-file-dir-recursive-owner-readonly-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-3-file-dir-readonly-audit-from-source-path": "stale audit comment (O1)",
    MU + "ksp-ubuntu-3-file-dir-readonly-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-3-file-path-owner-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-4-file-path-readonly-audit-from-source-path": "stale audit comment (O1)",
    MU + "ksp-ubuntu-4-file-path-readonly-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-5-file-dir-recursive-owner-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-5-file-dir-recursive-readonly-audit": "stale audit comment (O1)",
    MU + "ksp-ubuntu-5-file-path-owner-readonly-audit": "stale audit comment (O1)",
    MU + "nsp-group-1-file-dir-recursive-block": "raw AppArmor profile (spec.apparmor): not matched",
    "network-security-policies/nsp-egress-block-dns": "KubeArmorNetworkPolicy: not matched",
}


def _load(name: str) -> list[object]:
    from enforcer.policy.parse import load_policies

    return list(load_policies([EXAMPLES / f"{name}.yaml"]))


@pytest.mark.parametrize(
    ("name", "workload", "event", "expected"), CASES, ids=lambda x: getattr(x, "resource", None)
)
def test_example_outcome(
    examples_dir: Path, name: str, workload: Workload, event: Event, expected: str
) -> None:
    m = Matcher(_load(name), BLOCK_ALL)  # type: ignore[arg-type]
    v = m.decide(workload, event)
    got = "deny" if v.result == DENIED else "audit" if v.action is Action.AUDIT else "pass"
    assert got == expected, f"{name}: {event} -> {v}"
    assert (v.result == PASSED) is (expected != "deny")
    host_types = {LogType.MATCHED_HOST_POLICY, LogType.HOST_LOG}
    assert (v.type in host_types) is workload.host


def test_every_example_is_covered_or_explained(examples_dir: Path) -> None:
    covered = {name for name, *_ in CASES} | set(NOT_COVERED)
    present = {
        str(p.relative_to(examples_dir).with_suffix(""))
        for p in examples_dir.rglob("*.yaml")
        if p.parent.name not in ("crds", "workloads")
    }
    assert present - covered == set(), "examples without a matcher test"
    assert covered - present == set(), "tests naming missing examples"
