"""The sensor agent: monitors -> drain -> envelope -> shipper -> Kafka, and the watched set.

One asyncio loop does everything, in this order each tick:

    consume every monitor's ring buffer (bytes, no per-record objects)
    split each kind's bytes by cgroup id (numpy, one stable sort), chunk to the envelope limit
    encode_batch(kind, records, node, seq = the shipper's per-node sequence)
    Shipper.submit(key = cgroup id, 8 bytes little-endian): one container, one partition, in order
    every refresh interval: re-walk the cgroup tree, watch new containers, unwatch gone ones

Between ticks it sleeps for the poll interval, unless a ring reached its high-water mark,
in which case it drains again at once. Stopping drains the rings one last time, then the
shipper flushes to Kafka or, if the broker is away, to the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from enforcer.control import (
    DEFAULT_PREFIX,
    CgroupRecord,
    ControlTopics,
    ControlView,
    encode,
    encode_key,
)
from enforcer.control import cgroup_key as cgroup_index_key  # this module's cgroup_key keys raw batches
from enforcer.envelope import FIXED_LEN, NODE_MAX, encode_batch
from enforcer.errors import ArmorstreamError
from enforcer.records import DTYPES, Visibility
from sensor.control_follow import follow_control
from sensor.drain import BPF_OUTPUT, Drain, boot_wall_ns
from sensor.identity import CgroupIndex, Identity, IdentityError, Resolver
from sensor.libbpf import PIN_ROOT, BpfError, Map, ensure_bpffs
from sensor.metrics import SensorMetrics
from sensor.shipper import RAW_TOPIC, Shipper, ShipperConfig, ShipperState
from sensor.spool import Spool, SpoolConfig

if TYPE_CHECKING:
    from sensor.enforcement_agent import EnforcementAgent

__all__ = [
    "MONITORS",
    "Agent",
    "AgentConfig",
    "AgentError",
    "CgroupPublisher",
    "ControlFollower",
    "MonitorStatus",
    "StartupReport",
    "build_objects",
    "cgroup_key",
    "parse_visibility",
    "split_by_cgroup",
]

log = logging.getLogger(__name__)

ALL_VISIBILITY: Final = Visibility.PROCESS | Visibility.FILE | Visibility.NETWORK | Visibility.CAPABILITIES
NO_VISIBILITY: Final = Visibility(0)

# (name, visibility bit, "module:class"). Each class takes pin_dir= and host_visibility= and
# has .drain (sensor.drain.Drain), .watch(cgroup_id, visibility), .unwatch(cgroup_id), .close().
MONITORS: Final = (
    ("process", Visibility.PROCESS, "sensor.monitors:ProcessMonitor"),
    ("file", Visibility.FILE, "sensor.monitors:FileMonitor"),
    ("network", Visibility.NETWORK, "sensor.monitors:NetMonitor"),
    ("capabilities", Visibility.CAPABILITIES, "sensor.monitors:CapMonitor"),
)


class AgentError(ArmorstreamError):
    """The sensor cannot run: nothing could be attached, or its settings are unusable."""


_VIS_WORDS: Final = {m.name.lower(): m for m in Visibility if m.name}


def parse_visibility(text: str, *, strict: bool = True) -> Visibility:
    """KubeArmor's spelling, "process,file,network,capabilities" or "none", to bits. Unknown
    words raise (strict, for our own options) or are skipped (annotations written by users)."""
    out = NO_VISIBILITY
    for word in (w.strip().lower() for w in text.split(",")):
        if word in ("", "none"):
            continue
        if word in _VIS_WORDS:
            out |= _VIS_WORDS[word]
        elif strict:
            raise AgentError(f"{word!r}: use any of {', '.join(_VIS_WORDS)} or none")
        else:
            log.warning("ignoring unknown visibility %r", word)
    return out


class Monitor(Protocol):
    drain: Drain

    def watch(self, cgroup_id: int, visibility: Visibility = ...) -> None: ...

    def unwatch(self, cgroup_id: int) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AgentConfig:
    broker: str
    node: str
    spool_dir: Path
    topic: str = RAW_TOPIC
    visibility: Visibility = ALL_VISIBILITY  # for watched cgroups
    host_visibility: Visibility = NO_VISIBILITY  # for host processes
    # Cgroups to watch (absolute, or relative to the cgroup2 mount). Empty: every container
    # the identity resolver finds in the cgroup tree, kept up to date while it runs.
    watch_cgroups: tuple[Path, ...] = ()
    spool_max_bytes: int = 1 << 30
    metrics_port: int | None = None  # None: no HTTP endpoint; 0: any free port
    metrics_addr: str = "0.0.0.0"
    poll_interval_s: float = 0.05
    refresh_interval_s: float = 2.0
    pin_dir: Path = PIN_ROOT
    ring_bytes: int | None = None  # per monitor ring buffer; None: as compiled
    # An envelope must fit the shipper's produce batch (1 MiB by default) with room to spare.
    max_envelope_bytes: int = 512 << 10
    compression: str = "auto"
    request_timeout_ms: int = 10_000
    flush_timeout_s: float = 10.0
    runtime: str | None = None  # for cgroupfs-driver paths; None: detected from runtime sockets
    # Publish (node, cgroup id) -> container id to <prefix>control.cgroups for the stream's join.
    publish_cgroups: bool = True
    control_prefix: str = DEFAULT_PREFIX
    # Follow the control topics: a namespace's kubearmor-visibility annotation overrides
    # `visibility` for its containers ("none" stops watching them).
    namespace_visibility: bool = False
    monitors: tuple[tuple[str, Visibility, str], ...] = MONITORS
    # Enforce the policies the control topics bind to the watched cgroups (sensor.enforcement_agent);
    # the local copy of the control tables goes to state_dir (default: next to the spool).
    enforce: bool = False
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.node or len(self.node.encode()) > NODE_MAX:
            raise AgentError(f"node name must be 1..{NODE_MAX} bytes, got {self.node!r}")
        if self.max_envelope_bytes < FIXED_LEN + NODE_MAX + max(d.itemsize for d in DTYPES.values()):
            raise AgentError(f"max_envelope_bytes {self.max_envelope_bytes} cannot hold one record")
        if self.poll_interval_s <= 0 or self.refresh_interval_s <= 0:
            raise AgentError("poll and refresh intervals must be positive")


@dataclass(frozen=True, slots=True)
class MonitorStatus:
    name: str
    attached: bool
    detail: str  # programs attached, or why it could not be


@dataclass(slots=True)
class StartupReport:
    node: str
    broker: str
    topic: str
    connected: bool
    spool_dir: Path
    spool_pending_batches: int
    visibility: Visibility
    host_visibility: Visibility
    monitors: list[MonitorStatus]
    watching: dict[int, Identity | None]  # cgroup id -> identity
    mode: str  # "containers" or "cgroups"
    missing: list[str] = field(default_factory=list)  # --watch-cgroup paths that do not exist
    metrics_url: str | None = None

    def lines(self) -> list[str]:
        out = [f"armorstream sensor on node {self.node}"]
        for m in self.monitors:
            out.append(f"  monitor {m.name:<12} {'attached' if m.attached else 'NOT attached'}: {m.detail}")
        vis = _vis_names(self.visibility)
        out.append(f"  visibility      containers: {vis}; host: {_vis_names(self.host_visibility)}")
        what = "every container in the cgroup tree" if self.mode == "containers" else "cgroups given"
        out.append(f"  watching        {len(self.watching)} cgroup(s) ({what})")
        for cgid, ident in sorted(self.watching.items())[:20]:
            out.append(f"    {cgid:>12}  {_describe(ident)}")
        if len(self.watching) > 20:
            out.append(f"    ... and {len(self.watching) - 20} more")
        for p in self.missing:
            out.append(f"    not found: {p} (will retry)")
        state = "connected" if self.connected else "not reachable: spooling until it is"
        out.append(f"  broker          {self.broker} topic {self.topic}: {state}")
        out.append(f"  spool           {self.spool_dir} ({self.spool_pending_batches} batches pending)")
        out.append(f"  metrics         {self.metrics_url or 'off'}")
        return out


def _vis_names(v: Visibility) -> str:
    return ",".join(m.name.lower() for m in Visibility if m.name and v & m) or "none"


def _describe(ident: Identity | None) -> str:
    if ident is None:
        return "(unknown cgroup)"
    if ident.host:
        return f"host {ident.path}"
    pod = f" pod {ident.pod_uid} ({ident.qos})" if ident.pod_uid else ""
    return f"{ident.runtime or 'container'} {ident.container_id[:12] if ident.container_id else ''}{pod}"


def build_objects(bpf_dir: Path = BPF_OUTPUT.parent) -> str | None:
    """Build the BPF objects against the running kernel's BTF (make is incremental, so this is
    cheap when they are current). Returns why it failed, or None."""
    if not (bpf_dir / "Makefile").exists():
        return None  # installed without sources: objects must have been built at install
    for tool in ("make", "clang", "bpftool"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install make clang llvm libbpf-dev bpftool)"
    try:
        r = subprocess.run(["make", "-s", "-C", str(bpf_dir)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "make -C bpf took more than 300 s"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["make failed"])[-1]
    return None


def cgroup_key(cgroup_id: int) -> bytes:
    """The Kafka key of a cgroup's batches: its id, 8 bytes little-endian."""
    return cgroup_id.to_bytes(8, "little")


def split_by_cgroup(kind: int, raw: bytes, max_records: int) -> list[tuple[int, bytes, int]]:
    """(cgroup id, records, count) per cgroup of a drained batch, each cgroup's records in
    ring order, cut into pieces of at most max_records. One stable sort; no per-record Python."""
    dtype = DTYPES[kind]
    recs = np.frombuffer(raw, dtype=dtype)
    n = len(recs)
    if n == 0:
        return []
    cg = recs["hdr"]["cgroup_id"]
    if (cg == cg[0]).all():
        groups: Iterable[tuple[int, np.ndarray[Any, Any]]] = [(int(cg[0]), recs)]
    else:
        order = np.argsort(cg, kind="stable")
        ordered = recs[order]  # one copy, grouped by cgroup, ring order kept inside each group
        cuts = np.flatnonzero(np.diff(cg[order])) + 1
        starts, ends = np.r_[0, cuts], np.r_[cuts, n]
        ids = ordered["hdr"]["cgroup_id"][starts].tolist()
        groups = [(int(c), ordered[s:e]) for c, s, e in zip(ids, starts, ends, strict=True)]
    out = []
    for cgid, part in groups:
        if len(part) == n and n <= max_records:
            out.append((cgid, raw, n))  # the common case: one container, no copy
            continue
        for s in range(0, len(part), max_records):
            piece = part[s : s + max_records]
            out.append((cgid, piece.tobytes(), len(piece)))
    return out


class CgroupPublisher:
    """Publishes this node's cgroup id -> container id index, one record per produce batch
    (tansu's end offsets go wrong after multi-record batches). Runs beside the drain loop so
    an absent broker never stalls draining; unsent changes are kept and retried."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topic = ControlTopics(config.control_prefix).cgroups
        self.pending: dict[int, Identity | None] = {}  # cgroup id -> identity; None: tombstone
        self.published = 0
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None

    def changed(self, cgroup_id: int, ident: Identity | None) -> None:
        if ident is None or not ident.host:
            self.pending[cgroup_id] = ident
            self._wake.set()

    def record(self, cgroup_id: int, ident: Identity | None) -> tuple[bytes, bytes | None]:
        """Key and value on the stream's cgroup index (enforcer.control.CgroupRecord)."""
        key = encode_key(cgroup_index_key(self.config.node, cgroup_id))
        if ident is None or ident.container_id is None:
            return key, None
        return key, encode(CgroupRecord(self.config.node, cgroup_id, ident.container_id, ident.pod_uid or "",
                                        ident.runtime or "", ident.path))  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.pending and not await self._send():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)  # broker away: retry later
                continue
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        if self.pending:
            await self._send()

    async def _send(self) -> bool:
        try:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.config.broker, acks="all", linger_ms=0,
                                            request_timeout_ms=self.config.request_timeout_ms)  # fmt: skip
                self._producer = producer  # close() stops it, started or not
                await producer.start()
            for cgid in list(self.pending):
                key, value = self.record(cgid, self.pending[cgid])
                await self._producer.send_and_wait(self.topic, value, key=key)
                del self.pending[cgid]
                self.published += 1
            return True
        except (KafkaError, OSError, TimeoutError) as e:
            log.info("cannot publish the cgroup index to %s yet: %s", self.topic, e)
            await self.close()
            return False

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(producer.stop(), 5)


class ControlFollower:
    """Folds the containers and namespaces control topics into a ControlView, for the
    per-namespace visibility. Retries while the broker is away; calls `changed` after
    every poll that applied something."""

    def __init__(self, config: AgentConfig, changed: Callable[[], None]) -> None:
        self.config = config
        self.view = ControlView(topics=ControlTopics(config.control_prefix))
        self.changed = changed
        self.applied = 0

    def visibility(self, ident: Identity | None, default: Visibility) -> Visibility:
        """The namespace's annotation for a known container, else `default`."""
        if ident is None or ident.container_id is None:
            return default
        c = self.view.containers.get(ident.container_id)
        ns = self.view.namespaces.get(c.namespace) if c is not None else None
        if ns is None or ns.visibility is None:
            return default
        return parse_visibility(ns.visibility, strict=False)

    async def run(self, stop: asyncio.Event) -> None:
        t = self.view.topics

        async def changed(n: int) -> None:
            self.applied += n
            self.changed()

        await follow_control(self.view, [t.containers, t.namespaces], broker=self.config.broker,
                             request_timeout_ms=self.config.request_timeout_ms, stop=stop,
                             on_change=changed)  # fmt: skip


class Agent:
    """Owns the monitors, the identity resolver, the spool, the shipper and the metrics."""

    def __init__(self, config: AgentConfig, metrics: SensorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else SensorMetrics(config.node)
        self.monitors: dict[str, Monitor] = {}
        self.statuses: list[MonitorStatus] = []
        self.watched: dict[int, int] = {}  # cgroup id -> visibility bits we put in the kernel
        self.identities: dict[int, Identity | None] = {}
        self.missing: list[str] = []
        self.ticks = 0
        self.last_drained_bytes = 0  # most bytes one ring held at the last drain
        self._spool: Spool | None = None
        self._shipper: Shipper | None = None
        self._index: CgroupIndex | None = None
        self._resolver: Resolver | None = None
        self._boot_wall = boot_wall_ns()
        self._stop_metrics: Callable[[], None] | None = None
        self._next_refresh = 0.0
        self.publisher = CgroupPublisher(config) if config.publish_cgroups else None
        self.follower = ControlFollower(config, self._refresh_soon) if config.namespace_visibility else None
        self.enforcement: EnforcementAgent | None = None
        self.enforcement_notes: list[str] = []

    @property
    def shipper(self) -> Shipper:
        if self._shipper is None:
            raise AgentError("agent not started")
        return self._shipper

    # ---- start -------------------------------------------------------------------------------
    async def start(self) -> StartupReport:
        cfg = self.config
        try:
            self._index = CgroupIndex(min_rewalk_s=min(1.0, cfg.refresh_interval_s))
        except IdentityError as e:
            raise AgentError(str(e)) from None
        self._resolver = Resolver(self._index, default_runtime=cfg.runtime)
        try:
            self._open_monitors()
            if not self.monitors:
                why = "; ".join(f"{s.name}: {s.detail}" for s in self.statuses) or "no visibility asked for"
                raise AgentError(f"no monitor could be attached ({why})")
            self._seed_watched()
            self.refresh_watched()
            if cfg.enforce:
                self._start_enforcement()
            self._spool = Spool(SpoolConfig(cfg.spool_dir, max_bytes=cfg.spool_max_bytes,
                                            segment_bytes=min(64 << 20, cfg.spool_max_bytes)))  # fmt: skip
            ship_cfg = ShipperConfig(bootstrap=cfg.broker, node=cfg.node, topic=cfg.topic,
                                     compression=cfg.compression, request_timeout_ms=cfg.request_timeout_ms)
            shipper = Shipper(ship_cfg, self._spool, self.metrics)
            await shipper.start()
            self._shipper = shipper
            if cfg.metrics_port is not None:
                self._stop_metrics = self.metrics.serve(cfg.metrics_port, cfg.metrics_addr)
        except BaseException:
            await self._close()
            raise
        port = self.metrics.port
        return StartupReport(
            node=cfg.node, broker=cfg.broker, topic=cfg.topic,
            connected=shipper.state == ShipperState.DIRECT, spool_dir=cfg.spool_dir,
            spool_pending_batches=self._spool.pending_batches, visibility=cfg.visibility,
            host_visibility=cfg.host_visibility, monitors=list(self.statuses),
            watching={c: self.identities.get(c) for c in self.watched},
            mode="cgroups" if cfg.watch_cgroups else "containers", missing=list(self.missing),
            metrics_url=f"http://{cfg.metrics_addr}:{port}/metrics" if port is not None else None,
        )  # fmt: skip

    def _open_monitors(self) -> None:
        cfg = self.config
        wanted = cfg.visibility | cfg.host_visibility
        build_error = build_objects()
        try:
            ensure_bpffs()  # pins live under /sys/fs/bpf
        except BpfError as e:
            raise AgentError(f"cannot mount the BPF filesystem for pinned maps: {e}") from None
        for name, bit, target in cfg.monitors:
            if not wanted & bit:
                continue
            module_name, cls_name = target.split(":")
            try:
                cls = getattr(importlib.import_module(module_name), cls_name)
            except (ImportError, AttributeError) as e:
                self.statuses.append(MonitorStatus(name, False, f"not available in this build ({e})"))
                continue
            kwargs: dict[str, Any] = {"pin_dir": cfg.pin_dir, "host_visibility": int(cfg.host_visibility)}
            if cfg.ring_bytes is not None:
                kwargs["ring_bytes"] = cfg.ring_bytes
            try:
                mon = cls(**kwargs)
            except BpfError as e:
                if build_error and "not built" in str(e):
                    e = BpfError(f"{e}; the build failed: {build_error}", e.errno)
                hint = " (needs root)" if e.errno == 1 and name == "process" else ""
                self.statuses.append(MonitorStatus(name, False, f"{e}{hint}"))
                continue
            except ArmorstreamError as e:
                self.statuses.append(MonitorStatus(name, False, str(e)))
                continue
            self.monitors[name] = mon
            obj = getattr(mon, "obj", None)
            progs = ", ".join(link.name for link in getattr(obj, "links", [])) or "attached"
            reads = getattr(mon, "reads", "plain loads")
            if reads != "plain loads":
                progs += f" [{reads}]"
            self.statuses.append(MonitorStatus(name, True, progs))

    @property
    def _high_water(self) -> int:
        return min((m.drain.ring.high_water for m in self.monitors.values()), default=4 << 20)

    def _watched_maps(self) -> list[Map]:
        return [m for mon in self.monitors.values() if isinstance(m := getattr(mon, "watched", None), Map)]

    def _seed_watched(self) -> None:
        """Pinned as_watched maps survive a restart: start from what they hold, so cgroups
        watched by the last run and gone since are removed by the first refresh."""
        for m in self._watched_maps():
            for k in m.keys():  # noqa: SIM118  # a BPF map, not a dict
                self.watched.setdefault(int.from_bytes(k, "little"), -1)  # -1: rewrite it

    # ---- the watched set ---------------------------------------------------------------------
    def desired(self) -> dict[int, Identity | None]:
        """cgroup id -> identity of every cgroup that should be watched now."""
        cfg = self.config
        assert self._index is not None and self._resolver is not None
        out: dict[int, Identity | None] = {}
        self.missing = []
        if cfg.watch_cgroups:
            mount = self._index.root
            for p in cfg.watch_cgroups:
                path = p if p.is_absolute() else mount / p
                try:
                    cgid = path.stat().st_ino
                except OSError:
                    self.missing.append(str(path))
                    continue
                out[cgid] = self._resolver.resolve(cgid)
            return out
        self._index.walk()
        self._resolver.forget_missing()
        for cgid in self._index.containers():
            out[cgid] = self._resolver.resolve(cgid)
        return out

    def _refresh_soon(self) -> None:
        self._next_refresh = 0.0

    def refresh_watched(self) -> tuple[int, int]:
        """Apply the diff between the kernel's watched set and `desired()`: stale keys first.
        Returns (added, removed)."""
        want = self.desired()
        default = self.config.visibility
        follow = self.follower
        bits = {c: int(follow.visibility(i, default) if follow else default) for c, i in want.items()}
        want = {c: i for c, i in want.items() if bits[c]}  # visibility "none": not watched at all
        stale = [c for c in self.watched if c not in want]
        for cgid in stale:
            for mon in self.monitors.values():
                mon.unwatch(cgid)
            del self.watched[cgid]
            if self.publisher is not None and self.identities.pop(cgid, None) is not None:
                self.publisher.changed(cgid, None)
        added = 0
        for cgid, ident in want.items():
            vis = bits[cgid]
            if self.watched.get(cgid) != vis:
                for mon in self.monitors.values():
                    mon.watch(cgid, Visibility(vis))
                added += self.watched.get(cgid) is None
                self.watched[cgid] = vis
            if self.publisher is not None and ident is not None and self.identities.get(cgid) != ident:
                self.publisher.changed(cgid, ident)
            self.identities[cgid] = ident
        if added or stale:
            log.info("watching %d cgroups (+%d, -%d)", len(self.watched), added, len(stale))
        if self.enforcement is not None:
            self.enforcement.reconcile(self.identities)
        self._next_refresh = time.monotonic() + self.config.refresh_interval_s
        return added, len(stale)

    # ---- the drain loop ----------------------------------------------------------------------
    async def drain_once(self) -> bool:
        """Move everything the rings hold now to the shipper; True if a ring hit high water."""
        cfg = self.config
        shipper = self.shipper
        full = False
        lost = 0
        self.last_drained_bytes = 0
        for mon in self.monitors.values():
            d = mon.drain
            d.ring.consume()
            full = full or d.ring.held >= d.ring.high_water
            self.last_drained_bytes = max(self.last_drained_bytes, d.ring.held)
            batches = d.take()
            lost += sum(d.lost_kernel.values())
            for b in batches:
                max_records = (cfg.max_envelope_bytes - FIXED_LEN - NODE_MAX) // DTYPES[b.kind].itemsize
                for cgid, raw, n in split_by_cgroup(b.kind, b.records, max_records):
                    env = encode_batch(b.kind, raw, node=cfg.node, seq=shipper.next_seq(),
                                       boot_wall_ns=self._boot_wall)  # fmt: skip
                    await shipper.submit(cgroup_key(cgid), env, n)
        if self.enforcement is not None:  # blocked/audited attempts from the enforcement backends
            for b in self.enforcement.take(self.watched):
                for cgid, raw, n in split_by_cgroup(b.kind, b.records, 1024):
                    env = encode_batch(b.kind, raw, node=cfg.node, seq=shipper.next_seq(),
                                       boot_wall_ns=self._boot_wall)  # fmt: skip
                    await shipper.submit(cgroup_key(cgid), env, n)
        self.metrics.counters.events_dropped_kernel = lost
        self.ticks += 1
        return full

    async def run(self, stop: asyncio.Event) -> None:
        """Drain, ship and refresh until `stop` is set; then drain once more."""
        cfg = self.config
        publishing = following = None
        if self.publisher is not None:
            publishing = asyncio.create_task(self.publisher.run(stop), name="cgroup-index")
        if self.follower is not None:
            following = asyncio.create_task(self.follower.run(stop), name="control-follower")
        enforcing = None
        if self.enforcement is not None:
            enforcing = asyncio.create_task(self.enforcement.run(stop), name="enforcement-control")
        while not stop.is_set():
            started = time.monotonic()
            full = await self.drain_once()
            if time.monotonic() >= self._next_refresh:
                try:
                    self.refresh_watched()
                except (IdentityError, BpfError) as e:
                    log.warning("watched-set refresh failed: %s", e)
                    self._next_refresh = time.monotonic() + cfg.refresh_interval_s
            if full:
                await asyncio.sleep(0)  # let the shipper run, then drain again at once
                continue
            interval = cfg.poll_interval_s
            if self.last_drained_bytes * 4 > self._high_water:
                interval /= 10  # a ring filled a quarter in one interval: drain sooner, not lose
            wait = interval - (time.monotonic() - started)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        while await self.drain_once():
            pass
        await self.drain_once()
        if following is not None:
            await following
        if enforcing is not None:
            await enforcing
        if publishing is not None and self.publisher is not None:
            try:
                await asyncio.wait_for(publishing, cfg.flush_timeout_s)
            except TimeoutError:
                log.warning("cgroup index: %d changes not published", len(self.publisher.pending))

    async def stop(self) -> None:
        """Flush to Kafka (or the spool) and release everything. Pinned maps stay."""
        await self._close()

    def _start_enforcement(self) -> None:
        from sensor.enforcement_agent import EnforcementAgent, EnforcementConfig

        cfg = self.config
        assert self._index is not None
        state = cfg.state_dir or cfg.spool_dir.parent / "enforce"
        self.enforcement = EnforcementAgent(EnforcementConfig(
            node=cfg.node, broker=cfg.broker, state_dir=state, control_prefix=cfg.control_prefix,
            pin_dir=cfg.pin_dir, cgroup_root=self._index.root, request_timeout_ms=cfg.request_timeout_ms))
        self.enforcement_notes = self.enforcement.start(self.identities)

    async def _close(self) -> None:
        if self.enforcement is not None:
            self.enforcement.close()
            self.enforcement = None
        if self.publisher is not None:
            await self.publisher.close()
        if self._shipper is not None:
            await self._shipper.stop(timeout=self.config.flush_timeout_s)
            self._shipper = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        for mon in self.monitors.values():
            mon.close()
        self.monitors.clear()
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()
