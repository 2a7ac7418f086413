"""Container identity: the path parser on real-world cgroup layouts, then real processes in
cgroups named the way kubelet and the runtimes name them, inside their own mount/pid/uts
namespaces, resolved from /proc and from the kernel's own exec records."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from sensor.identity import (
    CgroupIndex,
    Identity,
    IdentityError,
    Resolver,
    cgroup2_mount,
    cgroup_id_of,
    detect_runtime,
    host_namespaces,
    parse_cgroup_path,
)
from tests.conftest import ROOT, need, need_root, need_tool

CID = "3f5b2c6f1c0e8a7d9b4e2f1a0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"
CID2 = "a" * 64
UID = "9c1d4c2e-7d2b-4bb1-8a8e-3b5a7c1f0e21"
UID_ = UID.replace("-", "_")
STATIC = "6e0d0f8d3f1c4b7a9e2d1c0b3a4f5e6d"  # static pods: a 32-hex config hash

# (cgroup path, container id, pod uid, qos, runtime); container id None = host.
CASES: list[tuple[str, str | None, str | None, str | None, str | None]] = [
    # kubelet with the systemd cgroup driver, one per runtime and QoS class
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CID, UID, "burstable", "containerd"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     CID, UID, "besteffort", "cri-o"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope", CID, UID, "guaranteed", "docker"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope", CID, UID, "guaranteed",
     "containerd"),
    # crun with the systemd driver nests the container's processes one level down
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container",
     CID, UID, "burstable", "cri-o"),
    # CRI-O's conmon runs beside the container: it is not the container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     None, None, None, None),
    # the pod's own cgroup (no container)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", None, None, None, None),
    # cgroupfs driver: the runtime is not in the path
    (f"/kubepods/burstable/pod{UID}/{CID}", CID, UID, "burstable", None),
    (f"/kubepods/besteffort/pod{UID}/{CID}", CID, UID, "besteffort", None),
    (f"/kubepods/pod{UID}/{CID}", CID, UID, "guaranteed", None),
    (f"/kubepods/burstable/pod{STATIC}/{CID}", CID, STATIC, "burstable", None),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope",
     CID, STATIC, "burstable", "containerd"),
    # containerd given a "slice:prefix:name" path (cgroup v1 systemd nodes)
    (f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}",
     CID, UID, "burstable", "containerd"),
    # kind: the node is a docker container; kubelet's --cgroup-root prefixes the slices
    (f"/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/"
     f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CID, UID, "besteffort", "containerd"),
    (f"/docker/{CID2}/kubepods/burstable/pod{UID}/{CID}", CID, UID, "burstable", None),
    # k3s (cgroupfs, under its own root)
    (f"/k3s/kubepods/besteffort/pod{UID}/{CID}", CID, UID, "besteffort", None),
    # plain runtimes, no Kubernetes
    (f"/system.slice/docker-{CID}.scope", CID, None, None, "docker"),
    (f"/docker/{CID}", CID, None, None, "docker"),
    (f"/machine.slice/libpod-{CID}.scope", CID, None, None, "podman"),
    (f"/machine.slice/libpod-{CID}.scope/container", CID, None, None, "podman"),
    (f"/actions_job/{CID}", CID, None, None, None),
    # the host
    ("/", None, None, None, None),
    ("", None, None, None, None),
    ("/init.scope", None, None, None, None),
    ("/system.slice/containerd.service", None, None, None, None),
    ("/system.slice/kubelet.service", None, None, None, None),
    ("/user.slice/user-1000.slice/session-2.scope", None, None, None, None),
    ("/kubepods.slice", None, None, None, None),
    ("/kubepods/burstable", None, None, None, None),
    # look-alikes that are not container ids
    (f"/docker/{CID[:63]}", None, None, None, None),
    (f"/system.slice/docker-{CID.upper()}.scope", None, None, None, None),
    (f"/system.slice/runc-{CID}.scope", None, None, None, None),
    (f"/burstable/pod{UID}/{CID}", CID, None, None, None),  # no kubepods above: no pod claimed
]


@pytest.mark.parametrize(("path", "container", "pod", "qos", "runtime"), CASES)
def test_parse_cgroup_path(path: str, container: str | None, pod: str | None, qos: str | None,
                           runtime: str | None) -> None:  # fmt: skip
    ident = parse_cgroup_path(path)
    assert (ident.container_id, ident.pod_uid, ident.qos, ident.runtime) == (container, pod, qos, runtime)
    assert ident.host == (container is None)
    assert ident.path == "/" + path.strip("/")


def test_cgroup2_mount_from_mounts_table(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text("proc /proc proc rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
                     "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")  # fmt: skip
    assert cgroup2_mount(table) == Path("/sys/fs/cgroup/unified")
    table.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(IdentityError, match="no cgroup2"):
        cgroup2_mount(table)


def test_detect_runtime_by_socket(tmp_path: Path) -> None:
    assert detect_runtime(tmp_path) is None
    (tmp_path / "run" / "crio").mkdir(parents=True)
    (tmp_path / "run" / "crio" / "crio.sock").touch()
    assert detect_runtime(tmp_path) == "cri-o"
    (tmp_path / "run" / "containerd").mkdir()
    (tmp_path / "run" / "containerd" / "containerd.sock").touch()
    assert detect_runtime(tmp_path) == "containerd"


# ---- real cgroups, real processes ---------------------------------------------------------

Layout = Callable[[str, str], tuple[str, str | None, str | None]]  # (uid, cid) -> path, qos, runtime
LAYOUTS: dict[str, Layout] = {
    "systemd-containerd": lambda uid, cid: (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
        f"cri-containerd-{cid}.scope", "burstable", "containerd"),
    "systemd-crio": lambda uid, cid: (
        f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/crio-{cid}.scope", "guaranteed", "cri-o"),
    "cgroupfs": lambda uid, cid: (f"kubepods/besteffort/pod{uid}/{cid}", "besteffort", None),
    "docker": lambda uid, cid: (f"system.slice/docker-{cid}.scope", None, "docker"),
}


class Tree:
    """A private subtree of the real cgroup2 hierarchy, removed afterwards."""

    def __init__(self) -> None:
        self.mount = cgroup2_mount()
        self.top = self.mount / f"as-test-{uuid.uuid4().hex[:8]}"
        self.top.mkdir()

    def make(self, rel: str) -> Path:
        d = self.top / rel
        d.mkdir(parents=True)
        return d

    def remove(self) -> None:
        for d in sorted((p for p in self.top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        self.top.rmdir()


@pytest.fixture
def tree() -> Iterator[Tree]:
    need_root()
    need(Path("/proc/mounts").read_text().count(" cgroup2 "), "needs a cgroup v2 mount")
    t = Tree()
    try:
        yield t
    finally:
        t.remove()


def start_container(cgroup: Path) -> subprocess.Popen[bytes]:
    """A "container": sh joins the cgroup, then unshare makes pid 1 of new pid/mount/uts namespaces."""
    need_tool("unshare")
    script = ('echo $$ > "$0/cgroup.procs" && '
              "exec unshare --pid --fork --kill-child --mount --uts --mount-proc sleep 30")
    return subprocess.Popen(["sh", "-c", script, str(cgroup)])


def container_pid(unshare: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """The host pid of the sleep that is pid 1 inside the new namespaces."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        pids = kids.read_text().split() if kids.exists() else []
        if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "sleep":
            return int(pids[0])
        time.sleep(0.01)
    raise AssertionError("the container's pid 1 did not start")


def wait_empty(cgroup: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (cgroup / "cgroup.procs").read_text().strip():
        assert time.monotonic() < deadline, f"processes left in {cgroup}"
        time.sleep(0.01)


@pytest.mark.root
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_process_in_named_cgroup_resolves(tree: Tree, layout: str) -> None:
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    rel, qos, runtime = LAYOUTS[layout](uid, cid)
    cg = tree.make(rel)
    host_cg = tree.make("system.slice/kubelet.service")  # a host cgroup beside it
    index = CgroupIndex(min_rewalk_s=0.0)
    resolver = Resolver(index, default_runtime="containerd")
    proc = start_container(cg)
    try:
        pid = container_pid(proc)
        # The kernel's view of the process: its cgroup path and namespaces.
        line = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        v2 = next(x.split("::", 1)[1] for x in line if x.startswith("0::"))
        assert v2 == f"/{tree.top.name}/{rel}"
        cgid = cgroup_id_of(tree.mount / v2.lstrip("/"))
        assert cgid == cg.stat().st_ino
        host_pid_ns, host_mnt_ns = host_namespaces()
        assert os.stat(f"/proc/{pid}/ns/pid").st_ino != host_pid_ns
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != host_mnt_ns
        assert os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")

        ident = resolver.resolve(cgid)
        assert ident is not None
        assert ident.container_id == cid
        assert ident.pod_uid == (uid if qos else None)
        assert ident.qos == qos
        assert ident.runtime == (runtime or "containerd")  # cgroupfs paths take the node's runtime
        assert index.paths[cgid] == v2

        host = resolver.resolve(host_cg.stat().st_ino)
        assert host is not None and host.host
        assert resolver.resolve(os.stat(tree.mount).st_ino) == Identity("/")
    finally:
        proc.kill()  # --kill-child takes the container's pid 1 (and its namespace) with it
        proc.wait()
        wait_empty(cg)


@pytest.mark.root
def test_index_rewalks_for_new_cgroups_rate_limited(tree: Tree) -> None:
    index = CgroupIndex(min_rewalk_s=3600.0)
    walks = index.walks
    late = tree.make(f"kubepods/pod{uuid.uuid4()}/{CID}")
    assert index.find(late.stat().st_ino) is None  # walked just now: not again for an hour
    assert index.walks == walks
    index.min_rewalk_s = 0.0
    assert index.find(late.stat().st_ino) == f"/{tree.top.name}/kubepods/{late.parent.name}/{CID}"
    assert index.walks == walks + 1
    assert late.stat().st_ino in index.containers()


@pytest.mark.root
def test_resolve_column_once_per_unique_id(tree: Tree) -> None:
    a = tree.make(f"kubepods/pod{UID}/{CID}")
    b = tree.make(f"docker/{CID2}")
    index = CgroupIndex(min_rewalk_s=0.0)
    resolver = Resolver(index, default_runtime=None)
    ia, ib = a.stat().st_ino, b.stat().st_ino
    col = np.array([ia, ib, ia, ia, 0xDEAD_BEEF_0000, ib], dtype=np.uint64)
    walks = index.walks
    uniq, idents, inverse = resolver.resolve_column(col)
    assert len(uniq) == 3
    per_row = [idents[i] for i in inverse]
    assert [i.container_id if i else None for i in per_row] == [CID, CID2, CID, CID, None, CID2]
    assert per_row[1] is not None and per_row[1].runtime == "docker"
    assert resolver.unknown == 1 and index.walks == walks + 1  # one re-walk, for the unknown id only
    # Removed cgroups leave the cache at the next walk.
    b.rmdir()
    index.walk()
    assert resolver.forget_missing() == 1


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.parametrize("layout", ["systemd-containerd", "cgroupfs"])
def test_identity_from_kernel_records(tree: Tree, layout: str, tmp_path: Path) -> None:
    """The cgroup id the BPF exec record carries resolves to the container that ran it."""
    need_tool("clang")
    need(Path("/sys/kernel/btf/vmlinux").exists(), "needs kernel BTF")
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), ".output/process.bpf.o"], check=True)
    from enforcer import records
    from enforcer.records import Kind
    from sensor.libbpf import ensure_bpffs
    from sensor.monitors import ProcessMonitor

    ensure_bpffs()
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    rel, qos, _ = LAYOUTS[layout](uid, cid)
    cg = tree.make(rel)
    pin = Path("/sys/fs/bpf") / f"armorstream-test-{uuid.uuid4().hex[:12]}"
    tag = f"ident-{uuid.uuid4().hex[:8]}"
    try:
        with ProcessMonitor(pin_dir=pin) as mon:
            mon.watch(cg.stat().st_ino)
            script = 'echo $$ > "$0/cgroup.procs" && exec unshare --pid --fork --mount --uts /bin/true "$1"'
            subprocess.run(["sh", "-c", script, str(cg), tag], check=True)
            execs: list[np.ndarray] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                execs += [np.frombuffer(b.records, records.DTYPES[b.kind])
                          for b in mon.drain.poll(100) if b.kind == Kind.EXEC]  # fmt: skip
                if any(tag in av for e in execs for av in records.argv(e)):
                    break
            ex = np.concatenate(execs)
    finally:
        for p in pin.iterdir() if pin.exists() else []:
            p.unlink()
        if pin.exists():
            pin.rmdir()
    assert [av[0] for av in records.argv(ex)] == ["unshare", "/bin/true"]
    true = ex[1:]
    assert records.argv(true) == [["/bin/true", tag]]
    assert int(true["hdr"]["pid"][0]) == 1  # pid 1 of its own pid namespace
    resolver = Resolver(CgroupIndex(min_rewalk_s=0.0), default_runtime="containerd")
    uniq, idents, _ = resolver.resolve_column(ex["hdr"]["cgroup_id"])
    assert uniq.tolist() == [cg.stat().st_ino]
    ident = idents[0]
    assert ident is not None
    assert (ident.container_id, ident.pod_uid, ident.qos, ident.runtime) == (cid, uid, qos, "containerd")
    assert int(true["hdr"]["pid_ns"][0]) != host_namespaces()[0]
