"""The kernel monitors: bpf/process.bpf.c, file.bpf.c, net.bpf.c and cap.bpf.c loaded and
attached, each draining its own ring buffer into Batches (sensor.drain).

Each is constructed with the pin directory and the host visibility bits, and offers
`watch(cgroup_id, visibility)`, `drain.poll()`, `close()`. Every object
pins the same `as_watched` and `as_drops` maps in the pin directory, so one `watch()`
sets a cgroup's visibility for every monitor (the value is the whole bit set, last
writer wins: watch once with all the bits the workload wants).

A monitor that the running kernel refuses raises `MonitorUnavailable` with the reason;
`open_monitors` collects those so the sensor can say at start-up what it could not load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, Protocol

from enforcer.errors import ArmorstreamError
from enforcer.records import Visibility
from sensor import libbpf
from sensor.drain import BPF_OUTPUT, Drain, open_ring
from sensor.libbpf import PIN_ROOT, BpfError, Object

__all__ = [
    "MONITORS",
    "CapMonitor",
    "FileMonitor",
    "Loaded",
    "Monitor",
    "MonitorUnavailable",
    "NetMonitor",
    "ProcessMonitor",
    "Unavailable",
    "ensure_tracefs",
    "open_monitors",
]

TRACEFS: Final = Path("/sys/kernel/tracing")
LSM_LIST: Final = Path("/sys/kernel/security/lsm")

# Program selection before load (libbpf.Object loads every program otherwise).
_find_prog = libbpf._fn("bpf_object__find_program_by_name", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_set_autoload = libbpf._fn("bpf_program__set_autoload", ctypes.c_int, ctypes.c_void_p, ctypes.c_bool)


PORTABLE_OBJECT: Final = "{}.portable.bpf.o"  # bpf/Makefile: built with -DAS_PORTABLE


class MonitorUnavailable(ArmorstreamError):
    """The running kernel refused a monitor; `reason` says why, in a sentence an operator can act on."""

    def __init__(self, monitor: str, reason: str) -> None:
        self.monitor = monitor
        self.reason = reason
        super().__init__(f"{monitor} monitor not loadable on this kernel: {reason}")


@dataclass(frozen=True, slots=True)
class Unavailable:
    monitor: str
    reason: str


def ensure_tracefs(path: Path = TRACEFS) -> None:
    """Mount tracefs unless one is mounted: libbpf resolves syscall tracepoint ids through it."""
    with open("/proc/mounts") as f:
        if any(line.split()[2] == "tracefs" for line in f):
            return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"tracefs", str(path).encode(), b"tracefs", 0, None) != 0:
        raise BpfError(f"mount tracefs at {path}", ctypes.get_errno())


class Monitor:
    """One monitor object: open, set knobs, pin the shared maps and its ring, load, attach.

    `programs` lists the programs to load (None: all); `hooks` after start-up names what
    was attached, for the sensor's start-up report.
    """

    NAME: ClassVar[str]
    OBJECT: ClassVar[str]
    RING: ClassVar[str]
    VISIBILITY: ClassVar[Visibility]

    def __init__(
        self,
        *,
        pin_dir: Path = PIN_ROOT,
        host_visibility: int = 0,  # enum as_visibility bits for host tasks
        objects: Path = BPF_OUTPUT,
        high_water: int = 4 << 20,
        ring_bytes: int | None = None,  # ring buffer size; default: as compiled (4 MiB)
        portable: bool | None = None,  # None: the plain-load build, else the helper-read one
    ) -> None:
        fallback = objects / PORTABLE_OBJECT.format(self.OBJECT.removesuffix(".bpf.o"))
        self.path = fallback if portable else objects / self.OBJECT
        if not self.path.exists():
            raise BpfError(f"{self.path} not built (run: make -C bpf)", errno.ENOENT)
        ensure_tracefs()
        # How kernel structs are read (bpf/cast.bpf.h): plain loads need bpf_rdonly_cast (6.2).
        self.reads = "helper reads" if portable else "plain loads"
        try:
            self.obj = self._load(pin_dir, host_visibility, ring_bytes, self._programs())
        except (BpfError, MonitorUnavailable) as e:
            if portable is not None or not fallback.exists():
                raise
            self.path = fallback  # an older kernel: the same monitor with a helper call per field
            self.obj = self._load(pin_dir, host_visibility, ring_bytes, self._programs())
            self.reads = f"helper reads (the plain-load build was refused: {e})"
        try:
            self.watched = self.obj.map("as_watched")
            self.drain = Drain(open_ring([self.obj.map(self.RING)], high_water), self.obj.map("as_drops"))
        except BaseException:
            self.obj.close()
            raise

    def _programs(self) -> list[str] | None:
        return None

    def _load(
        self, pin_dir: Path, host_visibility: int, ring_bytes: int | None, programs: list[str] | None
    ) -> Object:
        obj = Object(self.path)
        try:
            obj.set_global("as_host_visible", host_visibility.to_bytes(4, "little"))
            self._configure(obj)
            if ring_bytes is not None:
                obj.map(self.RING).set_max_entries(ring_bytes)
            if programs is not None:
                for name in obj.programs():
                    prog = _find_prog(obj.ptr, name.encode())
                    if _set_autoload(prog, name in programs) < 0:
                        raise BpfError(f"set autoload of {name}", errno.EINVAL, obj.name)
            obj.pin_maps(pin_dir, ["as_watched", "as_drops", self.RING])
            obj.load()
            for name in programs if programs is not None else obj.programs():
                obj.attach(name)
        except BaseException:
            obj.close()
            raise
        return obj

    def _configure(self, obj: Object) -> None:
        """Subclasses set their own read-only knobs here (before load)."""

    @property
    def hooks(self) -> list[str]:
        return [link.name for link in self.obj.links]

    def watch(self, cgroup_id: int, visibility: Visibility | None = None) -> None:
        """Watch a cgroup (v2 id) with these visibility bits (default: this monitor's own)."""
        bits = self.VISIBILITY if visibility is None else visibility
        self.watched.update(cgroup_id.to_bytes(8, "little"), int(bits).to_bytes(4, "little"))

    def unwatch(self, cgroup_id: int) -> bool:
        return self.watched.delete(cgroup_id.to_bytes(8, "little"))

    def close(self) -> None:
        self.drain.ring.close()
        self.obj.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessMonitor(Monitor):
    """exec, fork and exit of watched cgroups (tp_btf: needs no tracefs, but mounting it is harmless).

    Maps are pinned in `pin_dir`, so a restarted sensor finds the watched set, the drop
    counters and any unread records where it left them.
    """

    NAME = "process"
    OBJECT = "process.bpf.o"
    RING = "as_proc_rb"
    VISIBILITY = Visibility.PROCESS


class FileMonitor(Monitor):
    """open/creat/openat/openat2 with absolute path, flags, mode, result, inode, device, owner."""

    NAME = "file"
    OBJECT = "file.bpf.o"
    RING = "as_file_rb"
    VISIBILITY = Visibility.FILE


class NetMonitor(Monitor):
    """socket, connect, bind, listen, accept/accept4: family, type, protocol, addresses, ports, result."""

    NAME = "network"
    OBJECT = "net.bpf.o"
    RING = "as_net_rb"
    VISIBILITY = Visibility.NETWORK


class CapMonitor(Monitor):
    """Capability checks, one record per (process, capability, granted/denied) per `window_ns`.

    Two hooks, tried in order: the `capability:cap_capable` tracepoint (tp_btf, Linux 6.14+:
    sees grants and denials) and the bpf LSM `capable` hook (older kernels; needs BPF
    trampolines and `bpf` in the active LSM list; it only sees checks the capability module
    granted). `variant` forces one of them ("tp" or "lsm").
    """

    NAME = "capabilities"
    OBJECT = "cap.bpf.o"
    RING = "as_cap_rb"
    VISIBILITY = Visibility.CAPABILITIES
    VARIANTS: ClassVar[dict[str, str]] = {"tp": "as_cap_tp", "lsm": "as_cap_lsm"}

    def __init__(
        self,
        *,
        pin_dir: Path = PIN_ROOT,
        host_visibility: int = 0,
        objects: Path = BPF_OUTPUT,
        high_water: int = 4 << 20,
        ring_bytes: int | None = None,
        window_ns: int = 1_000_000_000,  # 0: report every check
        variant: str | None = None,
        portable: bool | None = None,
    ) -> None:
        if variant is not None and variant not in self.VARIANTS:
            raise ArmorstreamError(
                f"unknown capability hook {variant!r} (choose from {sorted(self.VARIANTS)})"
            )
        self.window_ns = window_ns
        self._variants = [variant] if variant else list(self.VARIANTS)
        self.variant = ""
        super().__init__(
            pin_dir=pin_dir,
            host_visibility=host_visibility,
            objects=objects,
            high_water=high_water,
            ring_bytes=ring_bytes,
            portable=portable,
        )

    def _configure(self, obj: Object) -> None:
        obj.set_global("as_cap_window_ns", self.window_ns.to_bytes(8, "little"))

    def _load(
        self, pin_dir: Path, host_visibility: int, ring_bytes: int | None, programs: list[str] | None
    ) -> Object:
        reasons = []
        for variant in self._variants:
            prog = self.VARIANTS[variant]
            try:
                obj = super()._load(pin_dir, host_visibility, ring_bytes, [prog])
            except BpfError as e:
                reasons.append(f"{_SECTIONS[prog]}: {_why(prog, e)}")
                continue
            if variant == "lsm" and not _bpf_lsm_active():
                obj.close()
                reasons.append(
                    f"{_SECTIONS[prog]}: attached, but 'bpf' is not in {LSM_LIST}, so it never runs"
                )
                continue
            self.variant = variant
            return obj
        raise MonitorUnavailable(self.NAME, "; ".join(reasons))


_SECTIONS: Final = {"as_cap_tp": "tp_btf/cap_capable", "as_cap_lsm": "lsm/capable"}


def _why(prog: str, e: BpfError) -> str:
    if prog == "as_cap_lsm" and e.errno == errno.EPERM:
        return f"{e} (the kernel refused a BPF trampoline: no BPF LSM/fentry support here)"
    if prog == "as_cap_tp" and e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
        return f"{e} (no capability:cap_capable tracepoint: added in Linux 6.14)"
    return str(e)


def _bpf_lsm_active() -> bool:
    try:
        return "bpf" in LSM_LIST.read_text().strip().split(",")
    except OSError:
        return True  # securityfs not mounted: cannot tell; the load itself succeeded


class Loaded(Protocol):
    """What the sensor needs from any started monitor (ProcessMonitor included)."""

    drain: Drain

    def watch(self, cgroup_id: int, visibility: Visibility = ...) -> None: ...
    def unwatch(self, cgroup_id: int) -> bool: ...
    def close(self) -> None: ...


# Visibility names as in KubeArmor's kubearmor-visibility annotation.
MONITORS: Final[dict[str, Callable[..., Loaded]]] = {
    "process": ProcessMonitor,
    "file": FileMonitor,
    "network": NetMonitor,
    "capabilities": CapMonitor,
}


def open_monitors(
    names: list[str] | None = None,
    *,
    pin_dir: Path = PIN_ROOT,
    host_visibility: int = 0,
    objects: Path = BPF_OUTPUT,
) -> tuple[dict[str, Loaded], list[Unavailable]]:
    """Start each named monitor (default: all, keyed by MONITORS' names); those the kernel
    refuses are returned with their reasons instead of failing the sensor."""
    started: dict[str, Loaded] = {}
    refused: list[Unavailable] = []
    for name in names if names is not None else list(MONITORS):
        if name not in MONITORS:
            raise ArmorstreamError(f"unknown monitor {name!r} (choose from {', '.join(MONITORS)})")
        try:
            started[name] = MONITORS[name](pin_dir=pin_dir, host_visibility=host_visibility, objects=objects)
        except MonitorUnavailable as e:
            refused.append(Unavailable(e.monitor, e.reason))
        except BaseException:
            for m in started.values():
                m.close()
            raise
    return started, refused
