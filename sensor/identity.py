"""Container identity: which container, pod and runtime a cgroup id (plus namespaces) belongs to.

The kernel stamps every record with the task's cgroup v2 id, which is the inode number of
the cgroup's directory in the cgroup2 filesystem. The path of that directory is named by
the kubelet and the container runtime, and says which container it is:

    systemd driver  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
                    cri-containerd-<64 hex>.scope        (crio-<id>.scope, docker-<id>.scope)
    cgroupfs driver /kubepods/burstable/pod<uid>/<64 hex>
    plain runtimes  /system.slice/docker-<id>.scope, /docker/<id>, /machine.slice/libpod-<id>.scope

`parse_cgroup_path` is the pure part (path -> Identity, table-tested); `CgroupIndex` walks the
cgroup2 tree once and again, rate-limited, when it meets an id it does not know; `Resolver`
answers for a whole batch column, one lookup per *unique* id.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from enforcer.errors import ArmorstreamError

__all__ = [
    "HOST",
    "CgroupIndex",
    "Identity",
    "IdentityError",
    "Resolver",
    "cgroup2_mount",
    "cgroup_id_of",
    "detect_runtime",
    "host_namespaces",
    "parse_cgroup_path",
]


class IdentityError(ArmorstreamError):
    """No cgroup v2 hierarchy, or a cgroup path that cannot be used."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a cgroup belongs to. `container_id is None` means the host (or a non-container
    cgroup such as a systemd service): KubeArmor reports those as host events."""

    path: str  # relative to the cgroup2 root, starting with "/"
    container_id: str | None = None  # 64 hex, without a runtime prefix
    pod_uid: str | None = None  # with dashes, as the API server spells it
    qos: str | None = None  # "guaranteed", "burstable", "besteffort" (pods only)
    runtime: str | None = None  # "containerd", "cri-o", "docker", "podman"; None: not in the path

    @property
    def host(self) -> bool:
        return self.container_id is None


HOST: Final = Identity("/")

_HEX64 = r"[0-9a-f]{64}"
# A pod UID is a UUID; static (mirror) pods use a 32-hex config hash instead.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
_RUNTIME_PREFIX: Final = {
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "libpod": "podman",
}
# <runtime>-<id>.scope (systemd driver, or a runtime's own systemd scope)
_SCOPE = re.compile(rf"^(cri-containerd|containerd|crio|docker|libpod)-({_HEX64})\.scope$")
# containerd given a "slice:prefix:name" cgroup path under cgroup v1 systemd (kind nodes)
_TRIPLE = re.compile(
    rf"^(?:[\w.-]*?kubepods(?:-(burstable|besteffort))?-pod({_UID})\.slice)?:(cri-containerd|crio|docker):({_HEX64})$"
)
_BARE = re.compile(rf"^{_HEX64}$")
_POD_CGROUPFS = re.compile(rf"^pod({_UID})$")
# A --cgroup-root other than "/" prefixes the slices: kind's kubelet uses kubelet-kubepods-...
_POD_SYSTEMD = re.compile(rf"^(?:[\w.-]+-)?kubepods(?:-(burstable|besteffort))?-pod({_UID})\.slice$")
_QOS = re.compile(r"^(?:(?:[\w.-]+-)?kubepods-)?(burstable|besteffort)(?:\.slice)?$")
_KUBEPODS = re.compile(r"^(?:[\w.-]+-)?kubepods(?:\.slice)?$")


def _uid(raw: str) -> str:
    return raw.replace("_", "-")


def parse_cgroup_path(path: str) -> Identity:
    """Identity from a cgroup v2 path (as /proc/PID/cgroup shows it after "0::").

    The innermost container wins: a kind node is itself a docker container holding
    kubepods, and a runtime may nest a sub-cgroup (crun's `<id>.scope/container`) that
    still belongs to its container. Pod and QoS come from the kubepods part above it.
    """
    norm = "/" + path.strip("/")
    parts = [p for p in norm.split("/") if p]
    container: str | None = None
    runtime: str | None = None
    pod: str | None = None
    qos: str | None = None
    in_pods = False  # below a kubepods cgroup, above the container
    for i, part in enumerate(parts):
        if _KUBEPODS.match(part):
            # A kubepods below a container is the kubelet of a nested node: start over.
            container = runtime = pod = qos = None
            in_pods = True
            continue
        if in_pods and pod is None and (m := _QOS.match(part)):
            qos = m[1]
            continue
        if m := _POD_SYSTEMD.match(part):
            pod, qos = _uid(m[2]), m[1] or qos
            in_pods = True
            continue
        if in_pods and (m := _POD_CGROUPFS.match(part)):
            pod = _uid(m[1])
            continue
        if m := _SCOPE.match(part):
            container, runtime = m[2], _RUNTIME_PREFIX[m[1]]
        elif m := _TRIPLE.match(part):
            container, runtime = m[4], _RUNTIME_PREFIX[m[3]]
            if m[2]:
                pod, qos, in_pods = _uid(m[2]), m[1], True
        elif _BARE.match(part):
            container = part
            # /docker/<id> names its runtime; under kubepods (cgroupfs) the path does not.
            runtime = "docker" if i > 0 and parts[i - 1] == "docker" else None
        else:
            continue
        if pod is None:
            qos = None  # a QoS name outside a pod says nothing
    if container is None:
        return Identity(norm)
    if pod is not None and qos is None:
        qos = "guaranteed"  # pods of the Guaranteed class sit right under kubepods
    return Identity(norm, container, pod, qos, runtime)


def cgroup2_mount(mounts: Path = Path("/proc/mounts")) -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
    hybrid hosts)."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1].replace("\\040", " "))
    raise IdentityError("no cgroup2 filesystem is mounted: the sensor needs cgroup v2 ids")


def cgroup_id_of(path: Path) -> int:
    """The cgroup v2 id of a cgroup directory: its inode number (kernfs node id)."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise IdentityError(f"cgroup {path}: {e.strerror}") from None


def host_namespaces() -> tuple[int, int]:
    """(pid ns, mnt ns) inode numbers of the host: PID 1's, or where /proc/1 is not ours to
    read (a sandboxed init), our own: the sensor runs in the host's namespaces (hostPID)."""
    for proc in ("/proc/1", "/proc/self"):
        try:
            return os.stat(f"{proc}/ns/pid").st_ino, os.stat(f"{proc}/ns/mnt").st_ino
        except PermissionError:
            continue
        except OSError as e:
            raise IdentityError(f"cannot read the host namespaces from {proc}/ns: {e.strerror}") from None
    raise IdentityError("cannot read the host namespaces from /proc/1/ns or /proc/self/ns")


# Runtime sockets, in the order a node is likelier to use them for Kubernetes.
_SOCKETS: Final = (
    ("containerd", "/run/containerd/containerd.sock"),
    ("cri-o", "/run/crio/crio.sock"),
    ("docker", "/run/docker.sock"),
)


def detect_runtime(root: Path = Path("/")) -> str | None:
    """The node's container runtime by its socket: the cgroupfs driver's paths do not say."""
    for name, sock in _SOCKETS:
        if (root / sock.lstrip("/")).exists():
            return name
    return None


class CgroupIndex:
    """cgroup id -> path, from walking the cgroup2 tree.

    A walk costs a few ms per thousand cgroups; `find` re-walks on an unknown id at most
    every `min_rewalk_s`, so a storm of records from one new cgroup costs one walk.
    Ids are never reused while the kernel runs, so a known id's path can be cached.
    """

    def __init__(self, root: Path | None = None, *, min_rewalk_s: float = 1.0) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.min_rewalk_s = min_rewalk_s
        self.paths: dict[int, str] = {}
        self.walks = 0
        self._last_walk = -float("inf")
        self.walk()

    def walk(self) -> dict[int, str]:
        """Rebuild the index from the tree; returns it (id -> path)."""
        paths: dict[int, str] = {}
        try:
            paths[os.stat(self.root).st_ino] = "/"
        except OSError as e:
            raise IdentityError(f"cgroup2 root {self.root}: {e.strerror}") from None
        for ino, rel in self._walk(str(self.root), ""):
            paths[ino] = rel
        self.paths = paths
        self.walks += 1
        self._last_walk = time.monotonic()
        return paths

    @staticmethod
    def _walk(top: str, rel: str) -> Iterator[tuple[int, str]]:
        stack = [(top, rel)]
        while stack:
            d, r = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:  # removed while we walked: it is gone, skip it
                continue
            with it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        child = f"{r}/{e.name}"
                        yield e.inode(), child  # readdir's d_ino is the kernfs id
                        stack.append((e.path, child))

    def find(self, cgroup_id: int) -> str | None:
        """The path of `cgroup_id`, re-walking (rate-limited) if it is not known yet."""
        p = self.paths.get(cgroup_id)
        if p is None and time.monotonic() - self._last_walk >= self.min_rewalk_s:
            p = self.walk().get(cgroup_id)
        return p

    def containers(self) -> dict[int, Identity]:
        """Every cgroup of the last walk that belongs to a container."""
        out = {}
        for cgid, path in self.paths.items():
            ident = parse_cgroup_path(path)
            if not ident.host:
                out[cgid] = ident
        return out


class Resolver:
    """cgroup id -> Identity with a cache; `resolve_column` answers once per unique id."""

    def __init__(self, index: CgroupIndex, *, default_runtime: str | None = None) -> None:
        self.index = index
        # For paths that do not name their runtime (kubelet's cgroupfs driver).
        self.default_runtime = default_runtime if default_runtime is not None else detect_runtime()
        self._cache: dict[int, Identity] = {}
        self.unknown = 0  # ids that were in no walk (exited before we looked, or not cgroup v2)

    def resolve(self, cgroup_id: int) -> Identity | None:
        """None when the id is in no cgroup of the tree (the cgroup is already gone)."""
        ident = self._cache.get(cgroup_id)
        if ident is not None:
            return ident
        path = self.index.find(cgroup_id)
        if path is None:
            self.unknown += 1
            return None
        ident = parse_cgroup_path(path)
        if not ident.host and ident.runtime is None and self.default_runtime is not None:
            ident = Identity(ident.path, ident.container_id, ident.pod_uid, ident.qos, self.default_runtime)
        self._cache[cgroup_id] = ident
        return ident

    def resolve_column(
        self, cgroup_ids: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.uint64], list[Identity | None], npt.NDArray[np.intp]]:
        """(unique ids, their identities, inverse): identity of row i = identities[inverse[i]]."""
        uniq, inverse = np.unique(cgroup_ids, return_inverse=True)
        return uniq, [self.resolve(int(c)) for c in uniq.tolist()], inverse.reshape(-1)

    def forget_missing(self) -> int:
        """Drop cached ids the last walk did not see (their cgroups were removed)."""
        gone = [c for c in self._cache if c not in self.index.paths]
        for c in gone:
            del self._cache[c]
        return len(gone)
