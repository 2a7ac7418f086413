"""Which enforcement backend handles which kind of operation, and the name alerts carry.

The sensor probes the kernel once at start (`Probe`: what is active, what loads) and
`select` maps that onto the four operation kinds. The names go into every alert's
`Enforcer` field, as KubeArmor writes "BPFLSM" or "AppArmor" there.

Order of preference per kind:
- process, file: BPF-LSM, else fanotify permission events, else none (audit only).
- network: BPF-LSM, else cgroup BPF (sock_create/connect4/connect6).
- capabilities: BPF-LSM (`capable`); else only net_raw, through cgroup BPF on raw sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from enforcer.policy.model import Operation

__all__ = ["Backend", "Probe", "Selection", "lsm_list", "select"]

LSM_LIST = Path("/sys/kernel/security/lsm")


class Backend(StrEnum):
    BPFLSM = "BPFLSM"
    FANOTIFY = "Fanotify"
    CGROUP = "CgroupBPF"
    NONE = ""  # nothing can enforce: Block rules are reported, not enforced


@dataclass(frozen=True, slots=True)
class Probe:
    """Facts about this kernel; the BPF load results come from the sensor, which owns libbpf."""

    lsm_active: bool = False  # "bpf" in /sys/kernel/security/lsm
    lsm_loads: bool = False  # the BPF-LSM object loaded and attached (no trampoline refusal)
    cgroup_loads: bool = False  # the cgroup network object loaded
    fanotify: bool = False  # fanotify permission events are available
    notes: tuple[str, ...] = ()  # why something is missing, for the startup log


@dataclass(frozen=True, slots=True)
class Selection:
    process: Backend
    file: Backend
    network: Backend
    capabilities: Backend
    notes: tuple[str, ...] = ()

    def enforcer(self, operation: Operation | str) -> str:
        """The alert's Enforcer field for an operation."""
        op = Operation(operation)
        return {
            Operation.PROCESS: self.process,
            Operation.FILE: self.file,
            Operation.NETWORK: self.network,
            Operation.CAPABILITIES: self.capabilities,
        }.get(op, Backend.NONE).value

    @property
    def uses_lsm(self) -> bool:
        return Backend.BPFLSM in (self.process, self.file, self.network, self.capabilities)


def lsm_list(path: Path = LSM_LIST) -> list[str]:
    """The active LSMs (securityfs must be mounted; empty when it is not readable)."""
    try:
        return path.read_text().strip().split(",")
    except OSError:
        return []


def select(p: Probe) -> Selection:
    notes = list(p.notes)
    if p.lsm_active and p.lsm_loads:
        return Selection(Backend.BPFLSM, Backend.BPFLSM, Backend.BPFLSM, Backend.BPFLSM, tuple(notes))
    if not p.lsm_active:
        notes.append("bpf is not in the active LSM list (boot with lsm=...,bpf)")
    elif not p.lsm_loads:
        notes.append("BPF-LSM programs do not load here (no BPF trampolines)")
    fp = Backend.FANOTIFY if p.fanotify else Backend.NONE
    if not p.fanotify:
        notes.append("fanotify permission events unavailable: process and file rules audit only")
    net = Backend.CGROUP if p.cgroup_loads else Backend.NONE
    if p.cgroup_loads:
        notes.append("capabilities: only net_raw is enforced (on raw sockets, by cgroup BPF)")
    else:
        notes.append("cgroup BPF unavailable: network and capability rules audit only")
    return Selection(fp, fp, net, net, tuple(notes))
