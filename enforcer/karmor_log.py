"""The matcher's event input, and its conversion from a KubeArmor Log record.

A record is a dict as `karmor logs --json` prints it. The matcher needs two facts that
KubeArmor's output does not carry; they are read from extra fields when present:

- `OwnerUID` (int): the owner of the file (File) or of the executed binary (Process),
  for ownerOnly rules. Absent means unknown, and an unknown owner is not the acting user.
- `Write` (bool): whether a File access writes. Absent means: derived from `Data`
  (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND among the open flags).
- `NodeLabels` ("k=v,k=v"): a host's node labels for host-policy nodeSelectors, besides
  `kubernetes.io/hostname`, which comes from `HostName`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from enforcer.errors import ArmorstreamError
from enforcer.policy.model import Operation
from enforcer.workload import Workload

__all__ = ["WRITE_FLAGS", "Event", "LogRecordError", "event_from_log", "parse_labels", "workload_from_log"]

WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


class LogRecordError(ArmorstreamError):
    """A KubeArmor Log record the matcher cannot use; the message names the field."""


@dataclass(frozen=True, slots=True)
class Event:
    """One operation to judge. Hashable and cheap to hash: it keys the decision cache."""

    operation: Operation
    # File: the path. Process: the executed binary. Network: "domain=.. type=.. protocol=..".
    # Capabilities: the capability (CAP_NET_RAW). Syscall: the path argument, if any.
    resource: str
    process: str = ""  # ProcessName: the acting binary (for an exec, the new one)
    parent: str = ""  # ParentProcessName
    source: str = ""  # first word of Source (for an exec, the binary that called exec)
    uid: int | None = None
    owner_uid: int | None = None
    write: bool = False
    syscall: str = ""  # Syscall events: upper-case name without SYS_ (UNLINK)
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        h = hash(
            (
                self.operation,
                self.resource,
                self.process,
                self.parent,
                self.source,
                self.uid,
                self.owner_uid,
                self.write,
                self.syscall,
            )
        )
        object.__setattr__(self, "_hash", h)

    def __hash__(self) -> int:
        return self._hash

    @property
    def is_owner(self) -> bool:
        return self.uid is not None and self.owner_uid is not None and self.uid == self.owner_uid


def parse_labels(text: str) -> dict[str, str]:
    """KubeArmor's `Labels` form, "k=v,k=v" (a bare "k" gives an empty value)."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        labels[key.strip()] = value.strip()
    return labels


def _opt_int(rec: Mapping[str, object], key: str) -> int | None:
    value = rec.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise LogRecordError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise LogRecordError(f"{key}: expected an integer, got {value!r}")


def _str(rec: Mapping[str, object], key: str) -> str:
    value = rec.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LogRecordError(f"{key}: expected a string, got {type(value).__name__}")
    return value


_OPERATIONS = {op.value: op for op in Operation}


def event_from_log(rec: Mapping[str, object]) -> Event:
    op_name = _str(rec, "Operation")
    op = _OPERATIONS.get(op_name)
    if op is None:
        raise LogRecordError(f"Operation: expected one of {', '.join(_OPERATIONS)}, got {op_name!r}")
    resource = _str(rec, "Resource")
    data = _str(rec, "Data")
    process = _str(rec, "ProcessName")
    source_words = _str(rec, "Source").split(" ", 1)
    source = source_words[0]
    syscall = ""
    if op is Operation.FILE or op is Operation.PROCESS:
        first = resource.split(" ", 1)[0]
        # An exec's Resource is "binary args"; the binary is ProcessName when KubeArmor has it.
        resource = (process or first) if op is Operation.PROCESS else first
    elif op is Operation.SYSCALL:
        word = data.split(" ", 1)[0]
        syscall = word.rpartition("SYS_")[2].upper() if "SYS_" in word else ""
    write_field = rec.get("Write")
    if write_field is None:
        write = op is Operation.FILE and any(flag in data for flag in WRITE_FLAGS)
    elif isinstance(write_field, bool):
        write = write_field
    else:
        raise LogRecordError(f"Write: expected true or false, got {write_field!r}")
    return Event(
        operation=op,
        resource=resource,
        process=process,
        parent=_str(rec, "ParentProcessName"),
        source=source,
        uid=_opt_int(rec, "UID"),
        owner_uid=_opt_int(rec, "OwnerUID"),
        write=write,
        syscall=syscall,
    )


def workload_from_log(rec: Mapping[str, object]) -> Workload:
    """A container when the record has a ContainerID (or a namespace and pod), else the host."""
    namespace = _str(rec, "NamespaceName")
    pod = _str(rec, "PodName")
    if _str(rec, "ContainerID") or (namespace and pod):
        return Workload.container(
            namespace, parse_labels(_str(rec, "Labels")), _str(rec, "ContainerName"), pod
        )
    return Workload.node(_str(rec, "HostName"), parse_labels(_str(rec, "NodeLabels")))
