"""The sensor's enforcement side: control topics -> effective policies -> kernel maps and fanotify.

    control topics (policies, bindings, containers, namespaces, nodes)
        -> ControlView, saved to a local file after every change (atomic replace)
        -> per watched cgroup: bindings -> policy documents -> parse_policy -> compiler
        -> KernelRules.set_rules (generation-swap diff into pinned maps) + CompiledDecider (fanotify)

The local file makes enforcement independent of the broker: a sensor that starts while
the broker is away loads it and enforces at once; rules already in the kernel (pinned
maps and links) held meanwhile, and the first reconcile finds an empty diff.

Which policies apply to a cgroup:
- a container (the cgroup path names one): the binding keyed by its container id, with
  the default posture of its namespace (kubearmor-*-posture annotations);
- anything else the sensor watches (a `--watch-cgroup` that is not a container): the host
  policies bound to `node/<this node>`. Host enforcement is keyed by cgroup like everything
  else, so it covers the watched host cgroups, not every process of the machine.

Blocked attempts become records for the raw topic: the cgroup BPF program's `as_enf_events`
ring (as_net_rec with AS_F_BLOCKED / AS_F_AUDITED) and fanotify denials, built here as
as_exec_rec / as_file_rec. `take()` returns them as drain batches. Records the monitors
report anyway are not repeated (see `_keep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import orjson

from enforcer.backends import Backend, Selection, select
from enforcer.compiler import CompiledSet, Decision, FpKind, compile_workload
from enforcer.control import (
    DEFAULT_PREFIX,
    ControlError,
    ControlTopics,
    ControlView,
    NamespaceRecord,
    PolicyRecord,
    encode,
    node_binding_key,
)
from enforcer.errors import ArmorstreamError
from enforcer.fanotify import Access, CompiledDecider, FanotifyEnforcer, FanotifyError
from enforcer.policy.model import Action, Policy, Target
from enforcer.policy.parse import parse_policy
from enforcer.records import AS_SCHEMA_VERSION, DTYPES, EXEC_DTYPE, FILE_DTYPE, Flag, Kind, Visibility
from enforcer.workload import DefaultPosture, Posture
from sensor.control_follow import follow_control
from sensor.drain import Batch
from sensor.enforce import LSM_OBJ, NETBLOCK_OBJ, EnforceError, KernelRules, probe
from sensor.identity import Identity
from sensor.libbpf import PIN_ROOT, BpfError, RingBuffer

__all__ = ["ControlCache", "EnforcementAgent", "EnforcementConfig", "Workload"]

log = logging.getLogger(__name__)

EPERM: Final = 1
_VIS_OF_KIND: Final = {
    Kind.EXEC: Visibility.PROCESS,
    Kind.FILE: Visibility.FILE,
    Kind.NET: Visibility.NETWORK,
    Kind.CAP: Visibility.CAPABILITIES,
}
_GLOB: Final = "*?["


@dataclass(frozen=True, slots=True)
class EnforcementConfig:
    node: str
    broker: str
    state_dir: Path  # the local copy of the control tables lives here
    control_prefix: str = DEFAULT_PREFIX
    pin_dir: Path = PIN_ROOT  # enforcement pins go to pin_dir/enforce
    cgroup_root: Path = Path("/sys/fs/cgroup/unified")
    default_posture: DefaultPosture = field(default_factory=DefaultPosture)
    request_timeout_ms: int = 10_000


class ControlCache:
    """The control tables on local disk: {"tables": {table: {key: record JSON}}}, atomically replaced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, view: ControlView) -> None:
        tables = {
            t: {k: (encode(r) or b"").decode() for k, r in rows.items()} for t, rows in view.tables.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"v": 1, "tables": tables}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self, view: ControlView) -> int:
        """Fold the saved records into `view`; returns how many. A corrupt file is reported and ignored."""
        try:
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0
        except orjson.JSONDecodeError as e:
            log.error("control cache %s is corrupt, ignored: %s", self.path, e)
            return 0
        n = 0
        topic_of = {
            "containers": view.topics.containers, "namespaces": view.topics.namespaces,
            "nodes": view.topics.nodes, "policies": view.topics.policies, "bindings": view.topics.bindings,
        }  # fmt: skip
        for table, rows in doc.get("tables", {}).items():
            topic = topic_of.get(table)
            if topic is None:
                continue
            for key, value in rows.items():
                try:
                    view.apply(topic, key.encode(), value.encode())
                    n += 1
                except ControlError as e:
                    log.warning("control cache: skipping %s/%s: %s", table, key, e)
        return n


@dataclass(frozen=True, slots=True)
class Workload:
    """One enforced cgroup: what applies to it, compiled."""

    cgroup_id: int
    path: str  # relative to the cgroup2 root
    host: bool
    policies: tuple[Policy, ...]
    posture: DefaultPosture


def _posture(ns: NamespaceRecord | None, default: DefaultPosture) -> DefaultPosture:
    if ns is None:
        return default

    def one(v: str | None, d: Posture) -> Posture:
        return Posture(v) if v in ("audit", "block") else d

    return DefaultPosture(
        one(ns.file_posture, default.file),
        one(ns.network_posture, default.network),
        one(ns.capabilities_posture, default.capabilities),
    )


def _ns_inode(pid: int, ns: str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/{ns}").st_ino
    except OSError:
        return 0


def _nspid(pid: int) -> tuple[int, int, int, bool]:
    """(pid as its namespace sees it, gid, ppid, in the initial pid namespace) from /proc; best effort.

    NSpid lists one pid per namespace level from ours down: a single one is level 0, the
    kernel's test for AS_F_HOST (the sensor runs in the host's pid namespace).
    """
    nspid, gid, ppid, level0 = pid, 0, 0, False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    ids = line.split()[1:]
                    nspid, level0 = int(ids[-1]), len(ids) == 1
                elif line.startswith(b"Gid:"):
                    gid = int(line.split()[4])
                elif line.startswith(b"PPid:"):
                    ppid = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return nspid, gid, ppid, level0


def _comm(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip()[:15]
    except OSError:
        return b""


class EnforcementAgent:
    """Keeps the kernel's rules and the fanotify decider equal to what the control topics say."""

    def __init__(self, config: EnforcementConfig) -> None:
        self.config = config
        self.topics = ControlTopics(config.control_prefix)
        self.view = ControlView(topics=self.topics)
        self.cache = ControlCache(config.state_dir / "control.json")
        self.selection: Selection | None = None
        self.kernel: KernelRules | None = None
        self.fan: FanotifyEnforcer | None = None
        self.decider = CompiledDecider()
        self.sets: dict[int, CompiledSet] = {}
        self.workloads: dict[int, Workload] = {}
        self.identities: dict[int, Identity | None] = {}
        self.applied = 0  # control records applied from the broker
        self.reconciles = 0
        self.errors: list[str] = []  # why a workload or policy is not enforced (latest reconcile)
        self._attached: set[int] = set()
        self._marks: dict[tuple[int, int], int] = {}  # (dev, mount id) -> O_PATH fd we mark through
        self._ring: RingBuffer | None = None
        self._pending: list[tuple[int, bytes]] = []  # (kind, record) from the fanotify thread
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[PolicyRecord, Policy]] = {}  # policy key -> (record, parsed)
        self._dirty = True  # the view changed since the last reconcile
        self._unmarked: set[int] = set()  # fanotify workloads whose mount is not marked yet

    # ---- start / stop ----------------------------------------------------------------------
    def start(self, identities: Mapping[int, Identity | None]) -> list[str]:
        """Probe, load the objects (reusing pins), load the local cache, enforce. Returns notes."""
        sel = select(probe())
        self.selection = sel
        notes = [f"enforcement: process {sel.process or 'audit only'}, file {sel.file or 'audit only'}, "
                 f"network {sel.network or 'audit only'}, capabilities {sel.capabilities or 'audit only'}"]
        notes += [f"  {n}" for n in sel.notes]
        objects = [LSM_OBJ] if sel.uses_lsm else []
        if sel.network is Backend.CGROUP:
            objects.append(NETBLOCK_OBJ)
        if objects:
            try:
                kr = KernelRules(objects, self.config.pin_dir / "enforce", self.config.pin_dir).load()
                if sel.uses_lsm:
                    kr.attach_lsm()
                self.kernel = kr
                self._ring = kr.events()
            except (EnforceError, BpfError) as e:
                notes.append(f"  kernel enforcement unavailable: {e}")
        n = self.cache.load(self.view)
        notes.append(f"  local control cache {self.cache.path}: {n} records")
        self.reconcile(identities)
        notes.append(f"  enforcing {len(self.workloads)} cgroup(s)")
        return notes

    def close(self) -> None:
        """Stop fanotify (the kernel then allows what it held) and close our handles; pins stay."""
        if self.fan is not None:
            self.fan.stop()
            self.fan = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        for fd in self._marks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._marks.clear()

    # ---- effective policies ----------------------------------------------------------------
    def _parse(self, keys: tuple[str, ...] | list[str]) -> list[Policy]:
        out = []
        for k in sorted(keys):
            rec = self.view.policies.get(k)
            if rec is None:
                continue
            memo = self._parsed.get(k)
            if memo is not None and memo[0] is rec:
                out.append(memo[1])
                continue
            try:
                pol = parse_policy(rec.document, file=rec.source or k)
            except ArmorstreamError as e:
                self.errors.append(f"policy {k} not enforced: {e}")
                continue
            self._parsed[k] = (rec, pol)
            out.append(pol)
        return out

    def effective(self, cgroup_id: int, ident: Identity | None) -> Workload | None:
        """What applies to one watched cgroup now, or None when nothing does."""
        default = self.config.default_posture
        if ident is not None and ident.container_id is not None:
            b = self.view.bindings.get(ident.container_id)
            c = self.view.containers.get(ident.container_id)
            posture = _posture(self.view.namespaces.get(c.namespace) if c else None, default)
            host = False
        else:
            b = self.view.bindings.get(node_binding_key(self.config.node))
            posture, host = default, True
        if b is None or not b.policies:
            return None
        policies = self._parse(b.policies)
        if not policies:
            return None
        return Workload(cgroup_id, ident.path if ident is not None else "", host, tuple(policies), posture)

    def reconcile(self, identities: Mapping[int, Identity | None] | None = None) -> bool:
        """Bring kernel and decider in line with the view for the watched cgroups; True on a change."""
        if identities is not None and dict(identities) != self.identities:
            self.identities = dict(identities)
            self._dirty = True
        if not self._dirty:
            if self._unmarked and self.fan is not None:  # a container that had no process yet
                for cgid in list(self._unmarked):
                    if cgid in self.workloads:
                        self._mark_workload(self.workloads[cgid])
                    else:
                        self._unmarked.discard(cgid)
            return False
        self._dirty = False
        self.errors = []
        want: dict[int, Workload] = {}
        for cgid, ident in self.identities.items():
            wl = self.effective(cgid, ident)
            if wl is not None:
                want[cgid] = wl
        changed = False
        for cgid in [c for c in self.workloads if c not in want]:
            if self.kernel is not None:
                try:
                    self.kernel.remove(cgid)
                except EnforceError as e:
                    self.errors.append(str(e))
            del self.workloads[cgid]
            self.sets.pop(cgid, None)
            changed = True
        for cgid, wl in want.items():
            if self.workloads.get(cgid) == wl:
                continue
            try:
                self.sets[cgid] = self._install(wl)
                self.workloads[cgid] = wl
                changed = True
            except (ArmorstreamError, OSError) as e:
                self.errors.append(f"cgroup {cgid} ({wl.path}) not enforced: {e}")
        for why in self.errors:
            log.warning("%s", why)
        if changed:
            self.reconciles += 1
            self._refresh_fanotify()
            log.info("enforcing %d cgroup(s)", len(self.workloads))
        return changed

    def _install(self, wl: Workload) -> CompiledSet:
        if self.kernel is None:
            return compile_workload(wl.policies, wl.cgroup_id, wl.posture)
        if wl.cgroup_id not in self._attached and self.selection is not None and (
            self.selection.network is Backend.CGROUP
        ):
            cg = self.config.cgroup_root / wl.path.lstrip("/")
            self.kernel.attach_cgroup(cg)  # pinned: stays attached through a sensor restart
            self._attached.add(wl.cgroup_id)
        # Rules first (generation swap), then the attach above is already in place.
        return self.kernel.set_rules(wl.policies, wl.cgroup_id, wl.posture)

    # ---- fanotify --------------------------------------------------------------------------
    def _fp_backend(self) -> bool:
        sel = self.selection
        return sel is not None and Backend.FANOTIFY in (sel.process, sel.file)

    def _refresh_fanotify(self) -> None:
        if not self._fp_backend():
            return
        needs = {c: cs for c, cs in self.sets.items() if self._has_fp_rules(self.workloads[c])}
        if not needs and self.fan is None:
            return
        self.decider.replace(needs)
        fresh = self.fan is None
        if fresh:
            try:
                self.fan = FanotifyEnforcer(self.decider, self._report, static=self.decider.static).start()
            except FanotifyError as e:
                self.errors.append(f"fanotify: {e}")
                return
        for cgid in needs:
            self._mark_workload(self.workloads[cgid])
        if not fresh:
            assert self.fan is not None
            try:
                self.fan.reset()  # drop ignore marks made under the previous rules
            except FanotifyError as e:
                self.errors.append(f"fanotify reset: {e}")

    @staticmethod
    def _has_fp_rules(wl: Workload) -> bool:
        return any(p.process or p.file for p in wl.policies)

    def _mark(self, path: str) -> None:
        """Mark the mount `path` lies on, once, through an O_PATH fd we keep (valid while the
        process that showed us the mount comes and goes)."""
        assert self.fan is not None
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            mnt = -1
            with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                for line in f:
                    if line.startswith(b"mnt_id:"):
                        mnt = int(line.split()[1])
            key = (os.fstat(fd).st_dev, mnt)
            if key in self._marks:
                os.close(fd)
                return
            self.fan.watch(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        self._marks[key] = fd

    def _mark_workload(self, wl: Workload) -> None:
        self._unmarked.add(wl.cgroup_id)
        try:
            if not wl.host:
                # A container: its root mount, through one of its processes.
                procs = (self.config.cgroup_root / wl.path.lstrip("/") / "cgroup.procs").read_text().split()
                if not procs:
                    self.errors.append(f"cgroup {wl.cgroup_id}: no process yet, fanotify mark deferred")
                    return
                self._mark(f"/proc/{procs[0]}/root/")
                self._unmarked.discard(wl.cgroup_id)
                return
            # The host: the mounts holding the paths the rules name (never every mount).
            for p in wl.policies:
                for target, value in [(r.target, r.value) for r in p.process] + [
                    (r.target, r.value) for r in p.file
                ]:
                    self._mark(self._existing_prefix(value, target))
            self._unmarked.discard(wl.cgroup_id)
        except (OSError, FanotifyError) as e:
            self.errors.append(f"cgroup {wl.cgroup_id}: fanotify mark: {e}")

    @staticmethod
    def _existing_prefix(value: str, target: Target) -> str:
        if target is Target.PATTERN:
            cut = min((value.find(c) for c in _GLOB if c in value), default=len(value))
            value = value[:cut]
        p = Path(value if value.startswith("/") else "/" + value)
        while not p.exists() and p != p.parent:
            p = p.parent
        return str(p)

    def _report(self, a: Access, d: Decision) -> None:
        """fanotify thread: a denial or an audit becomes a raw record."""
        flags = Flag.BLOCKED if d.blocked else Flag.AUDITED if d.action is Action.AUDIT else Flag(0)
        if not flags:
            return
        flags |= Flag.ENF_FANOTIFY
        if d.posture:
            flags |= Flag.POSTURE
        pidns = _ns_inode(a.pid, "pid")
        nspid, gid, _, level0 = _nspid(a.pid)
        if level0:
            flags |= Flag.HOST
        kind = Kind.EXEC if a.kind is FpKind.PROCESS else Kind.FILE
        rec = np.zeros(1, EXEC_DTYPE if kind == Kind.EXEC else FILE_DTYPE)
        h = rec["hdr"]
        h["kind"], h["version"], h["size"] = kind, AS_SCHEMA_VERSION, rec.dtype.itemsize
        h["ktime_ns"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        h["cgroup_id"], h["pid_ns"], h["mnt_ns"] = a.cgroup_id, pidns, _ns_inode(a.pid, "mnt")
        h["uid"], h["gid"], h["ret"], h["flags"] = a.uid, gid, -EPERM if d.blocked else 0, int(flags)
        h["comm"] = _comm(a.pid)
        path = a.path.encode()[:255]
        if kind == Kind.EXEC:
            # KubeArmor's exec event: ProcessName the new binary, ParentProcessName and Source the
            # caller. A denied exec leaves the caller running, so it is both pid and parent here.
            h["host_pid"], h["host_ppid"], h["pid"], h["ppid"] = a.pid, a.pid, nspid, nspid
            rec["path"], rec["exe_uid"] = path, a.owner_uid
            rec["parent_comm"] = _comm(a.pid)
            rec["args"], rec["args_len"], rec["argc"] = path + b"\0", len(path) + 1, 1
            with contextlib.suppress(OSError):
                rec["cwd"] = os.readlink(f"/proc/{a.pid}/cwd").encode()[:255]
        else:
            ppid_ns = _nspid(a.ppid)[0] if a.ppid > 0 else 0
            h["host_pid"], h["host_ppid"], h["pid"], h["ppid"] = a.pid, a.ppid, nspid, ppid_ns
            rec["path"], rec["owner_uid"] = path, a.owner_uid
            rec["open_flags"] = os.O_WRONLY if a.write else os.O_RDONLY
        with self._lock:
            self._pending.append((int(kind), rec.tobytes()))

    # ---- records ---------------------------------------------------------------------------
    def take(self, watched: Mapping[int, int]) -> list[Batch]:
        """Enforcement records collected since the last call, as drain batches.

        `watched`: cgroup id -> visibility bits the monitors report for it. A record the
        monitors also report (a denied open or socket of a watched container, which its
        monitor sees failing with EPERM) is dropped, so the stream alerts once; denied execs
        (invisible to the exec tracepoint) and host-flagged records are always kept.
        """
        parts: dict[int, list[bytes]] = {}
        if self._ring is not None:
            self._ring.poll(0)
            for kind, raw in self._ring.take():
                parts.setdefault(kind, []).append(raw)
        with self._lock:
            pending, self._pending = self._pending, []
        for kind, raw in pending:
            parts.setdefault(kind, []).append(raw)
        out = []
        for kind, chunks in parts.items():
            dtype = DTYPES.get(kind)
            raw = b"".join(chunks)
            if dtype is None or len(raw) % dtype.itemsize:
                continue
            recs = np.frombuffer(raw, dtype)
            keep = self._keep(kind, recs, watched)
            if keep.any():
                kept = recs[keep]
                out.append(Batch(kind, kept.tobytes(), len(kept)))
        return out

    @staticmethod
    def _keep(kind: int, recs: np.ndarray, watched: Mapping[int, int]) -> np.ndarray:
        flags = recs["hdr"]["flags"]
        keep = (flags & (Flag.BLOCKED | Flag.AUDITED)) != 0
        if kind == Kind.EXEC:
            return np.asarray(keep, dtype=bool)
        bit = int(_VIS_OF_KIND.get(Kind(kind), 0))
        seen = np.array([bool(watched.get(int(c), 0) & bit) for c in recs["hdr"]["cgroup_id"].tolist()],
                        dtype=bool)  # fmt: skip
        host = (flags & Flag.HOST) != 0
        return np.asarray(keep & (host | ~seen), dtype=bool)

    # ---- the control topics ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Follow the control topics until `stop`; every change is cached and reconciled."""

        async def changed(n: int) -> None:
            self.applied += n
            await asyncio.to_thread(self.cache.save, self.view)
            self._dirty = True
            self.reconcile()

        await follow_control(self.view, self.topics.all(), broker=self.config.broker,
                             request_timeout_ms=self.config.request_timeout_ms, stop=stop, on_change=changed,
                             unreachable="control topics not readable yet (enforcing from the local cache)")
