"""The fake API server against the real `kubernetes` client (the controller tests rely on it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.fakekube import FakeKube, make_namespace, make_pod


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube(bookmark_interval=0.2).start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def api(kube: FakeKube) -> Iterator[client.ApiClient]:
    with client.ApiClient(kube.client_configuration()) as a:
        yield a


def test_list_has_resource_version_and_items(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create("namespaces", make_namespace("a"))
    kube.create("pods", make_pod("a", "p1", labels={"app": "x"}))
    kube.create("pods", make_pod("a", "p2"))
    core = client.CoreV1Api(api)
    pods = core.list_pod_for_all_namespaces()
    assert [p.metadata.name for p in pods.items] == ["p1", "p2"]
    assert pods.metadata.resource_version == "3"
    assert pods.items[0].metadata.labels == {"app": "x"}
    assert pods.items[0].status.container_statuses[0].container_id.startswith("containerd://")
    assert [n.metadata.name for n in core.list_namespace().items] == ["a"]
    assert [p.metadata.name for p in core.list_namespaced_pod("a").items] == ["p1", "p2"]
    assert core.list_namespaced_pod("b").items == []


def test_list_pagination(kube: FakeKube, api: client.ApiClient) -> None:
    for i in range(5):
        kube.create("pods", make_pod("a", f"p{i}"))
    core = client.CoreV1Api(api)
    names, token = [], None
    while True:
        page = core.list_pod_for_all_namespaces(limit=2, _continue=token)
        names += [p.metadata.name for p in page.items]
        token = page.metadata._continue
        if not token:
            break
    assert names == [f"p{i}" for i in range(5)]


def test_custom_objects_list(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create("kubearmorclusterpolicies", {"metadata": {"name": "c"}, "spec": {"severity": 1}})
    kube.create("kubearmorpolicies", {"metadata": {"name": "k", "namespace": "n"}, "spec": {}})
    co = client.CustomObjectsApi(api)
    csp = co.list_cluster_custom_object("security.kubearmor.com", "v1", "kubearmorclusterpolicies")
    assert [o["metadata"]["name"] for o in csp["items"]] == ["c"]
    assert csp["items"][0]["kind"] == "KubeArmorClusterPolicy"
    ksp = co.list_namespaced_custom_object("security.kubearmor.com", "v1", "n", "kubearmorpolicies")
    assert [o["metadata"]["namespace"] for o in ksp["items"]] == ["n"]


def _collect(stream: Iterator[dict[str, Any]], n: int) -> list[tuple[str, str]]:
    out = []
    for ev in stream:
        obj = ev["raw_object"]
        out.append((ev["type"], obj["metadata"].get("name", obj["metadata"]["resourceVersion"])))
        if len(out) == n:
            break
    return out


def test_watch_from_version_sees_changes_and_bookmarks(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create("pods", make_pod("a", "before"))
    rv = core.list_pod_for_all_namespaces().metadata.resource_version

    def later() -> None:
        kube.create("namespaces", make_namespace("other"))  # another resource: not in this watch
        kube.create("pods", make_pod("a", "p1"))
        p = kube.get("pods", "p1", "a")
        p["metadata"]["labels"] = {"v": "2"}
        kube.update("pods", p)
        kube.delete("pods", "p1", "a")

    threading.Timer(0.1, later).start()
    w = watch.Watch()
    events = _collect(w.stream(core.list_pod_for_all_namespaces, resource_version=rv,
                               allow_watch_bookmarks=True, timeout_seconds=5), 3)
    w.stop()
    assert events == [("ADDED", "p1"), ("MODIFIED", "p1"), ("DELETED", "p1")]

    # Nothing else happens: the next event is a bookmark at the latest version.
    w = watch.Watch()
    ev = next(iter(w.stream(core.list_pod_for_all_namespaces, resource_version=str(kube.resource_version),
                            allow_watch_bookmarks=True, timeout_seconds=5)))
    w.stop()
    assert ev["type"] == "BOOKMARK"
    assert ev["raw_object"]["metadata"]["resourceVersion"] == str(kube.resource_version)


def test_watch_without_version_starts_with_current_state(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create("namespaces", make_namespace("a"))
    kube.create("namespaces", make_namespace("b"))
    w = watch.Watch()
    events = _collect(w.stream(client.CoreV1Api(api).list_namespace, timeout_seconds=2), 2)
    w.stop()
    assert events == [("ADDED", "a"), ("ADDED", "b")]


def test_too_old_version_is_410_gone(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create("namespaces", make_namespace("a"))
    kube.create("namespaces", make_namespace("b"))
    kube.compact()
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespace, resource_version="1", timeout_seconds=2):
            pass
    assert e.value.status == 410
    kube.gone_as_http = True
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespace, resource_version="1", timeout_seconds=2):
            pass
    assert e.value.status == 410


def test_expire_and_drop_open_watches(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    rv = core.list_namespace().metadata.resource_version
    threading.Timer(0.2, kube.expire_watches).start()
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespace, resource_version=rv, timeout_seconds=5):
            pass
    assert e.value.status == 410

    threading.Timer(0.2, kube.drop_watches).start()
    with pytest.raises(Exception) as cut:  # urllib3's ProtocolError: the stream ended mid-chunk
        for _ in watch.Watch().stream(core.list_namespace, resource_version=str(kube.resource_version),
                                      timeout_seconds=5):
            pass
    assert "ProtocolError" in type(cut.value).__name__ or "IncompleteRead" in repr(cut.value)


def test_post_event(kube: FakeKube, api: client.ApiClient) -> None:
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="bad-policy."),
        involved_object=client.V1ObjectReference(kind="KubeArmorPolicy", name="bad", namespace="n"),
        reason="InvalidPolicy", message="spec.file: wrong", type="Warning")
    client.CoreV1Api(api).create_namespaced_event("n", ev)
    [posted] = kube.posted_events()
    assert posted["involvedObject"]["name"] == "bad"
    assert posted["metadata"]["namespace"] == "n"
    assert posted["metadata"]["name"].startswith("bad-policy.")
