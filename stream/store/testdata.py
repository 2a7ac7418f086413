"""Deterministic synthetic KubeArmor Alert/Log records, for the store's tests and benchmark."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["synthetic_records"]

_POLICIES = ("ksp-block-shadow", "ksp-audit-curl", "ksp-net-raw", "DefaultPosture")
_OPS = ("Process", "File", "Network", "Capabilities")


def synthetic_records(
    n: int, *, node: str = "node-a", batch_size: int = 100, first_seq: int = 0, base_ns: int | None = None
) -> list[dict[str, Any]]:
    """`n` records in raw batches of `batch_size` (batch_seq from `first_seq`), one every
    second from `base_ns` (default: the start of the hour two hours ago), every third an alert.
    """
    if base_ns is None:
        base_ns = (int(time.time()) // 3600 - 2) * 3600 * 1_000_000_000
    out = []
    for i in range(n):
        alert = i % 3 == 0
        ns = f"ns-{i % 3}"
        pod = f"web-{i % 6}"
        op = _OPS[i % len(_OPS)]
        ts = base_ns + i * 1_000_000_000 + i % 1000
        out.append(
            {
                "timestamp_ns": ts,
                "UpdatedTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 10**9))
                + f".{ts % 10**9:09d}Z",
                "ClusterName": "default",
                "HostName": node,
                "NamespaceName": ns,
                "Owner": {"Ref": "Deployment", "Name": f"web-{i % 2}", "Namespace": ns},
                "PodName": pod,
                "Labels": f"app=web,tier={i % 2}",
                "ContainerID": f"{i % 6:064x}",
                "ContainerName": "web",
                "ContainerImage": "nginx:1.25",
                "HostPPID": 1000 + i % 7,
                "HostPID": 2000 + i,
                "PPID": 1,
                "PID": 10 + i % 50,
                "UID": i % 2 * 1000,
                "ParentProcessName": "/bin/sh",
                "ProcessName": "/usr/bin/curl" if op == "Network" else "/bin/cat",
                "PolicyName": _POLICIES[i % len(_POLICIES)] if alert else "",
                "Severity": str(1 + i % 10) if alert else "",
                "Tags": "NIST,MITRE" if alert else "",
                "ATags": ["NIST", "MITRE"] if alert else [],
                "Message": "blocked by policy" if alert else "",
                "Type": "MatchedPolicy" if alert else "ContainerLog",
                "Source": "/bin/sh -c cat",
                "Operation": op,
                "Resource": f"/etc/file-{i % 11}" if op != "Network" else "domain=AF_INET type=SOCK_RAW",
                "Data": "syscall=SYS_OPENAT flags=O_RDONLY",
                "Enforcer": "BPFLSM" if alert else "",
                "Action": ("Block", "Audit")[i % 2] if alert else "Allow",
                "Result": "Permission denied" if alert and i % 2 == 0 else "Passed",
                "Cwd": "/",
                "TTY": "pts0" if i % 5 == 0 else "",
                "node": node,
                "batch_seq": first_seq + i // batch_size,
                "event_index": i % batch_size,
                "metadata_late": i % 17 == 0,
            }
        )
    return out
