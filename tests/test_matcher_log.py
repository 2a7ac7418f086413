"""KubeArmor Log records -> the matcher's Workload and Event (enforcer.karmor_log)."""

from __future__ import annotations

import pytest

from enforcer.karmor_log import LogRecordError, event_from_log, parse_labels, workload_from_log
from enforcer.policy.model import Operation
from enforcer.workload import DefaultPosture, Posture, Workload


def test_labels() -> None:
    assert parse_labels("app=web, tier=db,,bare") == {"app": "web", "tier": "db", "bare": ""}
    assert parse_labels("") == {}


def test_container_and_host_workloads() -> None:
    c = workload_from_log(
        {
            "NamespaceName": "ns",
            "PodName": "p-1",
            "Labels": "b=2,a=1",
            "ContainerID": "x",
            "ContainerName": "c",
        }
    )
    assert c == Workload.container("ns", {"a": "1", "b": "2"}, "c")
    assert c.labels == (("a", "1"), ("b", "2")) and c.pod_name == "p-1" and not c.host
    h = workload_from_log({"HostName": "node-1", "NodeLabels": "role=worker", "NamespaceName": ""})
    assert h.host and h.label_map == {"kubernetes.io/hostname": "node-1", "role": "worker"}


def test_file_event_write_flags_and_owner() -> None:
    base = {"Operation": "File", "Resource": "/etc/x extra", "ProcessName": "/bin/cat", "UID": 1000}
    ev = event_from_log({**base, "Data": "syscall=SYS_OPENAT flags=O_RDONLY", "OwnerUID": "1000"})
    assert (ev.resource, ev.write, ev.owner_uid, ev.is_owner) == ("/etc/x", False, 1000, True)
    for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"):
        assert event_from_log({**base, "Data": f"flags=O_CLOEXEC|{flag}"}).write
    assert not event_from_log({**base, "Data": "flags=O_WRONLY", "Write": False}).write
    assert not event_from_log(base).is_owner  # owner unknown


def test_process_event_uses_process_name_and_source_first_word() -> None:
    ev = event_from_log(
        {
            "Operation": "Process",
            "Resource": "/bin/sleep 1",
            "ProcessName": "/usr/bin/sleep",
            "ParentProcessName": "/bin/bash",
            "Source": "/bin/bash -c sleep 1",
        }
    )
    assert (ev.operation, ev.resource, ev.parent, ev.source) == (
        Operation.PROCESS,
        "/usr/bin/sleep",
        "/bin/bash",
        "/bin/bash",
    )
    assert event_from_log({"Operation": "Process", "Resource": "/bin/ls -l"}).resource == "/bin/ls"


def test_network_and_syscall_events() -> None:
    res = "domain=AF_INET type=SOCK_STREAM protocol=TCP"
    assert event_from_log({"Operation": "Network", "Resource": res}).resource == res
    ev = event_from_log({"Operation": "Syscall", "Resource": "/tmp/a", "Data": "syscall=SYS_UNLINKAT flags="})
    assert (ev.syscall, ev.resource) == ("UNLINKAT", "/tmp/a")


@pytest.mark.parametrize(
    ("rec", "field"),
    [
        ({"Operation": "Nope"}, "Operation"),
        ({"Operation": "File", "UID": "x"}, "UID"),
        ({"Operation": "File", "UID": True}, "UID"),
        ({"Operation": "File", "OwnerUID": 1.5}, "OwnerUID"),
        ({"Operation": "File", "Write": "yes"}, "Write"),
        ({"Operation": "File", "Resource": 3}, "Resource"),
    ],
)
def test_bad_fields_name_the_field(rec: dict[str, object], field: str) -> None:
    with pytest.raises(LogRecordError, match=field):
        event_from_log(rec)


def test_events_hash_and_compare_by_value() -> None:
    a = event_from_log({"Operation": "File", "Resource": "/a", "UID": 1})
    b = event_from_log({"Operation": "File", "Resource": "/a", "UID": 1})
    c = event_from_log({"Operation": "File", "Resource": "/a", "UID": 2})
    assert a == b and hash(a) == hash(b) and a != c


def test_namespace_annotations() -> None:
    g = DefaultPosture()
    assert g == DefaultPosture(Posture.AUDIT, Posture.AUDIT, Posture.AUDIT)  # KubeArmor's default
    p = g.with_annotations({"kubearmor-network-posture": " Block ", "kubearmor-file-posture": "deny"})
    assert p == DefaultPosture(Posture.AUDIT, Posture.BLOCK, Posture.AUDIT)
