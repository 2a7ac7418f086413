"""The reference matcher: KubeArmor policies + workload + event -> verdict.

This is the single source of truth for verdicts; the kernel compiler, the stream and
the tests all defer to it. The rules it implements, each with its KubeArmor source,
are in docs/policy-semantics.md; comments here only point at the rule numbers there.

Speed: the policies that select a workload are compiled once per workload (exact paths
in dicts, directory rules looked up by walking the event path's parents, globs compiled
to one regex each), and each workload keeps a bounded cache of decisions keyed by the
event. `decide_uncached` runs the same logic with neither cache (the reference for tests
and the benchmark's baseline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from enforcer.karmor_log import Event
from enforcer.policy.model import (
    Action,
    Expression,
    FromSource,
    Operation,
    Policy,
    PolicyKind,
    RuleMeta,
    Selector,
    Target,
)
from enforcer.policy.parse import compile_pattern
from enforcer.verdict import DEFAULT_POSTURE, DENIED, PASSED, LogType, Verdict
from enforcer.workload import DefaultPosture, Posture, Workload

__all__ = ["Matcher", "glob_to_regex", "network_protocols", "selector_matches"]

_ALLOW, _AUDIT, _BLOCK = Action.ALLOW, Action.AUDIT, Action.BLOCK
# Container-name selector values that mean "every container" (rule S2).
_ALL_CONTAINERS = frozenset({"", "[]"})


# ----------------------------------------------------------------------------- selection


def _expression_holds(expr: Expression, workload: Workload) -> bool:
    """Rule S3: namespace/label In/NotIn; label values are "k=v" (a bare "k": key present)."""
    if expr.key == "namespace":
        hit = workload.namespace in expr.values
    else:
        labels = workload.label_map
        hit = False
        for value in expr.values:
            key, eq, want = value.partition("=")
            if (key in labels) if not eq else (labels.get(key) == want):
                hit = True
                break
    return hit if expr.operator == "In" else not hit


def selector_matches(selector: Selector, workload: Workload) -> bool:
    """Rules S1-S3: every matchLabel, the container name, every matchExpression."""
    labels = workload.label_map
    for k, v in selector.match_labels:
        # "*" selects every node in host policies (KubeArmor's non-Kubernetes mode).
        if labels.get(k) != v and not (v == "*" and workload.host):
            return False
    names = selector.container_names
    if names is not None and not workload.host:
        wanted = [n for n in names if n not in _ALL_CONTAINERS]
        if wanted and workload.container_name not in wanted:
            return False
    return all(_expression_holds(e, workload) for e in selector.match_expressions)


def _applies(policy: Policy, workload: Workload) -> bool:
    """Rule S4: host policies for hosts, namespaced and cluster policies for containers."""
    if policy.kind is PolicyKind.HSP:
        return workload.host and selector_matches(policy.selector, workload)
    if workload.host:
        return False
    if policy.kind is PolicyKind.KSP:
        return policy.namespace == workload.namespace and selector_matches(policy.selector, workload)
    if policy.kind is PolicyKind.CSP:
        return selector_matches(policy.selector, workload)
    return False  # KubeArmorNetworkPolicy: validated, not matched (docs: "Not covered")


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class _Rule:
    order: int  # position across all policies: ties resolve in policy order (rule P4)
    policy: str
    meta: RuleMeta
    owner_only: bool = False
    read_only: bool = False
    from_paths: frozenset[str] = frozenset()
    from_dirs: tuple[tuple[str, bool], ...] = ()  # (dir ending in "/", recursive)

    @property
    def has_from(self) -> bool:
        return bool(self.from_paths or self.from_dirs)

    def source_ok(self, sources: tuple[str, ...]) -> bool:
        """Rule F1: no fromSource, or one entry names (or contains) one of the sources."""
        if not self.from_paths and not self.from_dirs:
            return True
        for s in sources:
            if s in self.from_paths:
                return True
            for d, recursive in self.from_dirs:
                if s.startswith(d) and (recursive or "/" not in s[len(d) :]):
                    return True
        return False

    def violated(self, ev: Event) -> bool:
        """Rule O1: what a Block rule denies, an Allow rule refuses and an Audit rule reports."""
        if self.owner_only and self.read_only:
            return ev.write or not ev.is_owner
        if self.owner_only:
            return not ev.is_owner
        if self.read_only:
            return ev.write
        return True


def _from_fields(sources: Sequence[FromSource]) -> tuple[frozenset[str], tuple[tuple[str, bool], ...]]:
    paths = frozenset(s.path for s in sources if s.path)
    dirs = tuple(
        (s.dir if s.dir.endswith("/") else s.dir + "/", s.recursive) for s in sources if s.dir and not s.path
    )
    return paths, dirs


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Rule R4, for `fullmatch`: the parser's compiler, so validation and matching agree.

    `*` and `?` stay within one path component, `**` crosses "/", `[..]` is a class,
    `{a,b}` alternatives.
    """
    return compile_pattern(pattern)


@dataclass(slots=True)
class _PathIndex:
    """Process or file rules of one workload, indexed by how they name their resource."""

    exact: dict[str, list[_Rule]] = field(default_factory=dict)
    dirs: dict[str, list[tuple[_Rule, bool]]] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern[str], _Rule]] = field(default_factory=list)
    execnames: dict[str, list[_Rule]] = field(default_factory=dict)
    has_allow: bool = False

    def add(self, rule: _Rule, target: Target, value: str, recursive: bool, exec_name: bool) -> None:
        if rule.meta.action is _ALLOW:
            self.has_allow = True
        if exec_name:
            self.execnames.setdefault(value, []).append(rule)
        elif target is Target.PATH:
            self.exact.setdefault(value, []).append(rule)
        elif target is Target.DIR:
            d = value if value.endswith("/") else value + "/"
            self.dirs.setdefault(d, []).append((rule, recursive))
        else:
            self.patterns.append((glob_to_regex(value), rule))

    def candidates(self, path: str) -> list[_Rule]:
        """Rules R1-R5: every rule whose resource names this path, in policy order."""
        found: list[_Rule] = list(self.exact.get(path, ()))
        if self.dirs:
            # The directory itself ("/etc" opened as a file) matches "/etc/" (rule R2).
            found.extend(r for r, _ in self.dirs.get(path + "/", ()))
            parent_end = path.rfind("/")
            i = path.find("/")
            while i != -1 and i <= parent_end:
                rules = self.dirs.get(path[: i + 1])
                if rules:
                    direct = i == parent_end
                    found.extend(r for r, recursive in rules if recursive or direct)
                i = path.find("/", i + 1)
        if self.execnames:
            found.extend(self.execnames.get(path.rpartition("/")[2], ()))
        for rx, r in self.patterns:
            if rx.fullmatch(path):
                found.append(r)
        if len(found) > 1:
            found.sort(key=_order)
        return found


def _order(r: _Rule) -> int:
    return r.order


@lru_cache(maxsize=4096)
def network_protocols(resource: str) -> frozenset[str]:
    """Rule N1: the protocol names a Network event's Resource stands for.

    Accepts KubeArmor's forms: "domain=AF_INET type=SOCK_STREAM protocol=TCP" and the
    numeric "protocol=6"; protocol 0 (HOPOPT) takes tcp/udp from the socket type. A raw
    socket is "raw" besides its protocol (ICMP over SOCK_RAW is both icmp and raw).
    """
    fields: dict[str, str] = {}
    for tok in resource.replace(",", " ").split():
        k, _, v = tok.partition("=")
        fields[k.lower()] = v.upper()
    sock_type = fields.get("type", "")
    proto = fields.get("protocol", "")
    proto = {"0": "HOPOPT", "1": "ICMP", "6": "TCP", "17": "UDP", "58": "ICMPV6", "132": "SCTP"}.get(
        proto, proto
    )
    names: set[str] = set()
    unspecified = proto in ("", "HOPOPT", "IP")
    if proto == "TCP" or (unspecified and "SOCK_STREAM" in sock_type):
        names.add("tcp")
    if proto == "UDP" or (unspecified and "SOCK_DGRAM" in sock_type):
        names.add("udp")
    if proto == "ICMP":
        names.add("icmp")
    elif proto == "ICMPV6":
        names.add("icmpv6")
    elif proto == "SCTP":
        names.add("sctp")
    if "SOCK_RAW" in sock_type:
        names.add("raw")
    return frozenset(names)


@dataclass(slots=True)
class _Compiled:
    """Everything the matcher needs for one workload, built once."""

    host: bool
    posture: DefaultPosture
    process: _PathIndex = field(default_factory=_PathIndex)
    file: _PathIndex = field(default_factory=_PathIndex)
    network: list[tuple[str, _Rule]] = field(default_factory=list)  # (protocol, rule)
    network_allow: bool = False
    capabilities: list[tuple[str, _Rule]] = field(default_factory=list)  # (CAP_NAME, rule)
    capabilities_allow: bool = False
    # (SYSCALL names, path or "", recursive, rule)
    syscalls: list[tuple[frozenset[str], str, bool, _Rule]] = field(default_factory=list)
    cache: dict[Event, Verdict] = field(default_factory=dict)

    @property
    def alert_type(self) -> LogType:
        return LogType.MATCHED_HOST_POLICY if self.host else LogType.MATCHED_POLICY

    @property
    def log_type(self) -> LogType:
        return LogType.HOST_LOG if self.host else LogType.CONTAINER_LOG


def _compile(policies: Iterable[Policy], workload: Workload, posture: DefaultPosture) -> _Compiled:
    c = _Compiled(host=workload.host, posture=posture)
    order = 0
    for p in policies:
        for pr in p.process:
            paths, dirs = _from_fields(pr.from_source)
            rule = _Rule(order, p.name, pr.meta, pr.owner_only, False, paths, dirs)
            c.process.add(rule, pr.target, pr.value, pr.recursive, pr.exec_name)
            order += 1
        for fr in p.file:
            paths, dirs = _from_fields(fr.from_source)
            rule = _Rule(order, p.name, fr.meta, fr.owner_only, fr.read_only, paths, dirs)
            c.file.add(rule, fr.target, fr.value, fr.recursive, False)
            order += 1
        for nr in p.network:
            paths, dirs = _from_fields(nr.from_source)
            c.network.append((nr.protocol.lower(), _Rule(order, p.name, nr.meta, False, False, paths, dirs)))
            c.network_allow |= nr.meta.action is _ALLOW
            order += 1
        for cap in p.capabilities:
            paths, dirs = _from_fields(cap.from_source)
            rule = _Rule(order, p.name, cap.meta, False, False, paths, dirs)
            name = cap.name.lower().removeprefix("cap_")
            c.capabilities.append(("CAP_" + name.upper(), rule))
            c.capabilities_allow |= cap.meta.action is _ALLOW
            if name == "net_raw":
                # Rule C2: net_raw is enforced and reported on raw sockets (Network events).
                c.network.append(("raw", rule))
                c.network_allow |= cap.meta.action is _ALLOW
            order += 1
        for sr in p.syscalls:
            paths, dirs = _from_fields(sr.from_source)
            # Rule Y1: syscall rules only ever audit.
            meta = RuleMeta(_AUDIT, sr.meta.severity, sr.meta.tags, sr.meta.message)
            rule = _Rule(order, p.name, meta, False, False, paths, dirs)
            names = frozenset(s.upper().removeprefix("SYS_") for s in sr.syscalls)
            c.syscalls.append((names, sr.path or "", sr.recursive, rule))
            order += 1
    return c


# ----------------------------------------------------------------------------- decisions


def _sources(ev: Event) -> tuple[str, ...]:
    return tuple(s for s in (ev.source, ev.process, ev.parent) if s)


def _rule_verdict(c: _Compiled, action: Action, result: str, r: _Rule, alert: bool) -> Verdict:
    m = r.meta
    kind = c.alert_type if alert else c.log_type
    return Verdict(action, result, r.policy, kind, m.severity, m.tags, m.message)


def _resolve(
    c: _Compiled, ev: Event, cands: list[_Rule], allow_mode: bool, audit_allow_mode: bool, posture: Posture
) -> Verdict:
    """Rules P1-P6 on the rules whose resource and source match the event."""
    enforcing = [r for r in cands if r.meta.action is not _AUDIT]
    # P2: rules naming the event's source take precedence over rules for any source.
    tier = [r for r in enforcing if r.has_from] or enforcing
    allow_ok: _Rule | None = None
    allow_refused = False
    for r in tier:
        if r.meta.action is _BLOCK:
            if r.violated(ev):  # P1: a denying Block rule wins
                return _rule_verdict(c, _BLOCK, DENIED, r, True)
        elif (r.owner_only or r.read_only) and r.violated(ev):
            allow_refused = True  # O1: an ownerOnly/readOnly Allow rule refusing this access
        elif allow_ok is None:
            allow_ok = r
    if allow_ok is None and (allow_refused or (not tier and allow_mode and posture is Posture.BLOCK)):
        return Verdict(_BLOCK, DENIED, DEFAULT_POSTURE, c.alert_type)  # P5
    for r in cands:  # P3: Audit rules report what they would have blocked
        if r.meta.action is _AUDIT and r.violated(ev):
            return _rule_verdict(c, _AUDIT, PASSED, r, True)
    if allow_ok is not None:
        return _rule_verdict(c, _ALLOW, PASSED, allow_ok, False)  # P6: not an alert
    if not tier and audit_allow_mode and posture is Posture.AUDIT:
        return Verdict(_AUDIT, PASSED, DEFAULT_POSTURE, c.alert_type)  # P5
    return Verdict(_ALLOW, PASSED, "", c.log_type)


def _decide(c: _Compiled, ev: Event) -> Verdict:
    op = ev.operation
    if op is Operation.FILE or op is Operation.PROCESS:
        index = c.file if op is Operation.FILE else c.process
        sources = _sources(ev)
        cands = [r for r in index.candidates(ev.resource) if r.source_ok(sources)]
        # K1: block posture follows each kind's own Allow rules; K2: audit posture reports
        # when process or file has any (KubeArmor's feeder counts them together).
        either = c.process.has_allow or c.file.has_allow
        return _resolve(c, ev, cands, index.has_allow, either, c.posture.file)
    if op is Operation.NETWORK:
        protos = network_protocols(ev.resource)
        sources = _sources(ev)
        cands = [r for p, r in c.network if (p == "all" or p in protos) and r.source_ok(sources)]
        return _resolve(c, ev, cands, c.network_allow, c.network_allow, c.posture.network)
    if op is Operation.CAPABILITIES:
        res = ev.resource.upper()
        sources = _sources(ev)
        cands = [r for name, r in c.capabilities if name in res and r.source_ok(sources)]
        allow = c.capabilities_allow
        return _resolve(c, ev, cands, allow, allow, c.posture.capabilities)
    # Syscall: first matching rule audits (Y1).
    sources = _sources(ev)
    for names, path, recursive, r in c.syscalls:
        if ev.syscall not in names or not r.source_ok(sources):
            continue
        if path:
            if path.endswith("/"):
                rest = ev.resource[len(path) :] if ev.resource.startswith(path) else None
                if rest is None or (not recursive and "/" in rest):
                    continue
            elif ev.resource != path:
                continue
        return _rule_verdict(c, _AUDIT, PASSED, r, True)
    return Verdict(_ALLOW, PASSED, "", c.log_type)


class Matcher:
    """Decides events for workloads against a fixed set of policies.

    default_posture is the global setting; namespace_annotations maps a namespace to its
    annotations (kubearmor-file-posture ...), which override it for containers there.
    Hosts use the global posture (rule D2). Not thread-safe: one Matcher per worker.
    """

    def __init__(
        self,
        policies: Sequence[Policy],
        default_posture: DefaultPosture | None = None,
        namespace_annotations: Mapping[str, Mapping[str, str]] | None = None,
        cache_size: int = 65536,
    ) -> None:
        self.policies = tuple(policies)
        self.default_posture = default_posture or DefaultPosture()
        self.namespace_annotations = {k: dict(v) for k, v in (namespace_annotations or {}).items()}
        self.cache_size = cache_size
        self._compiled: dict[Workload, _Compiled] = {}

    def posture_for(self, workload: Workload) -> DefaultPosture:
        if workload.host:
            return self.default_posture
        annotations = self.namespace_annotations.get(workload.namespace)
        return self.default_posture.with_annotations(annotations) if annotations else self.default_posture

    def policies_for(self, workload: Workload) -> list[Policy]:
        return [p for p in self.policies if _applies(p, workload)]

    def _get(self, workload: Workload) -> _Compiled:
        c = self._compiled.get(workload)
        if c is None:
            c = _compile(self.policies_for(workload), workload, self.posture_for(workload))
            self._compiled[workload] = c
        return c

    def decide(self, workload: Workload, event: Event) -> Verdict:
        c = self._compiled.get(workload) or self._get(workload)
        cache = c.cache
        v = cache.get(event)
        if v is None:
            v = _decide(c, event)
            if len(cache) >= self.cache_size:
                del cache[next(iter(cache))]  # FIFO eviction: cheap, and hits dominate
            cache[event] = v
        return v

    def decide_many(self, workload: Workload, events: Iterable[Event]) -> list[Verdict]:
        """Decisions for a batch of one workload's events (one compiled-set lookup)."""
        c = self._get(workload)
        cache = c.cache
        out: list[Verdict] = []
        append = out.append
        for ev in events:
            v = cache.get(ev)
            if v is None:
                v = _decide(c, ev)
                if len(cache) >= self.cache_size:
                    del cache[next(iter(cache))]
                cache[ev] = v
            append(v)
        return out

    def decide_uncached(self, workload: Workload, event: Event) -> Verdict:
        """The same decision with no compiled-set or decision cache (reference/baseline)."""
        return _decide(_compile(self.policies_for(workload), workload, self.posture_for(workload)), event)

    def decide_compiled_only(self, workload: Workload, event: Event) -> Verdict:
        """Compiled per workload, but no decision cache (the benchmark's middle baseline)."""
        return _decide(self._get(workload), event)

    def clear_caches(self) -> None:
        self._compiled.clear()
