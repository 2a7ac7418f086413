"""Stream worker logic without I/O: decode, join, verdicts, Alert/Log JSON, throttling, late metadata."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from enforcer.control import ContainerRecord, ControlTopics, Owner, PolicyRecord, encode, encode_key
from enforcer.envelope import encode_batch
from enforcer.records import EXEC_DTYPE, FILE_DTYPE, FORK_DTYPE, NET_DTYPE, Flag, Kind, NetOp
from stream.alerts import AlertThrottle, SiemEncoder
from stream.join import AckToken, LateBuffer, MetadataState
from stream.worker import BatchProcessor, RawMessage

# Recent (the store keeps 30 days by TTL), on a whole second.
BOOT = (time.time_ns() // 10**9 - 3600) * 10**9
NODE = "node-a"
TOPICS = ControlTopics()


def hdr(recs: np.ndarray, kind: int, cgroup: int, pid: int, flags: int = 0, ret: int = 0) -> None:
    h = recs["hdr"]
    h["kind"] = kind
    h["version"] = 1
    h["size"] = recs.dtype.itemsize
    h["ktime_ns"] = 1_000_000_000 + np.arange(len(recs)) * 1000
    h["cgroup_id"] = cgroup
    h["host_pid"] = pid
    h["host_ppid"] = 1
    h["pid"] = pid % 1000
    h["ppid"] = 1
    h["uid"] = 1000
    h["ret"] = ret
    h["flags"] = flags
    h["comm"] = b"cat"


def exec_batch(cgroup: int, pid: int, path: bytes, args: list[bytes], n: int = 1, seq: int = 0,
               flags: int = 0, ret: int = 0) -> bytes:
    r = np.zeros(n, EXEC_DTYPE)
    hdr(r, Kind.EXEC, cgroup, pid, flags, ret)
    blob = b"\0".join(args) + b"\0"
    r["argc"] = len(args)
    r["args_len"] = len(blob)
    r["args"] = blob
    r["path"] = path
    r["cwd"] = b"/"
    r["parent_comm"] = b"bash"
    r["exe_uid"] = 0
    return encode_batch(Kind.EXEC, r.tobytes(), node=NODE, seq=seq, boot_wall_ns=BOOT)


def file_batch(cgroup: int, pid: int, paths: list[bytes], seq: int = 0, flags: int = 0, ret: int = 0,
               open_flags: int = 0) -> bytes:
    r = np.zeros(len(paths), FILE_DTYPE)
    hdr(r, Kind.FILE, cgroup, pid, flags, ret)
    r["path"] = paths
    r["open_flags"] = open_flags
    r["owner_uid"] = 0
    return encode_batch(Kind.FILE, r.tobytes(), node=NODE, seq=seq, boot_wall_ns=BOOT)


def mixed_file_batch(groups: list[tuple[int, int, bytes]], seq: int = 0) -> bytes:
    """One FILE batch with one record per (cgroup, pid, path)."""
    r = np.zeros(len(groups), FILE_DTYPE)
    hdr(r, Kind.FILE, 0, 0)
    r["hdr"]["cgroup_id"] = [g[0] for g in groups]
    r["hdr"]["host_pid"] = [g[1] for g in groups]
    r["hdr"]["pid"] = [g[1] % 1000 for g in groups]
    r["path"] = [g[2] for g in groups]
    return encode_batch(Kind.FILE, r.tobytes(), node=NODE, seq=seq, boot_wall_ns=BOOT)


def container(cid: str, pod: str, ns: str = "default",
              labels: dict[str, str] | None = None) -> ContainerRecord:
    return ContainerRecord(container_id=cid, runtime="containerd", namespace=ns, pod=pod, pod_uid="u-" + pod,
                           container="main", image="nginx:1.25", node=NODE, labels=labels or {"app": pod},
                           owner=Owner("Deployment", pod, ns))


def add_container(state: MetadataState, cgroup: int, rec: ContainerRecord) -> None:
    state.apply(TOPICS.containers, encode_key(rec.container_id), encode(rec))
    state.put_cgroup(NODE, cgroup, rec.container_id)


def test_exec_and_file_logs_carry_kubearmor_fields() -> None:
    p = BatchProcessor()
    add_container(p.state, 11, container("c1", "web"))
    out = p.process(exec_batch(11, 4242, b"/usr/bin/cat", [b"cat", b"/etc/passwd"]))
    out.extend(p.process(file_batch(11, 4242, [b"/etc/passwd", b"/etc/shadow"], ret=-13)))
    assert out.siem.alerts == [] and len(out.siem.logs) == 3
    keys = {k for k, _ in out.siem.logs}
    assert keys == {b"default/web"}
    ex, f1, f2 = (orjson.loads(v) for _, v in out.siem.logs)
    assert ex["Operation"] == "Process" and ex["Resource"] == "/usr/bin/cat /etc/passwd"
    assert ex["ProcessName"] == "/usr/bin/cat" and ex["ParentProcessName"] == "bash"
    assert ex["Data"] == "syscall=SYS_EXECVE" and ex["Cwd"] == "/"
    assert ex["Timestamp"] == (BOOT + 1_000_000_000) // 10**9
    assert ex["NamespaceName"] == "default" and ex["PodName"] == "web" and ex["Labels"] == "app=web"
    assert ex["ContainerID"] == "c1" and ex["ContainerImage"] == "nginx:1.25"
    assert ex["Owner"] == {"Ref": "Deployment", "Name": "web", "Namespace": "default"}
    assert ex["HostPID"] == 4242 and ex["PID"] == 242 and ex["UID"] == 1000
    assert ex["Type"] == "ContainerLog" and ex["Action"] == "Allow" and ex["Result"] == "Passed"
    # The file events know their process through the exec before them.
    assert f1["ProcessName"] == "/usr/bin/cat" and f1["Source"] == "/usr/bin/cat"
    assert f1["Resource"] == "/etc/passwd" and f1["Data"] == "syscall=SYS_OPENAT flags=O_RDONLY"
    assert f2["Result"] == "Permission denied"


def test_kernel_block_is_kept_as_alert() -> None:
    p = BatchProcessor()
    add_container(p.state, 11, container("c1", "web"))
    out = p.process(file_batch(11, 7, [b"/etc/shadow"], flags=Flag.BLOCKED, ret=-13))
    assert out.siem.logs == []
    (_, v), = out.siem.alerts
    a = orjson.loads(v)
    assert (a["Action"], a["Result"], a["Type"]) == ("Block", "Permission denied", "MatchedPolicy")
    assert a["Enforcer"] == "armorstream"  # no backend bit: the record does not say who decided


@pytest.mark.parametrize(("bit", "name"), [(Flag.ENF_FANOTIFY, "Fanotify"), (Flag.ENF_CGROUP, "CgroupBPF"),
                                           (Flag.ENF_BPFLSM, "BPFLSM")])
def test_kernel_block_names_its_backend(bit: Flag, name: str) -> None:
    p = BatchProcessor()
    add_container(p.state, 11, container("c1", "web"))
    out = p.process(file_batch(11, 7, [b"/etc/shadow", b"/etc/gshadow"], flags=Flag.BLOCKED | bit, ret=-13))
    assert [orjson.loads(v)["Enforcer"] for _, v in out.siem.alerts] == [name, name]


def test_join_per_unique_container_and_late_metadata() -> None:
    t = [0.0]
    p = BatchProcessor(late=LateBuffer(max_wait_s=5.0), clock=lambda: t[0])
    add_container(p.state, 1, container("c1", "a"))
    tok = AckToken("message")
    batch = mixed_file_batch([(1, 10, b"/a"), (2, 20, b"/b"), (1, 10, b"/c"), (3, 30, b"/d")])
    out = p.process(batch, token=tok)
    assert not tok.release()  # the message is not done while events wait
    assert [orjson.loads(v)["Resource"] for _, v in out.siem.logs] == ["/a", "/c"]
    assert p.late.events == 2 and out.groups == [] and len(tok.groups) == 1  # rows wait for the batch
    # Metadata for cgroup 2 arrives: its events go out complete.
    add_container(p.state, 2, container("c2", "b", ns="shop"))
    out = p.flush_late()
    assert [(k, orjson.loads(v)["Resource"]) for k, v in out.siem.logs] == [(b"shop/b", "/b")]
    assert "MetadataMissing" not in orjson.loads(out.siem.logs[0][1])
    assert [t.release() for t in out.released] == [False]
    # cgroup 3 never gets metadata: after the wait it goes out flagged, and the message is acked.
    t[0] = 6.0
    out = p.flush_late()
    (k, v), = out.siem.logs
    rec = orjson.loads(v)
    assert rec["Resource"] == "/d" and rec["MetadataMissing"] is True and "PodName" not in rec
    assert k == NODE.encode()
    assert [t.release() for t in out.released] == [True]
    assert p.late.events == 0 and p.missing_metadata == 1
    # The store gets the raw batch whole, once: every row with its final identity.
    rows = sorted((r, g.meta.pod if g.meta else None, g.missing)
                  for g in tok.groups for r in g.cols.resource)
    assert rows == [("/a", "a", False), ("/b", "b", False), ("/c", "a", False), ("/d", None, True)]


def test_late_buffer_memory_bound_releases_oldest() -> None:
    p = BatchProcessor(late=LateBuffer(max_wait_s=60, max_events=3))
    p.process(file_batch(5, 1, [b"/x", b"/y"], seq=0))
    p.process(file_batch(6, 2, [b"/z", b"/w"], seq=1))
    out = p.flush_late()
    assert [orjson.loads(v)["Resource"] for _, v in out.siem.logs] == ["/x", "/y"]
    assert p.late.events == 2 and p.late.overflowed == 2


def test_malformed_batch_is_a_dead_letter() -> None:
    p = BatchProcessor()
    good = file_batch(1, 1, [b"/a"])
    bad = good[:-3]
    out = p.process(bad, key=b"node-a", origin="raw/0/5")
    (d,) = out.dead
    assert d.value == bad and d.origin == "raw/0/5" and "truncated" in d.reason
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    assert "CRC" in p.process(bytes(flipped)).dead[0].reason


def test_network_and_fork() -> None:
    p = BatchProcessor()
    add_container(p.state, 1, container("c1", "a"))
    p.process(exec_batch(1, 100, b"/usr/bin/curl", [b"curl", b"x"]))
    f = np.zeros(1, FORK_DTYPE)
    hdr(f, Kind.FORK, 1, 100)
    f["child_host_pid"] = 101
    p.process(encode_batch(Kind.FORK, f.tobytes(), node=NODE, seq=1))
    r = np.zeros(2, NET_DTYPE)
    hdr(r, Kind.NET, 1, 101)
    r["op"] = [NetOp.SOCKET, NetOp.CONNECT]
    r["family"] = 2
    r["type"] = 1
    r["protocol"] = [0, 6]
    r["dport"] = 443
    r["fd"] = 3
    r["daddr"][1, :4] = [10, 0, 0, 7]
    out = p.process(encode_batch(Kind.NET, r.tobytes(), node=NODE, seq=2, boot_wall_ns=BOOT))
    s, c = (orjson.loads(v) for _, v in out.siem.logs)
    assert s["Resource"] == "domain=AF_INET type=SOCK_STREAM protocol=0" and s["Data"] == "syscall=SYS_SOCKET"
    assert c["Resource"] == "remoteip=10.0.0.7 port=443 protocol=TCP"
    assert c["Data"] == "syscall=SYS_CONNECT fd=3"
    assert c["ProcessName"] == "/usr/bin/curl"  # the forked child inherits its parent's binary


def test_throttle_like_kubearmor() -> None:
    t = AlertThrottle(max_per_sec=3, throttle_s=2)
    got = [t.admit("c", 100) for _ in range(5)]
    assert got == [(True, False)] * 3 + [(False, True), (False, False)]
    assert t.admit("c", 101) == (False, False)  # still inside throttleSec
    assert t.admit("other", 101) == (True, False)
    assert t.admit("c", 102) == (True, False)  # over
    assert t.dropped == 3


def test_throttled_alerts_emit_one_summary() -> None:
    p = BatchProcessor(encoder=SiemEncoder(throttle=AlertThrottle(max_per_sec=2, throttle_s=30)))
    add_container(p.state, 1, container("c1", "a"))
    out = p.process(file_batch(1, 1, [b"/s"] * 6, flags=Flag.BLOCKED, ret=-13))
    types = [orjson.loads(v)["Type"] for _, v in out.siem.alerts]
    assert types == ["MatchedPolicy", "MatchedPolicy", "SystemEvent"]
    assert p.encoder.throttle.dropped == 4
    assert len(out.groups[0].decisions) == 6  # storage still gets every event


def test_every_record_carries_its_event_id() -> None:
    """node/batch_seq/event_index: what the stream reads back after a crash, and what a SIEM can
    deduplicate on; a throttle summary has the id of the alert that tripped it plus /summary."""
    p = BatchProcessor(encoder=SiemEncoder(throttle=AlertThrottle(max_per_sec=2, throttle_s=30)))
    add_container(p.state, 1, container("c1", "a"))
    add_container(p.state, 2, container("c2", "b"))
    out = p.process(file_batch(1, 1, [b"/s"] * 3, seq=7, flags=Flag.BLOCKED, ret=-13))
    out.extend(p.process(file_batch(2, 1, [b"/x", b"/y"], seq=8)))
    assert [i for _, _, i in out.siem.alert_records] == [b"node-a/7/0", b"node-a/7/1", b"node-a/7/2/summary"]
    assert [(i, orjson.loads(v)["Resource"]) for _, v, i in out.siem.log_records] == [
        (b"node-a/8/0", "/x"), (b"node-a/8/1", "/y")]
    left, dropped = out.siem.without({b"node-a/7/1", b"node-a/8/0", b"node-a/9/0"})
    assert dropped == 2
    assert [i for _, _, i in left.alert_records] == [b"node-a/7/0", b"node-a/7/2/summary"]
    assert left.logs == [out.siem.logs[1]]


SHADOW_POLICY = {
    "apiVersion": "security.kubearmor.com/v1",
    "kind": "KubeArmorPolicy",
    "metadata": {"name": "ksp-web-audit-shadow", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "severity": 5,
        "tags": ["PCI"],
        "message": "shadow read",
        "file": {"matchPaths": [{"path": "/etc/shadow"}]},
        "action": "Audit",
    },
}


def test_policies_from_control_topics_give_alerts() -> None:
    p = BatchProcessor()
    rec = PolicyRecord(kind="KubeArmorPolicy", namespace="default", name="ksp-web-audit-shadow",
                       document=SHADOW_POLICY, source="test")
    p.state.apply(TOPICS.policies, encode_key(rec.key), encode(rec))
    p.verdicts.rebuild(p.state.view)
    add_container(p.state, 1, container("c1", "web"))
    add_container(p.state, 2, container("c2", "other"))
    batch = mixed_file_batch([(1, 10, b"/etc/shadow"), (1, 10, b"/etc/hosts"), (2, 20, b"/etc/shadow")])
    out = p.process(batch)
    (_, a), = out.siem.alerts
    alert = orjson.loads(a)
    assert (alert["PolicyName"], alert["Severity"], alert["Action"], alert["Type"]) == (
        "ksp-web-audit-shadow", "5", "Audit", "MatchedPolicy")
    assert alert["Tags"] == "PCI" and alert["ATags"] == ["PCI"] and alert["Message"] == "shadow read"
    assert alert["PodName"] == "web" and alert["Resource"] == "/etc/shadow"
    assert sorted(orjson.loads(v)["PodName"] for _, v in out.siem.logs) == ["other", "web"]


def test_groups_table_for_the_store() -> None:
    from stream.worker import groups_table

    p = BatchProcessor()
    add_container(p.state, 1, container("c1", "web"))
    out = p.process(mixed_file_batch([(1, 10, b"/a"), (2, 20, b"/b"), (1, 10, b"/c")], seq=7))
    out.extend(p.flush_late(all_=True))
    t = groups_table(out.groups, "prod").to_pylist()
    got = sorted((r["event_index"], r["Resource"], r["PodName"], r["metadata_late"], r["batch_seq"])
                 for r in t)
    assert got == [(0, "/a", "web", False, 7), (1, "/b", "", True, 7), (2, "/c", "web", False, 7)]
    assert {r["ClusterName"] for r in t} == {"prod"} and {r["Type"] for r in t} == {"ContainerLog"}
    assert t[0]["Timestamp"].timestamp() == (BOOT + 1_000_000_000) / 1e9


def test_cli_errors_are_messages_not_tracebacks() -> None:
    from click.testing import CliRunner

    from armorstream.cli import cli

    r = CliRunner().invoke(cli, ["stream", "--clickhouse", "bogus:x", "--no-create-topics"])
    assert r.exit_code == 1 and "expected chdb:DIR or an http(s):// URL" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["stream", "--partitions", "0"])
    assert r.exit_code == 2 and "--partitions" in r.output


def test_updated_time_column_matches_scalar_formatting() -> None:
    from stream.alerts import _iso, iso_arrow

    ts = np.array([1_764_072_000_123_456_789, 0, 1_700_000_000_000_001_000], dtype=np.int64)
    texts = [t.decode() + "Z" for t in iso_arrow(ts).to_pylist()]
    assert texts == [_iso(int(t)) for t in ts]
    assert texts[0] == "2025-11-25T12:00:00.123456Z"
    # seconds shared and out of order included
    many = np.concatenate([ts, np.random.default_rng(1).integers(0, 4 * 10**18, 5000), ts[::-1]])
    assert [t + b"Z" for t in iso_arrow(many).to_pylist()] == [_iso(int(t)).encode() for t in many]


def test_c_strings_decode_up_to_their_nul_whatever_follows() -> None:
    from stream.decode import ProcessTable, _strings

    raw = [b"/etc/passwd", b"", b"x" * 16, b"/bin/sh\0garbage", b"/bad\xff\xfeutf8", b"\xc3", b"\xa9tail",
           b"caf\xc3\xa9"]
    col = np.array(raw, dtype="S16")
    want = [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in raw]
    assert _strings(col) == want  # the slow path: one string has bytes after its NUL
    clean = np.array([r for r in raw if b"\0" not in r], dtype="S16")
    assert _strings(clean) == [w for r, w in zip(raw, want, strict=True) if b"\0" not in r]  # one decode
    assert _strings(np.array([], dtype="S16")) == []
    as_bytes = np.frombuffer(clean.tobytes(), np.uint8).reshape(len(clean), 16)  # declared uint8[16]
    assert _strings(as_bytes) == _strings(clean)

    procs = ProcessTable()
    procs.update([1, 2], ["/usr/bin/cat", ""])  # an empty path is not kept: the fallback wins
    assert procs.names([1, 2, 3], ["a", "b", "c"]) == ["/usr/bin/cat", "b", "c"]


def test_escape_scan_agrees_with_a_regex_on_slices_and_large_strings() -> None:
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from stream.alerts import _needs_escape

    rnd = random.Random(3)
    for _ in range(2000):
        vals = ["".join(rnd.choice("abc/._-é ") for _ in range(rnd.randint(0, 12)))
                for _ in range(rnd.randint(0, 6))]
        if vals and rnd.random() < 0.5:
            vals[rnd.randrange(len(vals))] += rnd.choice('"\\\n\t\x01\x1f')
        a = pa.array(vals, pa.string())
        for arr in (a, a.slice(1), a.slice(0, max(len(a) - 1, 0)), pa.array(vals, pa.large_string())):
            want = len(arr) > 0 and bool(pc.any(pc.match_substring_regex(arr, r'["\\\x00-\x1f]')).as_py())
            assert _needs_escape(arr) == want, vals


def test_siem_json_is_exact_for_awkward_strings_and_keeps_kubearmor_order() -> None:
    p = BatchProcessor()
    add_container(p.state, 1, container("c1", 'we"b'))
    paths = ['/a"b', "/c\\d", "/e\nf\tg", "/ünï", "/plain", "/\x01ctl"]
    out = p.process(exec_batch(1, 9, b'/bin/q"uote', [b"q", b"x\\y"]))
    out.extend(p.process(file_batch(1, 9, [x.encode() for x in paths], ret=-2, open_flags=0o101)))
    recs = [orjson.loads(v) for _, v in out.siem.logs]
    assert [r["Resource"] for r in recs] == ['/bin/q"uote x\\y', *paths]
    assert {r["PodName"] for r in recs} == {'we"b'} and {k for k, _ in out.siem.logs} == {b'default/we"b'}
    ex, f = recs[0], recs[1]
    assert ex["ProcessName"] == '/bin/q"uote' and ex["Cwd"] == "/" and "Cwd" not in f
    assert f["ProcessName"] == '/bin/q"uote' and f["Result"] == "No such file or directory"
    assert f["Data"] == "syscall=SYS_OPENAT flags=O_WRONLY|O_CREAT"
    assert list(f) == [
        "ClusterName", "HostName", "NamespaceName", "PodName", "Labels", "ContainerID", "ContainerName",
        "ContainerImage", "Owner", "Timestamp", "UpdatedTime", "HostPPID", "HostPID", "PPID", "PID", "UID",
        "ParentProcessName", "ProcessName", "Type", "Source", "Operation", "Resource", "Data", "Action",
        "Result"]
    assert (f["HostPID"], f["PID"], f["UID"], f["HostPPID"], f["PPID"]) == (9, 9, 1000, 1, 1)


def test_verdict_cache_decides_each_distinct_event_once_per_matcher() -> None:
    p = BatchProcessor()
    rec = PolicyRecord(kind="KubeArmorPolicy", namespace="default", name="ksp-web-audit-shadow",
                       document=SHADOW_POLICY, source="test")
    p.state.apply(TOPICS.policies, encode_key(rec.key), encode(rec))
    p.verdicts.rebuild(p.state.view)
    add_container(p.state, 1, container("c1", "web"))
    batch = file_batch(1, 10, [b"/etc/shadow", b"/etc/hosts"] * 50)
    first = p.process(batch)
    assert p.verdicts.misses == 2 and len(first.siem.alerts) == 10 + 1  # 10 per second, then a summary
    second = p.process(file_batch(1, 10, [b"/etc/hosts", b"/etc/shadow"], seq=1))
    assert p.verdicts.misses == 2  # answered from the cache
    assert [orjson.loads(v)["Resource"] for _, v in second.siem.logs] == ["/etc/hosts"]
    # A new matcher (policies changed) starts over; groups already coded keep their table.
    old = first.groups[0]
    p.verdicts.rebuild(p.state.view)
    p.process(batch)
    assert p.verdicts.misses == 4 and old.table is not p.verdicts.table
    assert {d.policy_name for d in old.decisions} == {"ksp-web-audit-shadow", ""}


def test_batches_the_store_already_holds_emit_nothing_but_still_teach_the_process_table() -> None:
    """A re-delivery after a crash: its Alerts and Logs went out before the store had it."""
    p = BatchProcessor()
    add_container(p.state, 11, container("c1", "web"))
    msgs = [RawMessage(exec_batch(11, 4242, b"/usr/bin/cat", [b"cat"], seq=1)),
            RawMessage(file_batch(11, 4242, [b"/etc/hosts"], seq=2)),
            RawMessage(file_batch(11, 4242, [b"/etc/passwd", b"/etc/group"], seq=3))]
    out = p.process_many(msgs, stored={(NODE, 1), (NODE, 2), ("other-node", 3)})
    assert [orjson.loads(v)["Resource"] for _, v in out.siem.logs] == ["/etc/passwd", "/etc/group"]
    assert {orjson.loads(v)["ProcessName"] for _, v in out.siem.logs} == {"/usr/bin/cat"}
    assert [len(g.cols) for g in out.groups] == [2]  # only batch 3 goes to the store
    assert p.counters()["redelivered_skipped"] == 2 and p.events_in == 4
