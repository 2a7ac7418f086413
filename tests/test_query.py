"""`armorstream query` against real chdb: known rows in through the store's sink, each report's
exact rows out, in each output format, embedded and through the HTTP endpoint of `up`."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from armorstream.query_cmd import query
from armorstream.upstate import UpState, clickhouse_path
from stream.chhttp import ChdbHttpServer
from stream.store import Sink, StoreConfig, open_store

pytestmark = pytest.mark.clickhouse

NOW = int(time.time())
_seq = iter(range(1_000_000))


def rec(ago_s: int, **kw: Any) -> dict[str, Any]:
    """One KubeArmor record `ago_s` seconds ago; each its own raw batch (unique identity)."""
    base: dict[str, Any] = {
        "timestamp_ns": (NOW - ago_s) * 1_000_000_000, "ClusterName": "default", "HostName": "node-a",
        "NamespaceName": "shop", "PodName": "web-1", "ContainerName": "web", "Owner": {"Name": "web"},
        "HostPID": 0, "HostPPID": 0, "UID": 0, "ProcessName": "/bin/sh", "ParentProcessName": "",
        "Type": "ContainerLog", "Operation": "Process", "Resource": "", "Action": "Allow",
        "Result": "Passed", "node": "node-a", "event_index": 0,
    }  # fmt: skip
    return {**base, **kw, "batch_seq": next(_seq)}


def alert(ago_s: int, policy: str, severity: str, action: str, **kw: Any) -> dict[str, Any]:
    return rec(ago_s, Type="MatchedPolicy", PolicyName=policy, Severity=severity, Action=action,
               Result="Permission denied" if action == "Block" else "Passed", **kw)


ROWS = [
    # a process chain in shop/web-1: bash (parent 50 left no event) -> sh -> apt, apt blocked
    rec(600, HostPID=100, HostPPID=50, ProcessName="/bin/bash", ParentProcessName="containerd-shim",
        Source="/bin/bash"),
    rec(500, HostPID=200, HostPPID=100, ProcessName="/bin/sh", ParentProcessName="/bin/bash",
        Source="/bin/sh -c apt update"),
    rec(3 * 86400, HostPID=100, HostPPID=1, ProcessName="/usr/bin/old", Source="old"),  # pid reuse, long ago
    rec(400, HostPID=100, HostPPID=1, ProcessName="/sbin/init", HostName="node-b", NamespaceName="",
        PodName="", ContainerName="", Type="HostLog"),  # same pid, other host
    alert(300, "block-apt", "5", "Block", HostPID=300, HostPPID=200, ProcessName="/usr/bin/apt",
          ParentProcessName="/bin/sh", Resource="/usr/bin/apt update"),
    alert(290, "block-apt", "5", "Block", HostPID=301, HostPPID=200, ProcessName="/usr/bin/apt",
          Resource="/usr/bin/apt update", PodName="web-2"),
    alert(280, "audit-shadow", "3", "Audit", Operation="File", ProcessName="/bin/cat", Resource="/etc/shadow",
          UID=1000),
    alert(270, "audit-shadow", "3", "Audit", Operation="File", ProcessName="/bin/cat", Resource="/etc/shadow",
          NamespaceName="billing", PodName="api-1"),
    alert(260, "block-raw", "8", "Block", Operation="Network", ProcessName="/bin/ping",
          Resource="domain=AF_INET type=SOCK_RAW protocol=1", NamespaceName="billing", PodName="api-1"),
    alert(2 * 86400, "block-apt", "5", "Block", ProcessName="/usr/bin/apt", Resource="/usr/bin/apt install",
          NamespaceName="old"),  # outside a 1d window
    rec(250, Operation="File", ProcessName="/bin/cat", Resource="/etc/passwd", UID=1000),
    rec(240, Operation="Network", ProcessName="/usr/bin/curl",
        Resource="remoteip=10.0.0.7 port=443 protocol=TCP"),
    rec(230, Operation="Network", ProcessName="/usr/bin/curl",
        Resource="remoteip=10.0.0.7 port=443 protocol=TCP", Action="Block", Result="Permission denied"),
    rec(220, Operation="Network", ProcessName="/usr/bin/dig",
        Resource="remoteip=1.1.1.1 port=53 protocol=UDP"),
    rec(210, Operation="Network", ProcessName="/usr/bin/curl",
        Resource="remoteip=9.9.9.9 port=80 protocol=TCP", PodName="web-2"),
    rec(200, Operation="Network", ProcessName="/usr/bin/curl",
        Resource="localip=0.0.0.0 port=8080 protocol=TCP"),
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("query")
    store = open_store(StoreConfig(path=clickhouse_path(root)))
    try:
        result = Sink(store).insert_rows(ROWS)
        assert result.rows == len(ROWS)
        yield root  # the store stays open (and locked) in this process, as a writer would hold it
    finally:
        store.close()


def cli(data_dir: Path, *args: str) -> str:
    r = CliRunner().invoke(query, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def jsonl(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in cli(data_dir, *args, "--json").splitlines()]


def pick(rows: list[dict[str, Any]], *keys: str) -> list[tuple[Any, ...]]:
    return [tuple(r[k] for k in keys) for r in rows]


def iso(ago_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - ago_s))


def test_alerts_by_namespace_policy_severity(data_dir: Path) -> None:
    rows = jsonl(data_dir, "alerts", "--since", "1d")
    assert pick(rows, "NamespaceName", "PolicyName", "Severity", "alerts", "blocked") == [
        ("shop", "block-apt", "5", 2, 2),
        ("billing", "audit-shadow", "3", 1, 0),
        ("billing", "block-raw", "8", 1, 1),
        ("shop", "audit-shadow", "3", 1, 0),
    ]
    assert (rows[0]["first_seen"], rows[0]["last_seen"]) == (iso(300), iso(290))
    # the window: the 2-day-old block appears with a wider one
    wide = jsonl(data_dir, "alerts", "--since", "3d", "--by", "policy")
    assert pick(wide, "PolicyName", "alerts") == [("block-apt", 3), ("audit-shadow", 2), ("block-raw", 1)]
    assert pick(jsonl(data_dir, "alerts", "--since", "all", "--by", "severity"), "Severity", "alerts") == [
        ("5", 3), ("3", 2), ("8", 1)
    ]


def test_recent_and_blocked(data_dir: Path) -> None:
    recent = jsonl(data_dir, "recent", "--since", "1d", "--limit", "2")
    assert pick(recent, "PolicyName", "PodName", "Timestamp") == [
        ("block-raw", "api-1", iso(260)), ("audit-shadow", "api-1", iso(270))
    ]
    assert isinstance(recent[0]["event_id"], int)
    blocked = jsonl(data_dir, "blocked", "--since", "1d")
    assert pick(blocked, "Operation", "ProcessName", "Resource", "PolicyName", "attempts", "workloads") == [
        ("Process", "/usr/bin/apt", "/usr/bin/apt update", "block-apt", 2, 2),
        ("Network", "/bin/ping", "domain=AF_INET type=SOCK_RAW protocol=1", "block-raw", 1, 1),
    ]


def test_pod_timeline(data_dir: Path) -> None:
    rows = jsonl(data_dir, "timeline", "shop/web-1", "--since", "1d")
    assert pick(rows, "Operation", "ProcessName", "Action") == [
        ("Process", "/bin/bash", "Allow"),
        ("Process", "/bin/sh", "Allow"),
        ("Process", "/usr/bin/apt", "Block"),
        ("File", "/bin/cat", "Audit"),
        ("File", "/bin/cat", "Allow"),
        ("Network", "/usr/bin/curl", "Allow"),
        ("Network", "/usr/bin/curl", "Block"),
        ("Network", "/usr/bin/dig", "Allow"),
        ("Network", "/usr/bin/curl", "Allow"),
    ]
    alerts = jsonl(data_dir, "timeline", "web-1", "-n", "shop", "--alerts-only", "--since", "1d")
    assert pick(alerts, "PolicyName", "Timestamp") == [("block-apt", iso(300)), ("audit-shadow", iso(280))]


def test_process_tree(data_dir: Path) -> None:
    apt = next(r for r in jsonl(data_dir, "recent", "--since", "1d") if r["PodName"] == "web-1"
               and r["PolicyName"] == "block-apt")
    chain = jsonl(data_dir, "tree", str(apt["event_id"]))
    assert pick(chain, "depth", "HostPID", "ProcessName", "seen") == [
        (0, 50, "containerd-shim", "inferred"),
        (1, 100, "/bin/bash", "exec"),
        (2, 200, "/bin/sh", "exec"),
        (3, 300, "/usr/bin/apt", "start"),
    ]
    assert chain[2]["Source"] == "/bin/sh -c apt update"
    text = cli(data_dir, "tree", str(apt["event_id"]))
    assert "process tree of event" in text and "shop/web-1" in text
    assert text.index("containerd-shim") < text.index("/bin/bash") < text.index("/usr/bin/apt")
    r = CliRunner().invoke(query, ["tree", "12345", "--data-dir", str(data_dir)])
    assert r.exit_code == 1 and "no event with event_id 12345" in r.output


def test_file_access(data_dir: Path) -> None:
    shadow = jsonl(data_dir, "file", "/etc/shadow", "--since", "1d")
    assert pick(shadow, "NamespaceName", "PodName", "ProcessName", "UID", "Action", "times") == [
        ("billing", "api-1", "/bin/cat", 0, "Audit", 1),
        ("shop", "web-1", "/bin/cat", 1000, "Audit", 1),
    ]
    etc = jsonl(data_dir, "file", "/etc/*", "--since", "1d")
    assert pick(etc, "Resource", "PodName") == [
        ("/etc/passwd", "web-1"), ("/etc/shadow", "api-1"), ("/etc/shadow", "web-1")
    ]
    assert jsonl(data_dir, "file", "/etc/sha_ow", "--since", "1d") == []  # _ is not a wildcard


def test_network_destinations(data_dir: Path) -> None:
    rows = jsonl(data_dir, "network", "-n", "shop", "--pod", "web-1", "--since", "1d")
    assert pick(rows, "remote_ip", "port", "protocol", "ProcessName", "connections", "blocked") == [
        ("10.0.0.7", 443, "TCP", "/usr/bin/curl", 2, 1),
        ("1.1.1.1", 53, "UDP", "/usr/bin/dig", 1, 0),
    ]
    owner = jsonl(data_dir, "network", "--owner", "web", "--since", "1d")
    assert sorted(r["remote_ip"] for r in owner) == ["1.1.1.1", "10.0.0.7", "9.9.9.9"]
    r = CliRunner().invoke(query, ["network", "--data-dir", str(data_dir)])
    assert r.exit_code == 1 and "name the workload" in r.output


def test_sql_and_formats(data_dir: Path) -> None:
    sql = "SELECT PolicyName, count() AS n FROM alerts WHERE Timestamp >= now() - {since:UInt64} " \
          "GROUP BY PolicyName ORDER BY PolicyName"
    assert cli(data_dir, "sql", sql, "--since", "1d", "--csv") == (
        "PolicyName,n\naudit-shadow,2\nblock-apt,2\nblock-raw,1\n"
    )
    assert jsonl(data_dir, "sql", sql, "--since", "1d") == [
        {"PolicyName": "audit-shadow", "n": 2},
        {"PolicyName": "block-apt", "n": 2},
        {"PolicyName": "block-raw", "n": 1},
    ]
    table = cli(data_dir, "sql", sql, "--since", "1d")
    assert "PolicyName" in table and "audit-shadow" in table and "3 row(s)" in table
    rows = list(csv.reader(io.StringIO(cli(data_dir, "file", "/etc/shadow", "--csv", "--since", "1d"))))
    assert rows[0][:3] == ["Resource", "NamespaceName", "PodName"] and len(rows) == 3
    bad = CliRunner().invoke(query, ["sql", "SELECT nope FROM alerts", "--data-dir", str(data_dir)])
    assert bad.exit_code == 1 and "query failed" in bad.output and "Traceback" not in bad.output
    both = CliRunner().invoke(query, ["alerts", "--json", "--csv", "--data-dir", str(data_dir)])
    assert both.exit_code == 2
    since = CliRunner().invoke(query, ["alerts", "--since", "2x", "--data-dir", str(data_dir)])
    assert since.exit_code == 1 and "expected a number and a unit" in since.output


def test_through_the_running_endpoint(data_dir: Path, tmp_path: Path) -> None:
    """With an `up` state file naming the HTTP endpoint, query goes there and gets the same rows."""
    server = ChdbHttpServer(clickhouse_path(data_dir), port=0).start()
    try:
        url = f"{server.url}/armorstream"
        UpState(pid=os.getpid(), data_dir=str(tmp_path), clickhouse_url=url).save(tmp_path)
        for args in (["alerts", "--since", "1d"], ["file", "/etc/*", "--since", "1d"],
                     ["network", "--owner", "web", "--since", "1d"]):
            assert jsonl(tmp_path, *args) == jsonl(data_dir, *args)
    finally:
        server.stop()


def test_locked_store_is_a_clear_error(data_dir: Path) -> None:
    """The fixture holds the embedded store: another process gets a message, not a traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "armorstream.cli", "query", "alerts", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CLICKHOUSE_URL": ""},
    )
    assert out.returncode == 1
    assert "is in use by pid" in out.stderr and "--clickhouse-url" in out.stderr
    assert "Traceback" not in out.stderr
