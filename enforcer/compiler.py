"""Policies + one workload -> the enforcement maps' contents, and the kernel's lookup in Python.

`compile_workload` is pure: policies, a cgroup id, a posture and a generation in;
`{map_name: {key_bytes: value_bytes}}` out (plus the side tables user space needs). It
opens no map. Layouts mirror bpf/enforce.h; the struct formats here are the only Python
copy of them.

Design (KubeArmor bpflsm style; docs/enforcement.md has the whole story):
- Exact path keys. A directory rule is one key on the directory (scope CHILD or TREE),
  plus HINT keys on the directory and every ancestor, so the kernel walks ancestors
  top-down with exact lookups and stops at the first one without a hint.
- fromSource binaries are part of the key; a hit through a source key belongs to the
  "fromSource tier", which takes precedence as in the matcher (rule P2).
- Each value keeps, per variant bit, the first rule that set it, so the kernel's
  decision names the same policy the matcher names.
- Posture and allow-list mode live in the workload's header entry (`as_wl`) next to the
  generation number: posture, mode and rules change together in one element update.
- What the kernel cannot express (matchPatterns globs, fromSource directories, paths of
  AS_PATH_LEN bytes or more) goes to `user_rules`; the header then marks that kind as
  decided in user space (the fanotify backend) for this workload.
- `lookup_*` are the kernel programs' decision logic written in Python: the fanotify
  backend decides with them, and tests compare them with the reference matcher.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Final

from enforcer.errors import ArmorstreamError
from enforcer.matcher import glob_to_regex
from enforcer.policy.model import Action, FromSource, Policy, PolicyKind, Target
from enforcer.verdict import DEFAULT_POSTURE, DENIED, PASSED, LogType, Verdict
from enforcer.workload import DefaultPosture, Posture

__all__ = [
    "CAPABILITIES",
    "MAP_CAP",
    "MAP_FP",
    "MAP_NET",
    "MAP_WL",
    "RULE_MAPS",
    "CompileError",
    "CompiledSet",
    "Decision",
    "Diff",
    "FpKind",
    "MapOp",
    "Proto",
    "RuleRef",
    "Scope",
    "UserRule",
    "V",
    "WlFlag",
    "compile_workload",
    "diff",
    "lookup_capability",
    "lookup_exec",
    "lookup_open",
    "lookup_socket",
    "next_generation",
    "socket_protos",
]

AS_PATH_LEN: Final = 256

MAP_WL: Final = "as_wl"
MAP_FP: Final = "as_fp_rules"
MAP_NET: Final = "as_net_rules"
MAP_CAP: Final = "as_cap_rules"
RULE_MAPS: Final = (MAP_FP, MAP_NET, MAP_CAP)

# struct formats (bpf/enforce.h)
WL_KEY: Final = struct.Struct("<Q")
WL_VAL: Final = struct.Struct("<II")  # gen, flags
# cgroup, gen, kind, scope, pad, path, source
FP_KEY: Final = struct.Struct(f"<QIHBB{AS_PATH_LEN}s{AS_PATH_LEN}s")
RULE_VAL: Final = struct.Struct("<HHI12I")  # variants, flags, pad, rule[12]
NET_KEY: Final = struct.Struct("<QII")  # cgroup, gen, proto
CAP_KEY: Final = struct.Struct("<QII")  # cgroup, gen, cap


class WlFlag(IntFlag):
    """enum as_wl_flag."""

    ALLOW_PROC = 1 << 0
    ALLOW_FILE = 1 << 1
    ALLOW_NET = 1 << 2
    ALLOW_CAP = 1 << 3
    POSTURE_FILE_BLOCK = 1 << 4
    POSTURE_NET_BLOCK = 1 << 5
    POSTURE_CAP_BLOCK = 1 << 6
    USER_PROC = 1 << 7
    USER_FILE = 1 << 8


class V(IntFlag):
    """enum as_variant: bit = 4 * action + (1 if ownerOnly) + (2 if readOnly)."""

    BLOCK_ANY = 1 << 0
    BLOCK_NONOWNER = 1 << 1
    BLOCK_WRITE = 1 << 2
    BLOCK_NONOWNER_OR_WRITE = 1 << 3
    AUDIT_ANY = 1 << 4
    AUDIT_NONOWNER = 1 << 5
    AUDIT_WRITE = 1 << 6
    AUDIT_NONOWNER_OR_WRITE = 1 << 7
    ALLOW_ANY = 1 << 8
    ALLOW_OWNER = 1 << 9
    ALLOW_READ = 1 << 10
    ALLOW_OWNER_READ = 1 << 11


class FpKind(IntEnum):
    PROCESS = 1
    FILE = 2
    EXECNAME = 3


class Scope(IntEnum):
    EXACT = 0
    CHILD = 1
    TREE = 2


RV_HINT: Final = 1


class Proto(IntEnum):
    TCP = 1
    UDP = 2
    ICMP = 3
    ICMPV6 = 4
    RAW = 5
    SCTP = 6


PROTO_NAMES: Final[dict[str, tuple[Proto, ...]]] = {
    "tcp": (Proto.TCP,),
    "udp": (Proto.UDP,),
    "icmp": (Proto.ICMP,),
    "icmpv6": (Proto.ICMPV6,),
    "raw": (Proto.RAW,),
    "sctp": (Proto.SCTP,),
    "all": tuple(Proto),
}

# Linux capability numbers (include/uapi/linux/capability.h), in order.
_CAP_NAMES: Final = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio "
    "sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time "
    "sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog "
    "wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore"
)
CAPABILITIES: Final[dict[str, int]] = {name: i for i, name in enumerate(_CAP_NAMES.split(" "))}
CAP_NET_RAW: Final = CAPABILITIES["net_raw"]

_ACTION_BASE: Final = {Action.BLOCK: 0, Action.AUDIT: 4, Action.ALLOW: 8}


class CompileError(ArmorstreamError):
    """A rule that cannot be compiled (the message names the policy)."""


@dataclass(frozen=True, slots=True)
class RuleRef:
    """What an alert needs about the rule behind a decision (`id` is 1-based, policy order)."""

    id: int
    policy: str
    action: Action
    severity: int
    tags: tuple[str, ...] = ()
    message: str = ""
    host: bool = False


@dataclass(frozen=True, slots=True)
class UserRule:
    """A process/file rule decided in user space (the kernel defers the whole kind)."""

    kind: FpKind  # PROCESS or FILE
    target: Target
    value: str
    recursive: bool
    exec_name: bool
    sources: tuple[FromSource, ...]
    bit: int  # variant bit number (0..11)
    rule: int


@dataclass(frozen=True, slots=True)
class MapOp:
    map: str
    key: bytes
    value: bytes | None  # None: delete


@dataclass(frozen=True, slots=True)
class Diff:
    """Apply `puts` in order, then `deletes` in order.

    Puts hold the new generation's rule entries and, last, the header flip; deletes then
    remove the old generation. A removed workload deletes its header first.
    """

    puts: tuple[MapOp, ...] = ()
    deletes: tuple[MapOp, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes


@dataclass(frozen=True, slots=True)
class CompiledSet:
    cgroup_id: int
    generation: int
    maps: dict[str, dict[bytes, bytes]]
    rules: tuple[RuleRef, ...] = ()
    user_rules: tuple[UserRule, ...] = ()
    limits: tuple[str, ...] = ()  # rules enforced less strictly than the matcher says, and why

    @property
    def flags(self) -> WlFlag:
        return WlFlag(WL_VAL.unpack(self.maps[MAP_WL][WL_KEY.pack(self.cgroup_id)])[1])

    def rule(self, rule_id: int) -> RuleRef | None:
        return self.rules[rule_id - 1] if 0 < rule_id <= len(self.rules) else None

    def with_generation(self, gen: int) -> CompiledSet:
        """The same rules under another generation number (keys rewritten)."""
        maps: dict[str, dict[bytes, bytes]] = {}
        for name, entries in self.maps.items():
            if name == MAP_WL:
                maps[name] = {k: WL_VAL.pack(gen, WL_VAL.unpack(v)[1]) for k, v in entries.items()}
            else:  # every rule key starts with (u64 cgroup, u32 gen)
                maps[name] = {k[:8] + struct.pack("<I", gen) + k[12:]: v for k, v in entries.items()}
        return CompiledSet(self.cgroup_id, gen, maps, self.rules, self.user_rules, self.limits)


# ---- compilation ------------------------------------------------------------------------


def _bit(action: Action, owner_only: bool, read_only: bool) -> int:
    return _ACTION_BASE[action] + (1 if owner_only else 0) + (2 if read_only else 0)


@dataclass
class _Entry:
    variants: int = 0
    flags: int = 0
    rule: list[int] = field(default_factory=lambda: [0] * 12)

    def add(self, bit: int, rule: int) -> None:
        self.variants |= 1 << bit
        if not self.rule[bit]:
            self.rule[bit] = rule  # rules arrive in policy order: the first one stays

    def pack(self) -> bytes:
        return RULE_VAL.pack(self.variants, self.flags, 0, *self.rule)


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/', '/a/', '/a/b/']: each ancestor directory of path, top-down."""
    out = ["/"]
    i = path.find("/", 1)
    while i != -1:
        out.append(path[: i + 1])
        i = path.find("/", i + 1)
    return out


def _fits(s: str) -> bool:
    return len(s.encode()) < AS_PATH_LEN


def _dir(value: str) -> str:
    return value if value.endswith("/") else value + "/"


@dataclass
class _Builder:
    kernel_fp: bool
    fp: dict[tuple[int, int, str, str], _Entry] = field(default_factory=dict)
    net: dict[int, _Entry] = field(default_factory=dict)
    cap: dict[int, _Entry] = field(default_factory=dict)
    flags: int = 0
    user: list[UserRule] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)

    def entry(self, kind: FpKind, scope: Scope, path: str, source: str) -> _Entry:
        return self.fp.setdefault((int(kind), int(scope), path, source), _Entry())

    def fp_rule(
        self,
        kind: FpKind,
        target: Target,
        value: str,
        recursive: bool,
        exec_name: bool,
        sources: tuple[FromSource, ...],
        bit: int,
        rule: int,
    ) -> None:
        in_kernel = (
            self.kernel_fp
            and target is not Target.PATTERN
            and _fits(_dir(value))
            and all(s.path and _fits(s.path) for s in sources)
        )
        if not in_kernel:
            self.user.append(UserRule(kind, target, value, recursive, exec_name, sources, bit, rule))
            self.flags |= WlFlag.USER_PROC if kind is FpKind.PROCESS else WlFlag.USER_FILE
            return
        for src in [s.path or "" for s in sources] or [""]:
            if exec_name:
                self.entry(FpKind.EXECNAME, Scope.EXACT, value, src).add(bit, rule)
            elif target is Target.PATH:
                self.entry(kind, Scope.EXACT, value, src).add(bit, rule)
            else:
                d = _dir(value)
                for anc in _ancestors(d):
                    self.entry(kind, Scope.TREE, anc, "").flags |= RV_HINT
                self.entry(kind, Scope.TREE if recursive else Scope.CHILD, d, src).add(bit, rule)

    def simple(self, table: dict[int, _Entry], key: int, bit: int, rule: int) -> None:
        table.setdefault(key, _Entry()).add(bit, rule)


def compile_workload(
    policies: Iterable[Policy],
    cgroup_id: int,
    posture: DefaultPosture | None = None,
    generation: int = 0,
    kernel_fp: bool = True,
) -> CompiledSet:
    """Compile the policies that apply to one workload, in the matcher's order.

    Selection is the caller's job (`Matcher.policies_for`). Deterministic: the same
    policies in the same order give byte-identical maps. With `kernel_fp=False` every
    process/file rule goes to `user_rules` (a host whose only file backend is fanotify).
    """
    posture = posture or DefaultPosture()
    b = _Builder(kernel_fp)
    rules: list[RuleRef] = []

    def ref(pol: Policy, action: Action, severity: int, tags: tuple[str, ...], message: str) -> int:
        rules.append(
            RuleRef(len(rules) + 1, pol.name, action, severity, tags, message, pol.kind is PolicyKind.HSP)
        )
        return len(rules)

    for pol in policies:
        if pol.kind is PolicyKind.NSP:
            continue  # validated and kept, never matched (docs/policy-semantics.md)
        for pr in pol.process:
            m = pr.meta
            rid = ref(pol, m.action, m.severity, m.tags, m.message)
            if m.action is Action.ALLOW:
                b.flags |= WlFlag.ALLOW_PROC
            b.fp_rule(
                FpKind.PROCESS,
                pr.target,
                pr.value,
                pr.recursive,
                pr.exec_name,
                pr.from_source,
                _bit(m.action, pr.owner_only, False),
                rid,
            )
        for fr in pol.file:
            m = fr.meta
            rid = ref(pol, m.action, m.severity, m.tags, m.message)
            if m.action is Action.ALLOW:
                b.flags |= WlFlag.ALLOW_FILE
            bit = _bit(m.action, fr.owner_only, fr.read_only)
            b.fp_rule(FpKind.FILE, fr.target, fr.value, fr.recursive, False, fr.from_source, bit, rid)
        for nr in pol.network:
            m = nr.meta
            rid = ref(pol, m.action, m.severity, m.tags, m.message)
            protos = PROTO_NAMES.get(nr.protocol.lower())
            if protos is None:
                raise CompileError(f"policy {pol.name}: unknown network protocol {nr.protocol!r}")
            if not _from_source_ok(b, pol, f"network {nr.protocol}", nr.from_source, m.action):
                continue
            if m.action is Action.ALLOW:
                b.flags |= WlFlag.ALLOW_NET
            for p in protos:
                b.simple(b.net, int(p), _bit(m.action, False, False), rid)
        for cr in pol.capabilities:
            m = cr.meta
            rid = ref(pol, m.action, m.severity, m.tags, m.message)
            name = cr.name.lower().removeprefix("cap_")
            cap = CAPABILITIES.get(name)
            if cap is None:
                raise CompileError(f"policy {pol.name}: unknown capability {cr.name!r}")
            if not _from_source_ok(b, pol, f"capability {name}", cr.from_source, m.action):
                continue
            if m.action is Action.ALLOW:
                b.flags |= WlFlag.ALLOW_CAP
            b.simple(b.cap, cap, _bit(m.action, False, False), rid)
            if cap == CAP_NET_RAW:
                # Matcher rule C2: net_raw is enforced on raw sockets as a network rule.
                if m.action is Action.ALLOW:
                    b.flags |= WlFlag.ALLOW_NET
                b.simple(b.net, int(Proto.RAW), _bit(m.action, False, False), rid)
        for _ in pol.syscalls:
            ref(pol, Action.AUDIT, pol.severity, (), "")  # audit-only; keeps rule ids in order

    if posture.file is Posture.BLOCK:
        b.flags |= WlFlag.POSTURE_FILE_BLOCK
    if posture.network is Posture.BLOCK:
        b.flags |= WlFlag.POSTURE_NET_BLOCK
    if posture.capabilities is Posture.BLOCK:
        b.flags |= WlFlag.POSTURE_CAP_BLOCK

    gen = generation
    maps = {
        MAP_WL: {WL_KEY.pack(cgroup_id): WL_VAL.pack(gen, b.flags)},
        MAP_FP: {
            FP_KEY.pack(cgroup_id, gen, kind, scope, 0, path.encode(), src.encode()): e.pack()
            for (kind, scope, path, src), e in sorted(b.fp.items())
        },
        MAP_NET: {NET_KEY.pack(cgroup_id, gen, p): e.pack() for p, e in sorted(b.net.items())},
        MAP_CAP: {CAP_KEY.pack(cgroup_id, gen, c): e.pack() for c, e in sorted(b.cap.items())},
    }
    return CompiledSet(cgroup_id, gen, maps, tuple(rules), tuple(b.user), tuple(b.limits))


def _from_source_ok(
    b: _Builder, pol: Policy, what: str, sources: tuple[FromSource, ...], action: Action
) -> bool:
    """Network/capability hooks cannot see the binary's path: fromSource is a documented limit."""
    if not sources:
        return True
    if action is Action.ALLOW:
        b.limits.append(f"policy {pol.name}: {what} fromSource: the Allow applies to every process")
        return True
    b.limits.append(f"policy {pol.name}: {what} fromSource: not enforced in the kernel")
    return False


def next_generation(old: CompiledSet | None) -> int:
    return 0 if old is None else old.generation ^ 1


def diff(old: CompiledSet | None, new: CompiledSet | None) -> Diff:
    """Map operations that move the kernel from `old` to `new` with no unprotected moment.

    `new` must be compiled with `next_generation(old)`. When the rule sets are equal the
    diff is empty and the caller keeps `old` as the current set.
    """
    if old is not None and new is not None:
        if old.cgroup_id != new.cgroup_id:
            raise CompileError(f"diff across workloads: cgroup {old.cgroup_id} vs {new.cgroup_id}")
        if new.with_generation(old.generation).maps == old.maps:
            return Diff()
        if new.generation == old.generation:
            raise CompileError(
                f"cgroup {new.cgroup_id}: the new rule set reuses generation {old.generation}; "
                "compile it with next_generation(old)"
            )
    puts: list[MapOp] = []
    deletes: list[MapOp] = []
    if new is not None:
        for name in RULE_MAPS:
            puts.extend(MapOp(name, k, v) for k, v in new.maps[name].items())
        puts.extend(MapOp(MAP_WL, k, v) for k, v in new.maps[MAP_WL].items())
    if old is not None:
        if new is None:
            deletes.extend(MapOp(MAP_WL, k, None) for k in old.maps[MAP_WL])
        for name in RULE_MAPS:
            deletes.extend(MapOp(name, k, None) for k in old.maps[name])
    return Diff(tuple(puts), tuple(deletes))


# ---- the kernel's decision, in Python ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # ALLOW with rule None: nothing matched, nothing to report
    posture: bool = False  # decided by the default posture (PolicyName DefaultPosture)
    rule: RuleRef | None = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    def verdict(self, host: bool = False) -> Verdict:
        """The Log/Alert fields, as the matcher sets them."""
        log = LogType.HOST_LOG if host else LogType.CONTAINER_LOG
        alert = LogType.MATCHED_HOST_POLICY if host else LogType.MATCHED_POLICY
        result = DENIED if self.blocked else PASSED
        if self.posture:
            return Verdict(self.action, result, DEFAULT_POSTURE, alert)
        r = self.rule
        if r is None:  # kernel maps alone carry rule ids, not the RuleRef table
            return Verdict(self.action, result, "", log if self.action is Action.ALLOW else alert)
        typ = log if self.action is Action.ALLOW else alert
        return Verdict(self.action, result, r.policy, typ, r.severity, r.tags, r.message)


_NOTHING: Final = Decision(Action.ALLOW)

# Variant bits grouped by action.
_BLOCK_BITS: Final = range(0, 4)
_AUDIT_BITS: Final = range(4, 8)
_ALLOW_BITS: Final = range(8, 12)


def _violated(bit: int, owner: bool, write: bool) -> bool:
    """Matcher rule O1. Plain Allow grants (never violated); plain Block/Audit always fire."""
    low = bit & 3
    if low == 0:
        return bit < 8
    if low == 1:
        return not owner
    if low == 2:
        return write
    return write or not owner


@dataclass(frozen=True, slots=True)
class _Hit:
    bit: int
    rule: int
    from_source: bool


def _hits_of(raw: bytes | None, from_source: bool, out: list[_Hit]) -> bool:
    if raw is None:
        return False
    variants, _flags, _pad, *rule_ids = RULE_VAL.unpack(raw)
    for bit in range(12):
        if variants >> bit & 1:
            out.append(_Hit(bit, rule_ids[bit], from_source))
    return True


def _resolve(
    hits: list[_Hit],
    allow_mode: bool,
    audit_allow_mode: bool,
    posture_block: bool,
    owner: bool,
    write: bool,
    cs: CompiledSet | None,
) -> Decision:
    """Matcher rules P1-P6 over the hits (what the kernel programs compute, bit by bit)."""

    def ref(rule_id: int) -> RuleRef | None:
        return cs.rule(rule_id) if cs is not None else None

    enforcing = [h for h in hits if h.bit not in _AUDIT_BITS]
    tier = [h for h in enforcing if h.from_source] or enforcing
    blocks = [h.rule for h in tier if h.bit in _BLOCK_BITS and _violated(h.bit, owner, write)]
    if blocks:
        return Decision(Action.BLOCK, False, ref(min(blocks)))
    allows = [h.rule for h in tier if h.bit in _ALLOW_BITS and not _violated(h.bit, owner, write)]
    refused = any(h.bit in _ALLOW_BITS and _violated(h.bit, owner, write) for h in tier)
    if not allows and (refused or (not tier and allow_mode and posture_block)):
        return Decision(Action.BLOCK, True)
    audits = [h.rule for h in hits if h.bit in _AUDIT_BITS and _violated(h.bit, owner, write)]
    if audits:
        return Decision(Action.AUDIT, False, ref(min(audits)))
    if allows:
        return Decision(Action.ALLOW, False, ref(min(allows)))
    if not tier and audit_allow_mode and not posture_block:
        return Decision(Action.AUDIT, True)
    return _NOTHING


def _header(maps: Mapping[str, Mapping[bytes, bytes]], cgroup_id: int) -> tuple[int, int] | None:
    raw = maps.get(MAP_WL, {}).get(WL_KEY.pack(cgroup_id))
    if raw is None:
        return None
    gen, flags = WL_VAL.unpack(raw)
    return gen, flags


def _kernel_fp_hits(
    fp: Mapping[bytes, bytes], cg: int, gen: int, kind: FpKind, path: str, sources: Sequence[str]
) -> list[_Hit]:
    """What the LSM programs look up: exact keys, then ancestors top-down while hinted."""
    out: list[_Hit] = []
    srcs = [("", False)] + [(s, True) for s in dict.fromkeys(s for s in sources if s and _fits(s))]

    def get(k: FpKind, scope: Scope, p: str, src: str) -> bytes | None:
        if not _fits(p):
            return None
        return fp.get(FP_KEY.pack(cg, gen, k, scope, 0, p.encode(), src.encode()))

    for s, from_source in srcs:
        _hits_of(get(kind, Scope.EXACT, path, s), from_source, out)
        if kind is FpKind.PROCESS:
            _hits_of(get(FpKind.EXECNAME, Scope.EXACT, path.rpartition("/")[2], s), from_source, out)
    ancestors = _ancestors(path)
    if not path.endswith("/"):
        ancestors.append(path + "/")  # a directory opened as a file matches its own rules (R2)
    parent = path[: path.rfind("/") + 1]
    for d in ancestors:
        if get(kind, Scope.TREE, d, "") is None:
            break  # no hint: no directory rule at or below d
        itself = d == path + "/"
        for s, from_source in srcs:
            _hits_of(get(kind, Scope.TREE, d, s), from_source, out)
        # CHILD scope: the direct parent, or the path itself as a directory.
        if itself or d == parent:
            for s, from_source in srcs:
                _hits_of(get(kind, Scope.CHILD, d, s), from_source, out)
    return out


def _source_matches(spec: FromSource, src: str) -> bool:
    if spec.path:
        return src == spec.path
    if spec.dir:
        d = _dir(spec.dir)
        return src.startswith(d) and (spec.recursive or "/" not in src[len(d) :])
    return False


def _user_fp_hits(rules: Iterable[UserRule], kind: FpKind, path: str, sources: Sequence[str]) -> list[_Hit]:
    out: list[_Hit] = []
    srcs = [s for s in sources if s]
    for r in rules:
        if r.kind is not kind:
            continue
        if r.sources and not any(_source_matches(sp, s) for sp in r.sources for s in srcs):
            continue
        if r.exec_name:
            ok = path.rpartition("/")[2] == r.value
        elif r.target is Target.PATH:
            ok = path == r.value
        elif r.target is Target.DIR:
            d = _dir(r.value)
            rest = path[len(d) :] if path.startswith(d) else None
            ok = path + "/" == d or (rest is not None and (r.recursive or "/" not in rest))
        else:
            ok = glob_to_regex(r.value).match(path) is not None
        if ok:
            out.append(_Hit(r.bit, r.rule, bool(r.sources)))
    return out


def _maps_of(cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]]) -> Mapping[str, Mapping[bytes, bytes]]:
    return cs.maps if isinstance(cs, CompiledSet) else cs


def _lookup_fp(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]],
    cgroup_id: int,
    kind: FpKind,
    path: str,
    sources: Sequence[str],
    owner: bool,
    write: bool,
) -> Decision:
    maps = _maps_of(cs)
    hdr = _header(maps, cgroup_id)
    if hdr is None:
        return _NOTHING
    gen, flags = hdr
    hits = _kernel_fp_hits(maps.get(MAP_FP, {}), cgroup_id, gen, kind, path, sources)
    full = cs if isinstance(cs, CompiledSet) else None
    if full is not None:
        hits.extend(_user_fp_hits(full.user_rules, kind, path, sources))
    own = WlFlag.ALLOW_PROC if kind is FpKind.PROCESS else WlFlag.ALLOW_FILE
    return _resolve(
        hits,
        bool(flags & own),
        # Matcher K2: audit posture reports when process or file has any Allow rule.
        bool(flags & (WlFlag.ALLOW_PROC | WlFlag.ALLOW_FILE)),
        bool(flags & WlFlag.POSTURE_FILE_BLOCK),
        owner,
        write,
        full,
    )


def lookup_exec(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]],
    cgroup_id: int,
    path: str,
    sources: Sequence[str] = (),
    owner: bool = False,
) -> Decision:
    """bprm_check_security. `sources`: the exec-ing binary and its parent's binary.

    The new binary itself also counts as a source, as in the matcher (its ProcessName).
    """
    return _lookup_fp(cs, cgroup_id, FpKind.PROCESS, path, (*sources, path), owner, False)


def lookup_open(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]],
    cgroup_id: int,
    path: str,
    sources: Sequence[str] = (),
    owner: bool = False,
    write: bool = False,
) -> Decision:
    """file_open. `owner`: the acting uid owns the file; `write`: opened for writing."""
    return _lookup_fp(cs, cgroup_id, FpKind.FILE, path, sources, owner, write)


def _lookup_simple(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]],
    cgroup_id: int,
    table: str,
    keys: Sequence[int],
    allow_flag: WlFlag,
    posture_flag: WlFlag,
) -> Decision:
    maps = _maps_of(cs)
    hdr = _header(maps, cgroup_id)
    if hdr is None:
        return _NOTHING
    gen, flags = hdr
    entries = maps.get(table, {})
    hits: list[_Hit] = []
    for k in keys:
        _hits_of(entries.get(NET_KEY.pack(cgroup_id, gen, k)), False, hits)
    allow = bool(flags & allow_flag)
    full = cs if isinstance(cs, CompiledSet) else None
    return _resolve(hits, allow, allow, bool(flags & posture_flag), True, False, full)


_PROTO_BY_NUMBER: Final = {
    6: Proto.TCP,
    17: Proto.UDP,
    1: Proto.ICMP,
    58: Proto.ICMPV6,
    132: Proto.SCTP,
}


def socket_protos(family: int, type_: int, protocol: int) -> tuple[Proto, ...]:
    """Protocol names a socket answers to (matcher rule N1; as_socket_protos in netblock.bpf.c).

    Only AF_INET/AF_INET6 sockets are network events. The protocol number names it;
    protocol 0 takes tcp/udp from the type; a SOCK_RAW socket is also "raw".
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        return ()
    t = type_ & 0xF  # without SOCK_NONBLOCK / SOCK_CLOEXEC
    out: list[Proto] = []
    p = _PROTO_BY_NUMBER.get(protocol)
    if p is not None:
        out.append(p)
    elif protocol == 0 and t == socket.SOCK_STREAM:
        out.append(Proto.TCP)
    elif protocol == 0 and t == socket.SOCK_DGRAM:
        out.append(Proto.UDP)
    if t == socket.SOCK_RAW:
        out.append(Proto.RAW)
    return tuple(out)


def lookup_socket(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]],
    cgroup_id: int,
    family: int,
    type_: int,
    protocol: int,
) -> Decision:
    """socket_create / cgroup sock_create (capability net_raw is compiled into "raw")."""
    protos = socket_protos(family, type_, protocol)
    if not protos:
        return _NOTHING
    return _lookup_simple(cs, cgroup_id, MAP_NET, protos, WlFlag.ALLOW_NET, WlFlag.POSTURE_NET_BLOCK)


def lookup_capability(
    cs: CompiledSet | Mapping[str, Mapping[bytes, bytes]], cgroup_id: int, cap: int
) -> Decision:
    """capable(): the capability's number (CAPABILITIES)."""
    return _lookup_simple(cs, cgroup_id, MAP_CAP, (cap,), WlFlag.ALLOW_CAP, WlFlag.POSTURE_CAP_BLOCK)
