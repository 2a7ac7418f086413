"""List and watch Kubernetes resources with the `kubernetes` client.

One thread per resource runs the classic reflector loop: LIST (paged), hand the items
to the sink as a `Sync`, then WATCH from the list's resourceVersion, handing each
event over as a `Change` and remembering the newest version (bookmarks included).
A watch that ends or whose connection drops resumes from that version; 410 Gone
(version compacted away) means LIST again; other errors back off exponentially.

The client is synchronous, so the threads only do I/O and JSON parsing; the sink is
expected to move items onto the controller's event loop (`loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controller.state import RESOURCES, Change, InvalidPolicy, Obj, Sync, describe
from enforcer.errors import ArmorstreamError

__all__ = ["Backoff", "KubeError", "KubeSource", "Resource", "Watcher", "load_api_client"]

log = logging.getLogger("armorstream.controller")

KA_GROUP = "security.kubearmor.com"


class KubeError(ArmorstreamError):
    """The Kubernetes API cannot be reached or configured."""


@dataclass(frozen=True, slots=True)
class Resource:
    plural: str
    group: str  # "" for core/v1

    def list_call(self, api: client.ApiClient) -> Callable[..., Any]:
        """The client function that lists (and, with watch=True, watches) it cluster-wide."""
        if not self.group:
            core = client.CoreV1Api(api)
            calls: dict[str, Callable[..., Any]] = {
                "pods": core.list_pod_for_all_namespaces,
                "namespaces": core.list_namespace,
                "nodes": core.list_node,
            }
            return calls[self.plural]
        custom = client.CustomObjectsApi(api)

        def call(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(self.group, "v1", self.plural, **kw)

        # kubernetes.watch.Watch reads the watch-argument name and return type off the function.
        call.__doc__ = ":param bool watch:\n:rtype: object"
        return call


KNOWN: dict[str, Resource] = {r.plural: r for r in (
    Resource("pods", ""), Resource("namespaces", ""), Resource("nodes", ""),
    Resource("kubearmorpolicies", KA_GROUP), Resource("kubearmorclusterpolicies", KA_GROUP),
    Resource("kubearmorhostpolicies", KA_GROUP),
)}


@dataclass
class Backoff:
    """Exponential back-off with full jitter, reset after progress."""

    initial: float = 0.2
    maximum: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class _Gone(Exception):
    pass


@dataclass
class Watcher:
    """The list-then-watch loop for one resource, run in its own thread."""

    api: client.ApiClient
    resource: Resource
    sink: Callable[[Sync | Change], None]
    page_size: int = 500
    watch_timeout: int = 300  # server-side timeoutSeconds of one watch request
    backoff: Backoff = field(default_factory=Backoff)
    stats: dict[str, int] = field(default_factory=lambda: {"lists": 0, "watches": 0, "gone": 0, "errors": 0})
    _stop: threading.Event = field(default_factory=threading.Event)
    _watch: watch.Watch | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"watch-{self.resource.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]  # shuts the socket down, so a blocked read returns

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    self.backoff.reset()
                rv = self._watch_from(rv)
            except _Gone:
                self.stats["gone"] += 1
                log.info("%s: resourceVersion %s expired (410 Gone); listing again", self.resource.plural, rv)
                rv = None
            except Exception as e:  # any failure: connection cut, timeout, 5xx, bad JSON
                if self._stop.is_set():
                    break
                self.stats["errors"] += 1
                delay = self.backoff.next()
                log.warning("%s: %s: %s; retrying in %.1fs", self.resource.plural, type(e).__name__, e, delay)
                self._stop.wait(delay)

    def _list(self) -> str:
        call = self.resource.list_call(self.api)
        items: list[Obj] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"limit": self.page_size, "_preload_content": False}
            if token:
                kw["_continue"] = token
            try:
                resp = call(**kw)
            except ApiException as e:
                if e.status == 410:  # the continue token expired: start over
                    items, token = [], None
                    continue
                raise
            body = orjson.loads(resp.data)
            items.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.stats["lists"] += 1
        rv = str(meta.get("resourceVersion", ""))
        self.sink(Sync(self.resource.plural, items))
        return rv

    def _watch_from(self, rv: str) -> str:
        call = self.resource.list_call(self.api)
        w = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]  # plain dicts
        self._watch = w
        self.stats["watches"] += 1
        try:
            stream = w.stream(  # type: ignore[no-untyped-call]
                call, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                _request_timeout=(10, self.watch_timeout + 30))
            for ev in stream:
                obj = ev["raw_object"]
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self.sink(Change(self.resource.plural, ev["type"], obj))
                    self.backoff.reset()
                if self._stop.is_set():
                    break
        except ApiException as e:
            if e.status == 410:
                raise _Gone() from e
            raise
        finally:
            self._watch = None
        return rv


def load_api_client(kubeconfig: str | None = None, *, in_cluster: bool = False,
                    host: str | None = None) -> client.ApiClient:
    """An ApiClient from in-cluster config, a kubeconfig file (default ~/.kube/config) or a bare host."""
    try:
        if host:
            cfg = client.Configuration()
            cfg.host = host
        elif in_cluster:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            cfg = client.Configuration.get_default_copy()
        else:
            cfg = client.Configuration()
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        raise KubeError(f"cannot configure the Kubernetes client: {e}") from e
    return client.ApiClient(cfg)


@dataclass
class KubeSource:
    """Watchers for every resource the controller needs, and the Event reporter."""

    api: client.ApiClient
    resources: tuple[str, ...] = RESOURCES
    watch_timeout: int = 300
    page_size: int = 500
    watchers: list[Watcher] = field(default_factory=list)

    def start(self, sink: Callable[[Sync | Change], None]) -> None:
        self.watchers = [Watcher(self.api, KNOWN[r], sink, page_size=self.page_size,
                                 watch_timeout=self.watch_timeout) for r in self.resources]
        for w in self.watchers:
            w.start()

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()
        for w in self.watchers:
            w.join(5)

    def report_invalid(self, inv: InvalidPolicy) -> None:
        """A Warning Event on the policy object, as `kubectl describe` shows it (blocking call)."""
        ns = inv.namespace or "default"  # cluster-scoped objects' events go to "default"
        message = f"not applied: {describe(inv.errors)}"[:1024]
        ev = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{inv.name}."),
            involved_object=client.V1ObjectReference(
                api_version=f"{KA_GROUP}/v1", kind=inv.kind, name=inv.name,
                namespace=inv.namespace, uid=inv.uid or None, resource_version=inv.resource_version or None),
            reason="InvalidPolicy", message=message, type="Warning",
            source=client.V1EventSource(component="armorstream-controller"),
            reporting_component="armorstream-controller", count=1)
        try:
            client.CoreV1Api(self.api).create_namespaced_event(ns, ev)
        except (ApiException, OSError) as e:  # reporting is best effort: the log line stays
            log.warning("could not post an Event for invalid policy %s: %s", inv.key, e)
