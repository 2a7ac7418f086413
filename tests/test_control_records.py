"""enforcer.control record formats: round trips, malformed values, and fuzzing (only ControlError escapes)."""

from __future__ import annotations

import contextlib
import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.control import (
    BindingRecord,
    CgroupRecord,
    ContainerRecord,
    ControlError,
    ControlTopics,
    ControlView,
    NamespaceRecord,
    NodeRecord,
    Owner,
    PolicyRecord,
    SnapshotMarker,
    cgroup_key,
    decode,
    decode_key,
    encode,
    encode_key,
    parse_cgroup_key,
)
from stream.join import MetadataState

RECORDS = [
    ContainerRecord("c1", "containerd", "shop", "web-1", "u1", "main", "nginx:1.25", "node-a",
                    {"app": "web"}, Owner("Deployment", "web", "shop")),
    ContainerRecord("c2", "cri-o", "shop", "job-1", "u2", "main", "busybox", "node-b"),
    NamespaceRecord("shop", {"team": "a"}, file_posture="block", visibility="process,file"),
    NodeRecord("node-a", {"kubernetes.io/hostname": "node-a"}),
    PolicyRecord("KubeArmorPolicy", "shop", "p1", {"spec": {"action": "Block"}}, "kubernetes", "uid", "7"),
    PolicyRecord("KubeArmorClusterPolicy", None, "cp", {"spec": {}}, "/etc/p.yaml"),
    BindingRecord("c1", ("KubeArmorPolicy/shop/p1",)),
    CgroupRecord("node-a", 4242, "c1", pod_uid="u1", runtime="containerd", path="/kubepods/pod-u1/c1"),
    CgroupRecord("node-b", 7, "c2"),
    SnapshotMarker("s1", "end", 3),
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(rec: object) -> None:
    value = encode(rec)  # type: ignore[arg-type]
    assert value is not None and decode(value) == rec
    assert encode(None) is None and decode(None) is None  # tombstones


def test_cgroup_record_wire_format_and_key() -> None:
    rec = CgroupRecord("node-a", 4242, "c1", pod_uid="u1", runtime="containerd")
    assert rec.key == cgroup_key("node-a", 4242) == "node-a/4242"
    assert parse_cgroup_key(rec.key) == ("node-a", 4242)
    assert orjson.loads(encode(rec) or b"") == {
        "v": 1, "type": "cgroup", "node": "node-a", "cgroup_id": 4242, "container_id": "c1",
        "pod_uid": "u1", "runtime": "containerd", "path": "",
    }
    assert ControlTopics("x.").cgroups == "x.control.cgroups"
    assert "x.control.cgroups" not in ControlTopics("x.").all()  # the sensors publish it, not the controller


CGROUP = {"v": 1, "type": "cgroup", "node": "n", "cgroup_id": 1, "container_id": "c", "pod_uid": "",
          "runtime": "", "path": ""}


@pytest.mark.parametrize(("value", "why"), [
    (b"{", "not JSON"),
    (b"[1]", "not a JSON object"),
    (orjson.dumps({**CGROUP, "v": 2}), "version 2"),
    (orjson.dumps({**CGROUP, "type": "pod"}), "unknown control record type"),
    (orjson.dumps({k: v for k, v in CGROUP.items() if k != "container_id"}), "lacks field 'container_id'"),
    (orjson.dumps({**CGROUP, "cgroup_id": "1"}), "cgroup_id must be a non-negative integer"),
    (orjson.dumps({**CGROUP, "cgroup_id": -1}), "cgroup_id must be a non-negative integer"),
    (orjson.dumps({**CGROUP, "cgroup_id": True}), "cgroup_id must be a non-negative integer"),
    (orjson.dumps({**CGROUP, "node": None}), "node must be a string"),
    (orjson.dumps({"v": 1, "type": "binding", "target": "c", "policies": "abc"}), "list of strings"),
    (orjson.dumps({"v": 1, "type": "node", "name": "n", "labels": {"a": 1}}), "map strings to strings"),
    (orjson.dumps({"v": 1, "type": "snapshot", "snapshot": "s", "phase": "middle", "count": 0}), "phase"),
    (orjson.dumps({**orjson.loads(encode(RECORDS[0]) or b""), "owner": "Deployment"}), "owner must be"),
])
def test_malformed_values_are_control_errors(value: bytes, why: str) -> None:
    with pytest.raises(ControlError, match=why):
        decode(value)


def test_malformed_keys_and_misplaced_records() -> None:
    with pytest.raises(ControlError):
        decode_key(None)
    with pytest.raises(ControlError):
        decode_key(b"\xff\xfe")
    for bad in ("node-a", "node-a/", "/12", "node-a/x1"):
        with pytest.raises(ControlError):
            parse_cgroup_key(bad)
    view = ControlView()
    with pytest.raises(ControlError, match="misplaced"):
        view.apply(view.topics.containers, b"n/1", encode(CgroupRecord("n", 1, "c")))
    with pytest.raises(ControlError, match="misplaced"):
        view.apply(view.topics.nodes, b"c1", encode(RECORDS[0]))
    assert view.containers == {} and view.nodes == {}


def test_stream_cgroup_index_from_the_topic() -> None:
    state = MetadataState()
    rec = CgroupRecord("node-a", 5, "c1", pod_uid="u1", runtime="containerd")
    state.apply(state.cgroups_topic, encode_key(rec.key), encode(rec))
    assert state.cgroups == {("node-a", 5): "c1"}
    with pytest.raises(ControlError, match="does not hold"):  # a record under another cgroup's key
        state.apply(state.cgroups_topic, b"node-a/6", encode(rec))
    state.apply(state.cgroups_topic, encode_key(rec.key), None)
    assert state.cgroups == {}


# Fuzzing: arbitrary bytes, arbitrary JSON, and valid records with one field replaced.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
valid = [orjson.loads(encode(r) or b"") for r in RECORDS]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = dict(draw(st.sampled_from(valid)))
    field = draw(st.sampled_from(sorted(body)))
    if draw(st.booleans()):
        body[field] = draw(json_values)
    else:
        del body[field]
    return json.dumps(body).encode()  # the stdlib writes integers beyond 64 bits too


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode()), mutated()))
def test_fuzz_decode_raises_only_control_errors(value: bytes) -> None:
    try:
        rec = decode(value)
    except ControlError:
        return
    # Whatever decodes is a well-typed record that encodes back to itself.
    assert decode(encode(rec)) == rec


@FUZZ
@given(st.sampled_from(["containers", "namespaces", "nodes", "policies", "bindings", "cgroups", "bogus"]),
       st.one_of(st.none(), st.binary(max_size=16), st.sampled_from([b"node-a/5", b"c1", b"!snapshot"])),
       st.one_of(st.none(), mutated(), st.sampled_from([encode(r) for r in RECORDS])))
def test_fuzz_stream_metadata_state_raises_only_control_errors(table: str, key: bytes | None,
                                                               value: bytes | None) -> None:
    state = MetadataState()
    with contextlib.suppress(ControlError):
        state.apply(f"armorstream.control.{table}", key, value)
    for c in state.view.containers.values():  # what was accepted has the right type for its table
        assert isinstance(c, ContainerRecord)
    assert all(isinstance(k, tuple) and isinstance(v, str) for k, v in state.cgroups.items())
