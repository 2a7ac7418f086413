"""Loads the enforcement objects, pins their maps and links, and applies compiled diffs.

Compilation is enforcer.compiler's job (pure); this module only moves bytes into and out
of the kernel. Every map and link is pinned under one directory (default
/sys/fs/bpf/armorstream/enforce), so enforcement outlives the sensor process: a sensor
killed with -9 leaves the programs attached and the rules in force, and the next one
reuses the same maps, reads the rules back (`current`) and diffs against them.

`PolicyCache` keeps the last policy set on local disk, so a restarted sensor can
recompile while the broker is away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from enforcer.backends import Probe, lsm_list
from enforcer.compiler import (
    MAP_WL,
    RULE_MAPS,
    WL_KEY,
    WL_VAL,
    CompiledSet,
    Diff,
    compile_workload,
    diff,
    next_generation,
)
from enforcer.errors import ArmorstreamError
from enforcer.fanotify import fanotify_available
from enforcer.policy.model import Policy
from enforcer.workload import DefaultPosture, Posture
from sensor import libbpf
from sensor.libbpf import PIN_ROOT, BpfError, Link, Map, Object, RingBuffer, ensure_bpffs

__all__ = [
    "ENFORCE_PIN",
    "LSM_OBJ",
    "NETBLOCK_OBJ",
    "ApplyError",
    "EnforceError",
    "KernelRules",
    "PolicyCache",
    "probe",
    "unpin_all",
]

ROOT: Final = Path(__file__).resolve().parent.parent
NETBLOCK_OBJ: Final = ROOT / "bpf" / ".output" / "netblock.bpf.o"
LSM_OBJ: Final = ROOT / "bpf" / ".output" / "lsm.bpf.o"
ENFORCE_PIN: Final = PIN_ROOT / "enforce"
EVENTS_MAP: Final = "as_enf_events"
SHARED_MAPS: Final = frozenset({"as_drops", "as_watched"})  # bpf/maps.bpf.h, pinned by the sensor

# Pending in sensor/libbpf.py (requested): cgroup attach and link pinning.
_attach_cgroup = libbpf._fn("bpf_program__attach_cgroup", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_find_prog = libbpf._fn("bpf_object__find_program_by_name", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_link_pin = libbpf._fn("bpf_link__pin", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)


class EnforceError(ArmorstreamError):
    """Loading, attaching or updating the enforcement programs failed."""


class ApplyError(EnforceError):
    """A diff was applied only in part: `done` of `total` operations, then `cause`."""

    def __init__(self, cgroup_id: int, done: int, total: int, cause: Exception) -> None:
        self.cgroup_id, self.done, self.total, self.cause = cgroup_id, done, total, cause
        super().__init__(f"cgroup {cgroup_id}: applied {done} of {total} map operations, then: {cause}")


@dataclass
class _Loaded:
    obj: Object
    maps: dict[str, Map]


class KernelRules:
    """The enforcement objects in the kernel, and the rule maps they share (pinned)."""

    def __init__(
        self,
        objects: Sequence[Path] = (NETBLOCK_OBJ,),
        pin_dir: Path = ENFORCE_PIN,
        shared_pin_dir: Path = PIN_ROOT,
    ) -> None:
        self.pin_dir = pin_dir
        self.shared_pin_dir = shared_pin_dir  # maps.bpf.h's maps (as_drops), shared with the sensor
        self.paths = list(objects)
        self.loaded: list[_Loaded] = []
        self.maps: dict[str, Map] = {}

    def load(self) -> KernelRules:
        ensure_bpffs()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for path in self.paths:
            if not path.exists():
                raise EnforceError(f"{path} is not built (run `make -C bpf`)")
            obj = Object(path)
            try:
                # A compatible pinned map is reused: rules and counters survive restarts.
                names = [m.name for m in obj.maps()]
                obj.pin_maps(self.shared_pin_dir, [n for n in names if n in SHARED_MAPS])
                obj.pin_maps(self.pin_dir, [n for n in names if n not in SHARED_MAPS])
                obj.load()
            except BpfError as e:
                obj.close()
                raise EnforceError(f"load {path.name}: {e}") from e
            maps = {m.name: m for m in obj.maps() if m.name.startswith("as_")}
            self.loaded.append(_Loaded(obj, maps))
            for name, m in maps.items():
                self.maps.setdefault(name, m)
        return self

    # -- attach --------------------------------------------------------------------------

    def attach_cgroup(self, cgroup: Path, pin: bool = True) -> list[Path]:
        """Attach every cgroup program to `cgroup` (its descendants included).

        With `pin`, each link is pinned as link-<cgroup id>-<program>, replacing an
        older pin of the same name only after the new link is in place.
        """
        pins: list[Path] = []
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            cgid = os.fstat(fd).st_ino
            for ld in self.loaded:
                for prog in ld.obj.programs():
                    p = _find_prog(ld.obj.ptr, prog.encode())
                    ctypes.set_errno(0)
                    ptr = _attach_cgroup(p, fd)
                    if not ptr:
                        raise EnforceError(
                            f"attach {ld.obj.name}:{prog} to {cgroup}: {os.strerror(ctypes.get_errno())}"
                        )
                    link = Link(ptr, prog)
                    ld.obj.links.append(link)
                    if pin:
                        pins.append(self._pin(ptr, f"link-{cgid}-{prog}"))
        finally:
            os.close(fd)
        return pins

    def attach_lsm(self, pin: bool = True) -> list[Path]:
        """Attach the BPF-LSM programs (objects named lsm*); pinned links outlive the sensor."""
        pins: list[Path] = []
        for ld in self.loaded:
            if not ld.obj.name.startswith("lsm"):
                continue
            for prog in ld.obj.programs():
                try:
                    link = ld.obj.attach(prog)
                except BpfError as e:
                    raise EnforceError(f"attach {ld.obj.name}:{prog}: {e}") from e
                if pin and link._ptr:
                    pins.append(self._pin(link._ptr, f"link-lsm-{prog}"))
        return pins

    def _pin(self, ptr: int, name: str) -> Path:
        final = self.pin_dir / name
        tmp = self.pin_dir / f"new-{name}"  # bpffs names take no dots
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        ret = _link_pin(ptr, str(tmp).encode())
        if ret < 0:
            raise EnforceError(f"pin link {tmp}: {os.strerror(-ret)}")
        os.replace(tmp, final)  # an older pinned link of that name detaches now
        return final

    # -- rules ---------------------------------------------------------------------------

    def apply(self, d: Diff, cgroup_id: int = 0) -> int:
        """Puts, then deletes, in the diff's order; ops on maps no loaded object has are skipped."""
        ops = [op for op in (*d.puts, *d.deletes) if op.map in self.maps]
        for i, op in enumerate(ops):
            try:
                m = self.maps[op.map]
                if op.value is None:
                    m.delete(op.key)
                else:
                    m.update(op.key, op.value)
            except BpfError as e:
                raise ApplyError(cgroup_id, i, len(ops), e) from e
        return len(ops)

    def current(self, cgroup_id: int) -> CompiledSet | None:
        """The workload's rule set as the kernel holds it (maps only), or None."""
        wl = self.maps.get(MAP_WL)
        raw = wl.lookup(WL_KEY.pack(cgroup_id)) if wl is not None else None
        if raw is None:
            return None
        gen = WL_VAL.unpack(raw)[0]
        prefix = WL_KEY.pack(cgroup_id) + gen.to_bytes(4, "little")
        maps: dict[str, dict[bytes, bytes]] = {MAP_WL: {WL_KEY.pack(cgroup_id): raw}}
        for name in RULE_MAPS:
            m = self.maps.get(name)
            entries: dict[bytes, bytes] = {}
            if m is not None:
                for k in m.keys():  # noqa: SIM118 - Map is not a dict
                    if k.startswith(prefix):
                        v = m.lookup(k)
                        if v is not None:
                            entries[k] = v
            maps[name] = entries
        return CompiledSet(cgroup_id, gen, maps)

    def kernel_view(self, cs: CompiledSet) -> CompiledSet:
        """`cs` without the maps no loaded object has (what `current` can read back)."""
        maps = {n: (v if n in self.maps else {}) for n, v in cs.maps.items()}
        return CompiledSet(cs.cgroup_id, cs.generation, maps, cs.rules, cs.user_rules, cs.limits)

    def set_rules(
        self, policies: Iterable[Policy], cgroup_id: int, posture: DefaultPosture | None = None
    ) -> CompiledSet:
        """Compile and install one workload's rules with no unprotected moment; returns the new set."""
        old = self.current(cgroup_id)
        new = compile_workload(policies, cgroup_id, posture, next_generation(old))
        self.apply(diff(old, self.kernel_view(new)), cgroup_id)
        return new

    def remove(self, cgroup_id: int) -> None:
        old = self.current(cgroup_id)
        if old is not None:
            self.apply(diff(old, None), cgroup_id)

    def events(self) -> RingBuffer:
        """Ring buffer of denial/audit records (as_net_rec ... with AS_F_BLOCKED/AUDITED)."""
        return RingBuffer([self.maps[EVENTS_MAP]])

    def close(self) -> None:
        """Close our handles: unpinned links detach, pinned links and maps stay in force.

        (libbpf's link destroy only closes the fd; a pin keeps the kernel link alive.)
        """
        for ld in self.loaded:
            ld.obj.close()
        self.loaded.clear()
        self.maps.clear()


def probe(lsm_obj: Path = LSM_OBJ, netblock_obj: Path = NETBLOCK_OBJ) -> Probe:
    """What this kernel can enforce with (loads each object once, then unloads it)."""
    notes: list[str] = []
    lsm_path = Path("/sys/kernel/security/lsm")
    if not lsm_path.exists():
        with contextlib.suppress(OSError):
            subprocess.run(["mount", "-t", "securityfs", "none", "/sys/kernel/security"], check=False)
    lsm_active = "bpf" in lsm_list()

    def loads(path: Path, attach: bool) -> bool:
        if not path.exists():
            notes.append(f"{path.name} not built")
            return False
        try:
            with Object(path) as obj:
                obj.load()
                if attach:
                    obj.attach_all()
            return True
        except BpfError as e:
            notes.append(f"{path.name}: {e}")
            return False

    fan = fanotify_available()
    if fan is not None:
        notes.append(fan)
    return Probe(
        lsm_active=lsm_active,
        lsm_loads=lsm_active and loads(lsm_obj, attach=True),
        cgroup_loads=loads(netblock_obj, attach=False),
        fanotify=fan is None,
        notes=tuple(notes),
    )


def unpin_all(pin_dir: Path = ENFORCE_PIN) -> None:
    """Remove every pin: links detach and maps go away once no program holds them."""
    if not pin_dir.exists():
        return
    for p in sorted(pin_dir.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()


class PolicyCache:
    """The last policy set and postures, on local disk (atomic replace; survives kill -9)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, policies: Sequence[Policy], postures: dict[int, DefaultPosture] | None = None) -> None:
        doc: dict[str, Any] = {
            "policies": [p.raw for p in policies],
            "postures": {
                str(cg): [str(p.file), str(p.network), str(p.capabilities)]
                for cg, p in (postures or {}).items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> tuple[list[Policy], dict[int, DefaultPosture]]:
        from enforcer.policy.parse import parse_policy

        try:
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return [], {}
        except orjson.JSONDecodeError as e:
            raise EnforceError(f"policy cache {self.path} is corrupt: {e}") from e
        policies = [parse_policy(raw, file=str(self.path)) for raw in doc.get("policies", [])]
        postures = {
            int(cg): DefaultPosture(Posture(f), Posture(n), Posture(c))
            for cg, (f, n, c) in doc.get("postures", {}).items()
        }
        return policies, postures
