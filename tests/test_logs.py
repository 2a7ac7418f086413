"""`armorstream logs` against a real tansu broker: known Alert/Log records on the SIEM topics,
karmor's filters and output formats checked exactly, follow mode included."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner
from conftest import need

from armorstream.embedded_broker import BrokerError, TansuBroker
from armorstream.logs_cmd import format_text, logs

pytestmark = pytest.mark.broker


def record(**kw: Any) -> dict[str, Any]:
    base = {
        "Timestamp": 1764086400, "UpdatedTime": "2025-11-25T16:00:00.000001Z", "ClusterName": "default",
        "HostName": "node-a", "NamespaceName": "shop", "Owner": {"Ref": "Deployment", "Name": "web",
        "Namespace": "shop"}, "PodName": "web-1", "Labels": "app=web", "ContainerID": "abc123",
        "ContainerName": "web", "ContainerImage": "nginx:1.25", "HostPPID": 10, "HostPID": 11, "PPID": 1,
        "PID": 7, "UID": 0, "ParentProcessName": "/bin/sh", "ProcessName": "/usr/bin/apt",
        "Type": "ContainerLog", "Source": "/bin/sh -c apt update", "Operation": "Process",
        "Resource": "/usr/bin/apt update", "Data": "syscall=SYS_EXECVE", "Action": "Allow",
        "Result": "Passed",
    }  # fmt: skip
    return {**base, **kw}


ALERTS = [
    record(Type="MatchedPolicy", PolicyName="block-apt", Severity="5", Action="Block",
           Result="Permission denied", Enforcer="fanotify", Tags="MITRE", ATags=["MITRE"]),
    record(Type="MatchedPolicy", PolicyName="audit-shadow", Severity="3", Action="Audit", Operation="File",
           ProcessName="/bin/cat", Resource="/etc/shadow", Source="/bin/cat /etc/shadow", PodName="web-2"),
    record(Type="MatchedPolicy", PolicyName="block-raw", Severity="8", Action="Block", Operation="Network",
           NamespaceName="billing", PodName="api-1", ContainerName="api", ProcessName="/bin/ping",
           Resource="domain=AF_INET type=SOCK_RAW protocol=1", Source="/bin/ping 1.1.1.1"),
]  # fmt: skip
LOGS = [
    record(),
    record(Operation="File", ProcessName="/bin/cat", Resource="/etc/hostname",
           Source="/bin/cat /etc/hostname"),
    record(Type="HostLog", NamespaceName="", PodName="", ContainerName="", ContainerID="", HostName="node-a",
           ProcessName="/usr/sbin/sshd", Resource="/usr/sbin/sshd -D", Source="/usr/lib/systemd/systemd"),
]  # fmt: skip


async def produce(bootstrap: str, topic: str, records: list[dict[str, Any]],
                  partition: int | None = 0) -> None:
    """Into one partition by default, so the order read back is the order sent.

    One record per batch: tansu's end offsets are wrong after multi-record batches."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await p.start()
    try:
        for r in records:
            await p.send_and_wait(topic, orjson.dumps(r), partition=partition)
    finally:
        await p.stop()


@pytest.fixture(scope="module")
def filled() -> Iterator[str]:
    """One broker for the module (the tests only read, or produce to a pod no other test reads)."""
    try:
        broker = TansuBroker().start()
    except BrokerError as e:
        need(False, str(e))
        raise
    try:
        asyncio.run(produce(broker.bootstrap, "alerts", ALERTS))
        asyncio.run(produce(broker.bootstrap, "logs", LOGS))
        yield broker.bootstrap
    finally:
        broker.stop()


def run(bootstrap: str, *args: str) -> str:
    r = CliRunner().invoke(logs, ["--broker", bootstrap, "--no-follow", *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def json_lines(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines()]


def test_log_filter_selects_topics(filled: str) -> None:
    assert json_lines(run(filled, "--json")) == ALERTS  # default: policy
    assert json_lines(run(filled, "--json", "--logFilter", "system")) == LOGS
    both = json_lines(run(filled, "--json", "--logFilter", "all"))
    assert sorted(map(orjson.dumps, both)) == sorted(map(orjson.dumps, ALERTS + LOGS))


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--namespace", "billing"], [ALERTS[2]]),
        (["--pod", "web-2"], [ALERTS[1]]),
        (["--container", "api"], [ALERTS[2]]),
        (["--operation", "File"], [ALERTS[1], LOGS[1]]),
        (["--resource", "/etc/"], [ALERTS[1], LOGS[1]]),
        (["--source", "systemd"], [LOGS[2]]),
        (["--namespace", "shop", "--operation", "Process"], [ALERTS[0], LOGS[0]]),
        (["--namespace", "nowhere"], []),
    ],
)
def test_filters(filled: str, args: list[str], want: list[dict[str, Any]]) -> None:
    got = json_lines(run(filled, "--json", "--logFilter", "all", *args))
    assert sorted(map(orjson.dumps, got)) == sorted(map(orjson.dumps, want))


def test_limit(filled: str) -> None:
    assert json_lines(run(filled, "--json", "--limit", "2")) == ALERTS[:2]


def test_text_format(filled: str) -> None:
    out = run(filled, "--pod", "web-1")
    assert out == format_text(ALERTS[0])
    assert out.splitlines()[:4] == [
        "== Alert / 2025-11-25T16:00:00.000001Z ==", "ClusterName: default", "HostName: node-a",
        "NamespaceName: shop",
    ]
    assert "PolicyName: block-apt\n" in out and "Result: Permission denied\n" in out
    assert "Owner: Ref=Deployment Namespace=shop Name=web\n" in out and "ATags: MITRE\n" in out
    host = run(filled, "--logFilter", "system", "--source", "systemd")
    assert host.startswith("== Log / ") and "PodName" not in host and "ProcessName: /usr/sbin/sshd\n" in host


def _start_follower(bootstrap: str, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "armorstream.cli", "logs", "--broker", bootstrap, "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert p.stderr is not None
    line = p.stderr.readline()  # "reading alerts from ..." once the start positions are set
    assert line.startswith("reading "), line + p.stderr.read()
    return p


def test_follow_sees_new_records_only(filled: str) -> None:
    # Its own topic: the module's other tests read "alerts" from the beginning.
    asyncio.run(produce(filled, "alerts-follow", [record(PodName="old")]))
    p = _start_follower(filled, "--limit", "2", "--alerts-topic", "alerts-follow")
    try:
        new = [record(PodName="web-9", Type="MatchedPolicy", PolicyName=f"p{i}", Action="Block")
               for i in range(2)]
        time.sleep(0.2)
        asyncio.run(produce(filled, "alerts-follow", new, partition=None))  # spread over the partitions
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert sorted(map(orjson.dumps, json_lines(out))) == sorted(map(orjson.dumps, new))


def test_follow_from_beginning_and_ctrl_c(filled: str) -> None:
    p = _start_follower(filled, "--from-beginning")
    try:
        assert p.stdout is not None
        got = [orjson.loads(p.stdout.readline()) for _ in ALERTS]
        p.send_signal(2)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert got == ALERTS
    assert p.returncode == 0 and "Traceback" not in err


def test_unreachable_broker_is_a_clear_error() -> None:
    from armorstream.embedded_broker import free_port

    r = CliRunner().invoke(logs, ["--broker", f"127.0.0.1:{free_port()}", "--no-follow"])
    assert r.exit_code == 1 and "cannot reach the broker" in r.output
