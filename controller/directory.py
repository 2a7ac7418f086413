"""Directory mode: policies from YAML files instead of the Kubernetes API.

The directory is scanned (recursively, *.yaml and *.yml) every `interval` seconds;
when any file's size or modification time changed, every file is read again and each
policy kind is handed over as a full `Sync`, exactly as a Kubernetes LIST would be.
ClusterState turns the difference into upserts and tombstones, so adding, editing and
deleting files all come out right without tracking individual file events. (The
watchfiles package would wake the scan sooner; it is not a dependency, and a one-second
poll of a policy directory costs nothing.)

Invalid files are reported with file, line, field path and reason; the valid policies
of the directory are still published.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from controller.state import POLICY_RESOURCES, Change, InvalidPolicy, Obj, Sync
from enforcer.errors import PolicyError

__all__ = ["DirectorySource", "load_directory"]

log = logging.getLogger("armorstream.controller")

PLURAL_OF_KIND = {kind.value: plural for plural, kind in POLICY_RESOURCES.items()}
OTHER_KINDS = {"KubeArmorNetworkPolicy"}  # valid KubeArmor, not applied by this controller


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in sorted(directory.rglob("*")):
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file():
            try:
                st = p.stat()
            except FileNotFoundError:  # deleted between listing and stat
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_directory(
    directory: Path,
) -> tuple[dict[str, list[tuple[Obj, tuple[str, int]]]], list[PolicyError]]:
    """Policy documents per resource, each with (file, document index), and unreadable files' errors."""
    by_resource: dict[str, list[tuple[Obj, tuple[str, int]]]] = {r: [] for r in POLICY_RESOURCES}
    errors: list[PolicyError] = []
    yaml = YAML(typ="rt")  # keeps line numbers for the parser's error messages
    yaml.version = (1, 1)  # as kubectl reads manifests (and enforcer.policy.parse)
    for path, _, _ in _fingerprint(directory):
        try:
            docs: list[Any] = list(yaml.load_all(Path(path).read_text()))
        except MarkedYAMLError as e:
            line = e.problem_mark.line + 1 if e.problem_mark is not None else None
            errors.append(PolicyError(path, "", f"not valid YAML: {e.problem}", line))
            continue
        except (YAMLError, OSError, UnicodeDecodeError) as e:
            errors.append(PolicyError(path, "", f"cannot read: {e}"))
            continue
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            line = doc.lc.line + 1 if hasattr(doc, "lc") else None
            kind = doc.get("kind") if isinstance(doc, dict) else None
            api = str(doc.get("apiVersion", "")) if isinstance(doc, dict) else ""
            if kind in OTHER_KINDS:
                log.info("%s: %s is not applied by the controller; skipped", path, kind)
            elif kind in PLURAL_OF_KIND:
                by_resource[PLURAL_OF_KIND[kind]].append((doc, (path, i)))
            elif api and not api.startswith("security.kubearmor.com/"):
                log.debug("%s: document %d is a %s, not a policy; skipped", path, i + 1, kind)
            else:
                errors.append(PolicyError(path, "kind", f"{kind!r} is not a KubeArmor policy kind "
                                          f"({', '.join(sorted(PLURAL_OF_KIND))})", line, i))
    return by_resource, errors


@dataclass
class DirectorySource:
    directory: Path
    interval: float = 1.0
    resources: tuple[str, ...] = tuple(POLICY_RESOURCES)
    scans: int = 0
    file_errors: list[PolicyError] = field(default_factory=list)  # of the latest scan
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, sink: Callable[[Sync | Change], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(sink,), name="policy-dir", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, sink: Callable[[Sync | Change], None]) -> None:
        seen: tuple[tuple[str, int, int], ...] | None = None
        reported: set[PolicyError] = set()
        while not self._stop.is_set():
            fp = _fingerprint(self.directory)
            if fp != seen:
                seen = fp
                by_resource, errors = load_directory(self.directory)
                self.scans += 1
                self.file_errors = errors
                for e in errors:
                    if e not in reported:
                        log.error("invalid policy file not applied: %s", e)
                reported = set(errors)
                for resource, docs in by_resource.items():
                    sink(Sync(resource, [d for d, _ in docs], [o for _, o in docs]))
            self._stop.wait(self.interval)

    def report_invalid(self, inv: InvalidPolicy) -> None:
        pass  # no API to post Events to: the controller's log line (file, path, reason) is the report
