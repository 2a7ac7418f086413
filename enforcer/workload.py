"""Who an event belongs to (a container or a node) and the default posture that applies to it.

See docs/policy-semantics.md for how these feed the matcher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["POSTURE_ANNOTATIONS", "DefaultPosture", "Posture", "Workload"]


class Posture(StrEnum):
    """What happens to an operation no Allow rule covers, once a kind is in allow-list mode."""

    AUDIT = "audit"
    BLOCK = "block"


# Namespace annotation -> DefaultPosture field (KubeArmor getting-started/default_posture.md).
POSTURE_ANNOTATIONS: dict[str, str] = {
    "kubearmor-file-posture": "file",
    "kubearmor-network-posture": "network",
    "kubearmor-capabilities-posture": "capabilities",
}


@dataclass(frozen=True, slots=True)
class DefaultPosture:
    """Per-kind posture; process operations follow `file` (KubeArmor has no process posture)."""

    file: Posture = Posture.AUDIT  # KubeArmor's global default is audit for every kind
    network: Posture = Posture.AUDIT
    capabilities: Posture = Posture.AUDIT

    def with_annotations(self, annotations: Mapping[str, str]) -> DefaultPosture:
        """This posture overridden by a namespace's annotations.

        An invalid value keeps the global value, as KubeArmor rewrites it to the global one.
        """
        values = {"file": self.file, "network": self.network, "capabilities": self.capabilities}
        for key, attr in POSTURE_ANNOTATIONS.items():
            raw = annotations.get(key)
            if raw is not None and raw.strip().lower() in (Posture.AUDIT, Posture.BLOCK):
                values[attr] = Posture(raw.strip().lower())
        return DefaultPosture(**values)


@dataclass(frozen=True, slots=True)
class Workload:
    """A container (namespace, pod labels, container name) or a node (host=True).

    Only the fields that select policies take part in equality and hashing: two pods
    of one deployment share compiled rules and cached decisions. The hash is computed
    once, since a Workload is a dict key on the matcher's hot path.
    """

    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    container_name: str = ""
    pod_name: str = field(default="", compare=False)
    host: bool = False
    hostname: str = ""
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if list(self.labels) != sorted(self.labels):
            object.__setattr__(self, "labels", tuple(sorted(self.labels)))
        h = hash((self.namespace, self.labels, self.container_name, self.host, self.hostname))
        object.__setattr__(self, "_hash", h)

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def container(
        cls,
        namespace: str,
        labels: Mapping[str, str] | None = None,
        container_name: str = "",
        pod_name: str = "",
    ) -> Workload:
        return cls(namespace, tuple(sorted((labels or {}).items())), container_name, pod_name)

    @classmethod
    def node(cls, hostname: str = "", labels: Mapping[str, str] | None = None) -> Workload:
        """A host. `kubernetes.io/hostname` is added from hostname unless labels set it."""
        merged = dict(labels or {})
        if hostname:
            merged.setdefault("kubernetes.io/hostname", hostname)
        return cls("", tuple(sorted(merged.items())), "", "", True, hostname)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)
