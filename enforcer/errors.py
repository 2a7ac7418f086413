"""One root for every error armorstream raises on purpose (as httpx roots at HTTPError)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArmorstreamError", "PolicyError", "PolicyErrors", "RecordError"]


class ArmorstreamError(Exception):
    """Root of armorstream's own exceptions; callers never need a dependency's types."""


@dataclass(frozen=True, slots=True)
class PolicyError:
    """One problem in one policy document: where it is and why it is wrong."""

    file: str
    path: str  # field path such as "spec.file.matchPaths[0].path"
    reason: str
    line: int | None = None  # 1-based, when the YAML loader knows it
    document: int = 0  # index of the YAML document in a multi-document file

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.document:
            where += f" (document {self.document + 1})"
        return f"{where}: {self.path or '<document>'}: {self.reason}"


class PolicyErrors(ArmorstreamError):
    """Every error found in a set of policy files, reported together."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class RecordError(ArmorstreamError):
    """A raw batch or record that cannot be decoded; the reason goes to the dead-letter topic."""
