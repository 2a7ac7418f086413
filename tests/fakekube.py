"""A small fake Kubernetes API server that speaks the real REST list/watch protocol.

No API server can run on this machine, so the controller's tests point the real
`kubernetes` client at this one. It keeps objects in memory for core/v1 pods,
namespaces, nodes and events and for the security.kubearmor.com/v1 policy kinds,
with what a list/watch client relies on:

- one monotonically increasing resourceVersion shared by all objects;
- LIST with `metadata.resourceVersion`, and `limit`/`continue` pagination;
- WATCH (`?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`) as
  chunked JSON lines ADDED/MODIFIED/DELETED/BOOKMARK/ERROR, from N onwards (from an
  unset or "0" version: synthetic ADDED events for what exists, as the real server does);
- compaction: a watch from a version older than the last `compact()` gets an ERROR
  event with code 410 (or an HTTP 410 when `gone_as_http` is set); `expire_watches()`
  sends that ERROR to open watches, as etcd compaction does mid-watch;
- `drop_watches()` cuts open watch connections without the closing chunk, and
  `hold_watches()` stops delivery to open watches (so a client misses changes);
- POST creates objects (the controller posts core/v1 Events about invalid policies).

Tests change state through `create`, `update` and `delete` (these bump the version and
wake watchers) and read posted events from `posted_events()`.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KA_GROUP = "security.kubearmor.com"


@dataclass(frozen=True)
class Kind:
    plural: str
    group: str  # "" for core
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/v1" if self.group else "v1"


KINDS: dict[str, Kind] = {k.plural: k for k in (
    Kind("pods", "", "Pod", True),
    Kind("namespaces", "", "Namespace", False),
    Kind("nodes", "", "Node", False),
    Kind("events", "", "Event", True),
    Kind("kubearmorpolicies", KA_GROUP, "KubeArmorPolicy", True),
    Kind("kubearmorclusterpolicies", KA_GROUP, "KubeArmorClusterPolicy", False),
    Kind("kubearmorhostpolicies", KA_GROUP, "KubeArmorHostPolicy", False),
)}
PLURAL_OF_KIND = {k.kind: k.plural for k in KINDS.values()}


@dataclass(frozen=True)
class _Event:
    rv: int
    plural: str
    namespace: str
    type: str
    obj: dict[str, Any]


@dataclass
class FakeKube:
    bookmark_interval: float = 1.0
    gone_as_http: bool = False  # answer a too-old watch with HTTP 410 instead of an ERROR event
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _rv: int = 0
    _objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: {p: {} for p in KINDS})
    _log: list[_Event] = field(default_factory=list)
    _log_rvs: list[int] = field(default_factory=list)
    _compacted: int = 0
    _drop_gen: int = 0
    _expire_gen: int = 0
    _held: bool = False
    _stopping: bool = False
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path?query)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakekube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def client_configuration(self) -> Any:
        """A kubernetes.client.Configuration pointing at this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    # ---- state changes (what a test does instead of kubectl) ---------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _bump(self, plural: str, etype: str, obj: dict[str, Any]) -> dict[str, Any]:
        # Caller holds the lock.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        ns = obj["metadata"].get("namespace", "")
        snapshot = copy.deepcopy(obj)
        self._log.append(_Event(self._rv, plural, ns, etype, snapshot))
        self._log_rvs.append(self._rv)
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        kind = KINDS[plural]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            if key in self._objects[plural]:
                raise KeyError(f"{plural} {key} already exists")
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._objects[plural][key] = obj
            return self._bump(plural, "ADDED", obj)

    def update(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            old = self._objects[plural][key]
            meta["uid"] = old["metadata"]["uid"]
            meta.setdefault("creationTimestamp", old["metadata"].get("creationTimestamp"))
            obj.setdefault("apiVersion", old["apiVersion"])
            obj.setdefault("kind", old["kind"])
            self._objects[plural][key] = obj
            return self._bump(plural, "MODIFIED", obj)

    def delete(self, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        with self._cond:
            obj = self._objects[plural].pop((namespace, name))
            return self._bump(plural, "DELETED", obj)

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._objects[plural][(namespace, name)])

    def posted_events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(o) for o in self._objects["events"].values()]

    # ---- failure injection --------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: watches from a version before now get 410 Gone."""
        with self._cond:
            self._compacted = self._rv

    def expire_watches(self) -> None:
        """Compact and send ERROR 410 to every open watch (as after etcd compaction)."""
        with self._cond:
            self._compacted = self._rv
            self._expire_gen += 1
            self._cond.notify_all()

    def hold_watches(self, held: bool = True) -> None:
        """While held, open watches deliver nothing (a partitioned watch: the client misses changes)."""
        with self._cond:
            self._held = held
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream."""
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    def count(self, method: str, path_prefix: str, *, watch: bool | None = None) -> int:
        with self._cond:
            reqs = list(self.requests)
        n = 0
        for m, p in reqs:
            if m != method or not p.startswith(path_prefix):
                continue
            if watch is not None and (("watch=" in p) != watch):
                continue
            n += 1
        return n

    # ---- protocol helpers used by the handler --------------------------------------------

    def _items(self, plural: str, namespace: str | None) -> tuple[int, list[dict[str, Any]]]:
        with self._cond:
            objs = self._objects[plural]
            keys = sorted(k for k in objs if namespace is None or k[0] == namespace)
            return self._rv, [copy.deepcopy(objs[k]) for k in keys]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing idle keep-alive connections are normal, not worth a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _gone(message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Expired", "code": 410}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FakeKube

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read state, not logs
        pass

    # Routing: /api/v1[/namespaces/NS]/PLURAL[/NAME] and /apis/G/v1[/namespaces/NS]/PLURAL[/NAME];
    # /api/v1/namespaces[/NAME] is the namespace resource itself.
    def _route(self) -> tuple[str, str | None, str | None, dict[str, list[str]]] | None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis" and parts[2] == "v1":
            rest = parts[3:]
        else:
            return None
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in KINDS or len(rest) > 2:
            return None
        return rest[0], namespace, (rest[1] if len(rest) == 2 else None), query

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": "NotFound", "code": 404, "message": f"{self.path} not found"})

    def do_GET(self) -> None:
        st = self.server_state
        with st._cond:
            st.requests.append(("GET", self.path))
        route = self._route()
        if route is None:
            return self._not_found()
        plural, namespace, name, query = route
        if name is not None:
            try:
                return self._send_json(200, st.get(plural, name, namespace or ""))
            except KeyError:
                return self._not_found()
        if query.get("watch", ["false"])[0] in ("1", "true"):
            return self._watch(plural, namespace, query)
        return self._list(plural, namespace, query)

    def _list(self, plural: str, namespace: str | None, query: dict[str, list[str]]) -> None:
        st = self.server_state
        kind = KINDS[plural]
        rv, items = st._items(plural, namespace)
        offset = 0
        if "continue" in query:
            token_rv, token_off = (int(x) for x in query["continue"][0].split(":"))
            if token_rv < st._compacted:
                return self._send_json(410, _gone("the provided continue parameter is too old"))
            rv, offset = token_rv, token_off
        limit = int(query.get("limit", ["0"])[0] or 0)
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{rv}:{offset + limit}"
            meta["remainingItemCount"] = len(items) - offset - limit
        self._send_json(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                              "metadata": meta, "items": page})

    def _chunk(self, line: dict[str, Any]) -> None:
        data = json.dumps(line).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, plural: str, namespace: str | None, query: dict[str, list[str]]) -> None:
        st = self.server_state
        kind = KINDS[plural]
        rv_param = query.get("resourceVersion", [""])[0]
        bookmarks = query.get("allowWatchBookmarks", ["false"])[0] in ("1", "true")
        timeout = float(query.get("timeoutSeconds", ["0"])[0] or 0)
        deadline = time.monotonic() + timeout if timeout else None
        start = int(rv_param) if rv_param not in ("", "0") else None
        too_old = start is not None and start < st._compacted
        if too_old and st.gone_as_http:
            return self._send_json(410, _gone(f"too old resource version: {start} ({st._compacted})"))

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if too_old:
                self._chunk({"type": "ERROR", "object": _gone(f"too old resource version: {start}")})
                return self._end()
            with st._cond:
                drop_gen, expire_gen = st._drop_gen, st._expire_gen
                if start is None:  # no version: the current state as ADDED, then changes
                    start = st._rv
                    initial = [copy.deepcopy(o) for k, o in sorted(st._objects[plural].items())
                               if namespace is None or k[0] == namespace]
                else:
                    initial = []
                pos = bisect.bisect_right(st._log_rvs, start)
            for o in initial:
                self._chunk({"type": "ADDED", "object": o})
            last_sent = time.monotonic()
            sent_rv = start
            while True:
                with st._cond:
                    while True:
                        now = time.monotonic()
                        if st._stopping or st._drop_gen != drop_gen:
                            self._abort()
                            return
                        if st._expire_gen != expire_gen:
                            expired = True
                            break
                        expired = False
                        timed_out = deadline is not None and now >= deadline
                        if (pos < len(st._log) and not st._held) or timed_out:
                            break
                        if bookmarks and now - last_sent >= st.bookmark_interval:
                            break
                        wait = st.bookmark_interval if bookmarks else 1.0
                        if deadline is not None:
                            wait = min(wait, deadline - now)
                        st._cond.wait(max(0.01, wait))
                    batch = [] if st._held else st._log[pos:]
                    pos = pos if st._held else len(st._log)
                    # A bookmark may only promise what this watch has delivered.
                    current = sent_rv if st._held else st._rv
                if expired:
                    self._chunk({"type": "ERROR", "object": _gone("too old resource version")})
                    return self._end()
                sent_any = False
                for ev in batch:
                    if ev.plural != plural or (namespace is not None and ev.namespace != namespace):
                        continue
                    self._chunk({"type": ev.type, "object": ev.obj})
                    sent_rv, sent_any = ev.rv, True
                if sent_any:
                    last_sent = time.monotonic()
                elif bookmarks and time.monotonic() - last_sent >= st.bookmark_interval:
                    # A bookmark carries only the version: the client resumes from it.
                    sent_rv = max(sent_rv, current)
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": kind.kind, "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(sent_rv)}}})
                    last_sent = time.monotonic()
                if deadline is not None and time.monotonic() >= deadline:
                    return self._end()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        # Close without the terminating chunk: the client sees a connection cut mid-stream.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self) -> None:
        st = self.server_state
        with st._cond:
            st.requests.append(("POST", self.path))
        route = self._route()
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if route is None or route[2] is not None:
            return self._not_found()
        plural, namespace, _, _ = route
        if KINDS[plural].namespaced:
            body.setdefault("metadata", {})["namespace"] = namespace or "default"
        meta = body.setdefault("metadata", {})
        if "name" not in meta:
            meta["name"] = meta.get("generateName", "obj-") + uuid.uuid4().hex[:8]
        try:
            created = st.create(plural, body)
        except KeyError:
            return self._send_json(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "reason": "AlreadyExists", "code": 409})
        self._send_json(201, created)


# ---- object builders ---------------------------------------------------------------------

_ids = itertools.count(1)


def container_id(n: int | None = None) -> str:
    """A 64-hex container id, unique per call unless n is given."""
    return f"{(next(_ids) if n is None else n):064x}"


def make_namespace(name: str, labels: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {}, "status": {"phase": "Active"}}


def make_node(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {}, "status": {}}


def make_pod(namespace: str, name: str, *, labels: dict[str, str] | None = None,
             containers: list[tuple[str, str, str | None]] | None = None, node: str = "node-1",
             owner: tuple[str, str] | None = None) -> dict[str, Any]:
    """A pod; containers are (name, image, container id or None while not started)."""
    containers = containers if containers is not None else [("app", "nginx:1.27", container_id())]
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": str(uuid.uuid4()), "controller": True}]
    statuses = [{"name": c, "image": img, "imageID": "", "ready": cid is not None, "restartCount": 0,
                 **({"containerID": f"containerd://{cid}"} if cid else {})}
                for c, img, cid in containers]
    return {"metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": c, "image": img} for c, img, _ in containers]},
            "status": {"phase": "Running", "containerStatuses": statuses}}


def make_policy(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(plural, object) for a KubeArmor policy document as written in YAML."""
    return PLURAL_OF_KIND[doc["kind"]], copy.deepcopy(doc)
