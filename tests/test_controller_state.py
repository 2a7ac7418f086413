"""ClusterState, sans I/O: which control records each cluster change produces."""

from __future__ import annotations

from typing import Any

from controller.state import Change, ClusterState, Sync
from enforcer.control import BindingRecord, ContainerRecord, NamespaceRecord, Owner, PolicyRecord
from tests.fakekube import make_namespace, make_node, make_pod

CSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorClusterPolicy",
    "metadata": {"name": "block-apt"},
    "spec": {"severity": 8, "selector": {"matchExpressions": [
        {"key": "namespace", "operator": "NotIn", "values": ["kube-system"]},
        {"key": "label", "operator": "In", "values": ["app=nginx"]}]},
        "process": {"matchPaths": [{"path": "/usr/bin/apt"}]}, "action": "Block"},
}
KSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorPolicy",
    "metadata": {"name": "audit-passwd", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "nginx"}},
             "file": {"matchPaths": [{"path": "/etc/passwd"}]}, "action": "Audit"},
}
HSP = {
    "apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorHostPolicy",
    "metadata": {"name": "host-shadow"},
    "spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "node-1"}},
             "file": {"matchPaths": [{"path": "/etc/shadow"}]}, "action": "Block"},
}


def ready_state(**lists: list[dict[str, Any]]) -> ClusterState:
    st = ClusterState()
    for r in st.resources:
        st.apply(Sync(r, lists.get(r, [])))
    assert st.ready
    st.snapshot()
    return st


def by_table(changes: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for table, key, rec in changes:
        assert key not in out.get(table, {}), f"{table}/{key} published twice in one update"
        out.setdefault(table, {})[key] = rec
    return out


def test_nothing_is_published_before_every_resource_is_listed() -> None:
    st = ClusterState()
    assert st.apply(Sync("pods", [make_pod("shop", "web")])).changes == []
    assert not st.ready


def test_pod_becomes_container_records_with_owner() -> None:
    st = ready_state(namespaces=[make_namespace("shop")])
    pod = make_pod("shop", "web-7d4b9-abcde", labels={"app": "nginx", "pod-template-hash": "7d4b9"},
                   containers=[("nginx", "nginx:1.27", "a" * 64), ("sidecar", "busybox", None)],
                   owner=("ReplicaSet", "web-7d4b9"))
    got = by_table(st.apply(Change("pods", "ADDED", pod)).changes)
    assert got == {"containers": {"a" * 64: ContainerRecord(
        container_id="a" * 64, runtime="containerd", namespace="shop", pod="web-7d4b9-abcde",
        pod_uid="", container="nginx", image="nginx:1.27", node="node-1",
        labels={"app": "nginx", "pod-template-hash": "7d4b9"}, owner=Owner("Deployment", "web", "shop"))}}

    # The sidecar starts: only its record is new; a restart replaces the id (tombstone + record).
    pod["status"]["containerStatuses"][1]["containerID"] = "containerd://" + "b" * 64
    assert set(by_table(st.apply(Change("pods", "MODIFIED", pod)).changes)["containers"]) == {"b" * 64}
    pod["status"]["containerStatuses"][0]["containerID"] = "containerd://" + "c" * 64
    got = by_table(st.apply(Change("pods", "MODIFIED", pod)).changes)["containers"]
    assert got["a" * 64] is None and got["c" * 64].container == "nginx"
    got = by_table(st.apply(Change("pods", "DELETED", pod)).changes)
    assert got == {"containers": {"b" * 64: None, "c" * 64: None}}


def test_cluster_policy_covers_pods_of_namespaces_created_later_kubearmor_2099() -> None:
    st = ready_state(kubearmorclusterpolicies=[CSP])
    assert "KubeArmorClusterPolicy/block-apt" in st.table("policies")
    assert st.table("bindings") == {}

    st.apply(Change("namespaces", "ADDED", make_namespace("brand-new")))
    got = by_table(st.apply(Change("pods", "ADDED", make_pod(
        "brand-new", "web", labels={"app": "nginx"}, containers=[("c", "nginx", "d" * 64)]))).changes)
    assert got["bindings"] == {"d" * 64: BindingRecord("d" * 64, ("KubeArmorClusterPolicy/block-apt",))}

    # Labels change so the label expression no longer holds: the binding goes away.
    pod = make_pod("brand-new", "web", labels={"app": "other"}, containers=[("c", "nginx", "d" * 64)])
    got = by_table(st.apply(Change("pods", "MODIFIED", pod)).changes)
    assert got["bindings"] == {"d" * 64: None}

    # A pod in the excluded namespace is never covered.
    st.apply(Change("namespaces", "ADDED", make_namespace("kube-system")))
    got = by_table(st.apply(Change("pods", "ADDED", make_pod(
        "kube-system", "dns", labels={"app": "nginx"}, containers=[("c", "x", "e" * 64)]))).changes)
    assert "bindings" not in got


def test_policy_changes_rebind_existing_containers() -> None:
    pod = make_pod("shop", "web", labels={"app": "nginx"}, containers=[("c", "nginx", "f" * 64)])
    st = ready_state(namespaces=[make_namespace("shop")], pods=[pod], nodes=[make_node("node-1")])
    got = by_table(st.apply(Change("kubearmorpolicies", "ADDED", KSP)).changes)
    assert isinstance(got["policies"]["KubeArmorPolicy/shop/audit-passwd"], PolicyRecord)
    assert got["bindings"] == {"f" * 64: BindingRecord("f" * 64, ("KubeArmorPolicy/shop/audit-passwd",))}
    got = by_table(st.apply(Change("kubearmorhostpolicies", "ADDED", HSP)).changes)
    hsp_key = "KubeArmorHostPolicy/host-shadow"
    assert got["bindings"] == {"node/node-1": BindingRecord("node/node-1", (hsp_key,))}
    got = by_table(st.apply(Change("kubearmorpolicies", "DELETED", KSP)).changes)
    assert got == {"policies": {"KubeArmorPolicy/shop/audit-passwd": None}, "bindings": {"f" * 64: None}}


def test_relist_publishes_only_the_difference() -> None:
    a, b = make_namespace("a"), make_namespace("b", annotations={"kubearmor-file-posture": "block"})
    st = ready_state(namespaces=[a, b])
    assert st.table("namespaces")["b"] == NamespaceRecord("b", {"kubernetes.io/metadata.name": "b"},
                                                          file_posture="block")
    # While the watch was down, "a" was deleted and "c" created: the re-list says so.
    got = by_table(st.apply(Sync("namespaces", [b, make_namespace("c")])).changes)
    assert set(got["namespaces"]) == {"a", "c"} and got["namespaces"]["a"] is None
    assert st.apply(Sync("namespaces", [b, make_namespace("c")])).changes == []


def test_invalid_policy_is_reported_once_and_not_applied() -> None:
    st = ready_state()
    bad = {**KSP, "metadata": {**KSP["metadata"], "resourceVersion": "7"},
           "spec": {**KSP["spec"], "file": {"matchPaths": [{"path": "relative/path"}]}}}
    up = st.apply(Change("kubearmorpolicies", "ADDED", bad))
    assert up.changes == []
    [inv] = up.invalid
    assert inv.key == "KubeArmorPolicy/shop/audit-passwd"
    assert any(e.path.startswith("spec.file.matchPaths[0].path") for e in inv.errors), inv.errors
    assert st.apply(Sync("kubearmorpolicies", [bad])).invalid == []  # same version: not again
    # Fixed: published. Broken again: withdrawn (tombstone) and reported.
    assert by_table(st.apply(Change("kubearmorpolicies", "MODIFIED", KSP)).changes)["policies"]
    bad["metadata"]["resourceVersion"] = "9"
    up = st.apply(Change("kubearmorpolicies", "MODIFIED", bad))
    assert by_table(up.changes) == {"policies": {"KubeArmorPolicy/shop/audit-passwd": None}}
    assert len(up.invalid) == 1


def test_pod_relist_rebinds_once_and_gets_every_binding_right(monkeypatch: Any) -> None:
    """A re-list of many pods (after a 410) rebinds its containers in one pass, not one pass per
    pod (each pass costs O(policies): per pod, 10k pods x 1,000 policies took the first snapshot
    to 23 s in bench/controller_scale.py)."""
    pods = [make_pod("shop", f"web-{i}", labels={"app": "nginx" if i % 2 else "db"},
                     containers=[("c", "nginx", f"{i:064x}")]) for i in range(40)]
    st = ready_state(namespaces=[make_namespace("shop")], kubearmorpolicies=[KSP], pods=pods[:10])
    calls: list[int] = []
    real = st._recompute_bindings

    def counting(containers: Any, nodes: Any) -> None:
        containers = set(containers)
        calls.append(len(containers))
        real(containers, nodes)

    monkeypatch.setattr(st, "_recompute_bindings", counting)
    got = by_table(st.apply(Sync("pods", pods[5:])).changes)  # 5 gone, 30 new
    assert calls == [35]
    ksp = ("KubeArmorPolicy/shop/audit-passwd",)
    bound = {f"{i:064x}": BindingRecord(f"{i:064x}", ksp) for i in range(10, 40) if i % 2}
    assert got["bindings"] == {**{f"{i:064x}": None for i in range(5) if i % 2}, **bound}
