"""The matcher's answer for one event, shaped like the fields KubeArmor sets on a Log/Alert."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from enforcer.policy.model import Action

__all__ = ["DEFAULT_POSTURE", "DENIED", "PASSED", "LogType", "Verdict"]

PASSED = "Passed"
DENIED = "Permission denied"
DEFAULT_POSTURE = "DefaultPosture"  # PolicyName of decisions made by the default posture


class LogType(StrEnum):
    MATCHED_POLICY = "MatchedPolicy"
    MATCHED_HOST_POLICY = "MatchedHostPolicy"
    CONTAINER_LOG = "ContainerLog"
    HOST_LOG = "HostLog"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    result: str  # PASSED or DENIED
    policy_name: str  # a policy's name, DEFAULT_POSTURE, or "" when nothing matched
    type: LogType
    severity: int | None = None
    tags: tuple[str, ...] = ()
    message: str = ""

    @property
    def blocked(self) -> bool:
        return self.result != PASSED

    @property
    def is_alert(self) -> bool:
        """KubeArmor emits an Alert (MatchedPolicy/MatchedHostPolicy) rather than a Log."""
        return self.type in (LogType.MATCHED_POLICY, LogType.MATCHED_HOST_POLICY)

    def fields(self) -> dict[str, object]:
        """The KubeArmor Log/Alert fields this verdict sets (names as `karmor logs --json`)."""
        return {
            "Action": str(self.action),
            "Result": self.result,
            "PolicyName": self.policy_name,
            "Severity": "" if self.severity is None else str(self.severity),
            "Tags": ",".join(self.tags),
            "ATags": list(self.tags),
            "Message": self.message,
            "Type": str(self.type),
        }
