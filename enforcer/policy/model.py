"""The policy model: KubeArmor's security.kubearmor.com/v1 resources as typed, frozen data.

The parser (enforcer.policy.parse) builds these from YAML after validation; the
matcher (enforcer.matcher) and the kernel compiler read them. Per-rule severity,
tags, message and action are already resolved against the policy's own values
here, so consumers never re-apply the override rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Action",
    "Capability",
    "Expression",
    "FileRule",
    "FromSource",
    "NetworkPolicyRule",
    "NetworkRule",
    "Operation",
    "PeerPort",
    "Policy",
    "PolicyKind",
    "ProcessRule",
    "RuleMeta",
    "Selector",
    "SyscallRule",
    "Target",
]


class PolicyKind(StrEnum):
    KSP = "KubeArmorPolicy"
    CSP = "KubeArmorClusterPolicy"
    HSP = "KubeArmorHostPolicy"
    NSP = "KubeArmorNetworkPolicy"  # validated and kept; not matched (see docs/policy-semantics.md)


class Action(StrEnum):
    ALLOW = "Allow"
    AUDIT = "Audit"
    BLOCK = "Block"


class Operation(StrEnum):
    """KubeArmor's Operation field values."""

    PROCESS = "Process"
    FILE = "File"
    NETWORK = "Network"
    CAPABILITIES = "Capabilities"
    SYSCALL = "Syscall"


class Target(StrEnum):
    """How a process/file rule names its resource."""

    PATH = "path"  # matchPaths: exact path
    DIR = "dir"  # matchDirectories: a directory (trailing '/'), optionally recursive
    PATTERN = "pattern"  # matchPatterns: a glob


@dataclass(frozen=True, slots=True)
class FromSource:
    """A fromSource entry: the acting process must be this binary or live in this directory."""

    path: str | None = None
    dir: str | None = None
    recursive: bool = False


@dataclass(frozen=True, slots=True)
class RuleMeta:
    """Effective severity/tags/message/action of one rule (rule value, else the policy's)."""

    action: Action
    severity: int
    tags: tuple[str, ...] = ()
    message: str = ""


@dataclass(frozen=True, slots=True)
class ProcessRule:
    target: Target
    value: str  # path, directory (ends with '/') or glob; for execname rules, the name
    meta: RuleMeta
    recursive: bool = False
    owner_only: bool = False
    from_source: tuple[FromSource, ...] = ()
    exec_name: bool = False  # matchPaths with `execname:` match the binary's base name
    allowed_args: tuple[str, ...] = ()  # matchPaths allowedArgs (KubeArmor: at most 20)


@dataclass(frozen=True, slots=True)
class FileRule:
    target: Target
    value: str
    meta: RuleMeta
    recursive: bool = False
    owner_only: bool = False
    read_only: bool = False
    from_source: tuple[FromSource, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkRule:
    protocol: str  # lower case: tcp, udp, icmp, icmpv6, raw, sctp, all
    meta: RuleMeta
    from_source: tuple[FromSource, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerPort:
    """A KubeArmorNetworkPolicy port: a number or service name, optionally up to end_port."""

    port: str
    end_port: int | None = None
    protocol: str | None = None  # lower case: tcp, udp, sctp; None means any


@dataclass(frozen=True, slots=True)
class NetworkPolicyRule:
    """One ingress/egress entry of a KubeArmorNetworkPolicy (validated and kept; not matched)."""

    direction: str  # "ingress" or "egress"
    meta: RuleMeta
    cidrs: tuple[str, ...] = ()  # from/to ipBlock.cidr
    ports: tuple[PeerPort, ...] = ()
    interfaces: tuple[str, ...] = ()  # iface
    limit: str | None = None  # bandwidth quota such as "10M"
    duration: str | None = None


@dataclass(frozen=True, slots=True)
class Capability:
    name: str  # lower case without CAP_: net_raw, sys_admin, ...
    meta: RuleMeta
    from_source: tuple[FromSource, ...] = ()


@dataclass(frozen=True, slots=True)
class SyscallRule:
    syscalls: tuple[str, ...]
    meta: RuleMeta
    path: str | None = None  # matchPaths form: path or dir (ends with '/')
    recursive: bool = False
    from_source: tuple[FromSource, ...] = ()


@dataclass(frozen=True, slots=True)
class Expression:
    """A cluster-policy matchExpressions entry."""

    key: str  # "namespace" or "label"
    operator: str  # "In" or "NotIn"
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Selector:
    """Which workloads (or, for host policies, which nodes) a policy applies to."""

    match_labels: tuple[tuple[str, str], ...] = ()  # without the container-name label
    # From the `kubearmor.io/container.name` label. None: label absent (all containers);
    # (): label present but "[]" or "" (also all containers); ("a", "b"): from "[a,b]"
    # (a bare "a,b" without brackets is read the same way).
    container_names: tuple[str, ...] | None = None
    match_expressions: tuple[Expression, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    kind: PolicyKind
    name: str
    namespace: str | None  # None for cluster, host and network policies
    selector: Selector  # pods for KSP/CSP; nodeSelector for HSP/NSP
    action: Action | None  # the policy-level action (rules may override)
    severity: int
    tags: tuple[str, ...] = ()
    message: str = ""
    process: tuple[ProcessRule, ...] = ()
    file: tuple[FileRule, ...] = ()
    network: tuple[NetworkRule, ...] = ()
    capabilities: tuple[Capability, ...] = ()
    syscalls: tuple[SyscallRule, ...] = ()
    ingress: tuple[NetworkPolicyRule, ...] = ()  # KubeArmorNetworkPolicy only
    egress: tuple[NetworkPolicyRule, ...] = ()  # KubeArmorNetworkPolicy only
    source_file: str = ""  # where it was read from, for error messages and logs
    raw: dict[str, object] = field(default_factory=dict, compare=False, hash=False, repr=False)
