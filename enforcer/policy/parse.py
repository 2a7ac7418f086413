"""Validate KubeArmor policies and build the typed model from them.

Validation runs in two passes and reports every problem of a document at once:

1. structure: `enforcer.policy.schema.json_schema(kind)` (KubeArmor's CRD schema plus
   apiVersion, kind, metadata.name and no unknown fields) through jsonschema;
2. meaning: what the schema cannot say (one of path/execname, protocol and capability
   names, globs that compile, fromSource entries that name something, the CEL rules of
   KubeArmorNetworkPolicy, ...).

Only a document without errors is turned into a `Policy`. Defaults follow KubeArmor's
daemon (core/kubeUpdate.go): a rule's severity/tags/message/action come from the rule,
else from its section (`spec.file.severity`, ...), else from the spec; a missing spec
action means Block; a missing severity means 1 (KubeArmor's documented default); a
KubeArmorPolicy without metadata.namespace lands in "default" (what kubectl does).
See docs/policy-validation.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from enforcer.errors import ArmorstreamError, PolicyError, PolicyErrors
from enforcer.policy.model import (
    Action,
    Capability,
    Expression,
    FileRule,
    FromSource,
    NetworkPolicyRule,
    NetworkRule,
    PeerPort,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    SyscallRule,
    Target,
)
from enforcer.policy.schema import (
    ACTIONS,
    API_VERSION,
    CAPABILITIES,
    CAPABILITY_PATTERN,
    DIR_PATTERN,
    GROUP,
    PATTERN_HINTS,
    PROTOCOL_PATTERN,
    PROTOCOLS,
    json_schema,
)

__all__ = [
    "CONTAINER_NAME_LABEL",
    "LineLookup",
    "PatternError",
    "compile_pattern",
    "format_path",
    "load_policies",
    "parse_file",
    "parse_policy",
    "parse_text",
    "policy_files",
    "validate_document",
    "yaml_lines",
]

CONTAINER_NAME_LABEL = "kubearmor.io/container.name"

FieldPath = tuple[str | int, ...]
# Maps a field path to the 1-based line it was read from (None when unknown).
LineLookup = Callable[[Sequence[str | int]], int | None]

_KINDS = {k.value: k for k in PolicyKind}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SERVICE_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA service name


class PatternError(ArmorstreamError, ValueError):
    """A matchPatterns glob that cannot be compiled."""


# -- public API -----------------------------------------------------------------------------------


def validate_document(
    doc: object, *, file: str = "<input>", document: int = 0, lines: LineLookup | None = None
) -> list[PolicyError]:
    """Every error of one policy document (empty when it is valid)."""
    return _validate(doc, _Errors(file, document, lines))[1]


def parse_policy(
    doc: Mapping[str, Any], *, file: str = "<input>", document: int = 0, lines: LineLookup | None = None
) -> Policy:
    """Validate one document (a dict from YAML or the Kubernetes API), then build its Policy.

    Raises PolicyErrors listing every error of the document.
    """
    plain, errors = _validate(doc, _Errors(file, document, lines))
    if errors:
        raise PolicyErrors(errors)
    return _build(plain, file)


def parse_text(text: str, file: str) -> tuple[list[Policy], list[PolicyError]]:
    """All policies of a multi-document YAML text, and all errors; never raises for bad input.

    Empty documents are skipped, and so are documents that are plainly not KubeArmor
    policies (another apiVersion group and kind, e.g. the Deployment a policy protects).
    """
    nodes, errors = _load_yaml(text, file)
    policies: list[Policy] = []
    for index, node in nodes:
        if node is None or _foreign(node):
            continue
        lines = yaml_lines(node)
        plain, doc_errors = _validate(node, _Errors(file, index, lines))
        if doc_errors:
            errors.extend(doc_errors)
        else:
            policies.append(_build(plain, file))
    errors.sort(key=lambda e: (e.document, e.line or 0))
    return policies, errors


def parse_file(path: str | Path) -> tuple[list[Policy], list[PolicyError]]:
    """parse_text on a file's contents; unreadable files become errors too."""
    name = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        return [], [PolicyError(name, "", f"cannot read file: {e.strerror or e}")]
    except UnicodeDecodeError as e:
        return [], [PolicyError(name, "", f"not UTF-8 text (byte {e.start})")]
    return parse_text(text, name)


def policy_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[PolicyError]]:
    """Expand files and directories (recursively: *.yaml, *.yml) into a file list."""
    files: list[Path] = []
    errors: list[PolicyError] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
            if not found:
                errors.append(PolicyError(str(p), "", "no *.yaml or *.yml files in this directory"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(PolicyError(str(p), "", "no such file or directory"))
    return files, errors


def load_policies(paths: Iterable[str | Path]) -> list[Policy]:
    """Every policy in the given files and directories; raises PolicyErrors with all errors."""
    files, errors = policy_files(paths)
    policies: list[Policy] = []
    for f in files:
        found, errs = parse_file(f)
        policies.extend(found)
        errors.extend(errs)
    if errors:
        raise PolicyErrors(errors)
    return policies


def format_path(path: Sequence[str | int]) -> str:
    """("spec", "file", "matchPaths", 0, "path") -> "spec.file.matchPaths[0].path"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:  # label keys such as kubearmor.io/container.name
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


def yaml_lines(root: object) -> LineLookup:
    """Line lookup over a ruamel.yaml round-trip node: the deepest existing node on the path."""

    def lookup(path: Sequence[str | int]) -> int | None:
        node = root
        line: int | None = getattr(getattr(root, "lc", None), "line", None)
        for key in path:
            try:
                if isinstance(node, CommentedMap) and isinstance(key, str) and key in node:
                    line = node.lc.key(key)[0]
                    node = node[key]
                elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
                    line = node.lc.item(key)[0]
                    node = node[key]
                else:
                    break
            except (LookupError, TypeError):  # merged (<<) keys carry no position
                break
        return None if line is None else line + 1

    return lookup


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a matchPatterns glob (AppArmor syntax) to a regex for `fullmatch`.

    `*` and `?` stay inside one path component, `**` crosses '/', `[...]`/`[^...]` are
    character classes, `{a,b}` alternatives (nestable), and a backslash escapes.
    """
    out: list[str] = []
    depth = 0
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == n:
                raise PatternError("ends with a lone '\\'")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            out.append(".*" if j - i > 1 else "[^/]*")
            i = j
            continue
        if ch == "?":
            out.append("[^/]")
        elif ch == "[":
            i = _char_class(pattern, i, out)
            continue
        elif ch == "{":
            depth += 1
            out.append("(?:")
        elif ch == "," and depth:
            out.append("|")
        elif ch == "}":
            if not depth:
                raise PatternError("'}' without a matching '{'")
            depth -= 1
            out.append(")")
        else:
            out.append(re.escape(ch))
        i += 1
    if depth:
        raise PatternError("'{' without a matching '}'")
    try:
        return re.compile("".join(out), re.DOTALL)
    except (re.error, RecursionError, OverflowError) as e:
        raise PatternError(str(e)) from None


def _char_class(pattern: str, start: int, out: list[str]) -> int:
    """Translate the class opening at `start`; return the index after its ']'."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] in "^!"
    if negate:
        i += 1
    body_start = i
    if i < len(pattern) and pattern[i] == "]":  # a leading ']' is literal
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    if i >= len(pattern):
        raise PatternError("'[' without a matching ']'")
    body = pattern[body_start:i]
    parts: list[str] = []
    k = 0
    while k < len(body):
        c = body[k]
        if c == "\\" and k + 1 < len(body):
            parts.append(re.escape(body[k + 1]))
            k += 2
            continue
        # '-' between two members is a range; everything else is literal (escaped so that
        # Python sees no nested sets or set operations).
        parts.append("-" if c == "-" and 0 < k < len(body) - 1 else re.escape(c))
        k += 1
    try:
        cls = "[" + ("^" if negate else "") + "".join(parts) + "]"
        re.compile(cls)
    except re.error as e:
        raise PatternError(f"bad character class [{body}]: {e}") from None
    out.append(cls)
    return i + 1


# -- loading YAML ---------------------------------------------------------------------------------


def _load_yaml(text: str, file: str) -> tuple[list[tuple[int, object]], list[PolicyError]]:
    yaml = YAML(typ="rt")
    # kubectl reads manifests as YAML 1.1 (yes/no/on/off are booleans), so do we.
    yaml.version = (1, 1)
    nodes: list[tuple[int, object]] = []
    index = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ruamel\.yaml.*")
            for index, node in enumerate(yaml.load_all(text)):
                nodes.append((index, node))
        return nodes, []
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(s for s in (e.context, e.problem) if s) or "invalid YAML"
        line = mark.line + 1 if mark is not None else None
        return nodes, [PolicyError(file, "", f"invalid YAML: {reason}", line, len(nodes))]
    except YAMLError as e:
        return nodes, [PolicyError(file, "", f"invalid YAML: {e}", None, len(nodes))]
    except RecursionError:
        return nodes, [PolicyError(file, "", "invalid YAML: nested too deeply", None, len(nodes))]
    except Exception as e:  # ruamel.yaml bugs on hostile input must not escape as tracebacks
        return nodes, [PolicyError(file, "", f"cannot parse YAML: {type(e).__name__}: {e}", None, len(nodes))]


def _foreign(node: object) -> bool:
    """True for a document that is some other Kubernetes object, not a (broken) policy."""
    if not isinstance(node, Mapping):
        return False
    api, kind = node.get("apiVersion"), node.get("kind")
    if not isinstance(api, str) or not isinstance(kind, str):
        return False
    return api.split("/")[0] != GROUP and kind not in _KINDS


# -- validation -----------------------------------------------------------------------------------


@dataclass
class _Errors:
    file: str
    document: int
    lines: LineLookup | None
    found: list[PolicyError] = field(default_factory=list)

    def add(self, path: FieldPath, reason: str) -> None:
        line = self.lines(path) if self.lines is not None else None
        err = PolicyError(self.file, format_path(path), reason, line, self.document)
        if err not in self.found:
            self.found.append(err)


def _validate(doc: object, errs: _Errors) -> tuple[dict[str, Any], list[PolicyError]]:
    if not isinstance(doc, Mapping):
        errs.add((), f"a policy document must be a mapping, got {_describe(doc)}")
        return {}, errs.found
    try:
        plain = _plain(doc, (), errs)
        kind = _kind(plain, errs)
        if kind is not None:
            for err in _validator(kind).iter_errors(plain):
                for path, reason in _explain(err, kind):
                    errs.add(path, reason)
            _check(kind, plain, errs)
    except RecursionError:
        errs.add((), "document is nested too deeply")
        return {}, errs.found
    errs.found.sort(key=lambda e: e.line or 0)
    return plain, errs.found


def _plain(node: object, path: FieldPath, errs: _Errors) -> Any:
    """Plain dict/list/str/int/... copy of a YAML or API document (ruamel types dropped)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            if not isinstance(k, str):
                errs.add(path, f"field names must be strings, got {_describe(k)}")
                k = str(k)
            out[str(k)] = _plain(v, (*path, str(k)), errs)
        return out
    if isinstance(node, list | tuple):
        return [_plain(v, (*path, i), errs) for i, v in enumerate(node)]
    if isinstance(node, bool | ScalarBoolean):  # ScalarBoolean (anchored bool) is an int subclass
        return bool(node)
    for t in (int, float, str):
        if isinstance(node, t):
            return t(node)
    return node


def _kind(doc: dict[str, Any], errs: _Errors) -> PolicyKind | None:
    kind = doc.get("kind")
    if isinstance(kind, str) and kind in _KINDS:
        return _KINDS[kind]
    expected = ", ".join(_KINDS)
    if "kind" not in doc:
        errs.add(("kind",), f"required field is missing (one of {expected})")
    elif not isinstance(kind, str):
        errs.add(("kind",), f"must be a string, got {_describe(kind)}")
    else:
        hint = difflib.get_close_matches(kind, _KINDS, n=1, cutoff=0.6)
        errs.add(("kind",), f"unknown kind {kind!r}: expected one of {expected}" + _did_you_mean(hint))
    if "apiVersion" not in doc:
        errs.add(("apiVersion",), f"required field is missing ({API_VERSION})")
    elif doc["apiVersion"] != API_VERSION:
        errs.add(("apiVersion",), f"must be {API_VERSION}, got {_show(doc['apiVersion'])}")
    return None


@cache
def _validator(kind: PolicyKind) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(json_schema(kind))


_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
}


def _explain(err: jsonschema.ValidationError, kind: PolicyKind) -> list[tuple[FieldPath, str]]:
    """One jsonschema error -> (field path, reason) pairs worded for policy authors."""
    path: FieldPath = tuple(err.absolute_path)
    value = err.instance
    v = err.validator
    if v == "required":
        assert isinstance(value, dict)
        return [((*path, p), "required field is missing") for p in err.validator_value if p not in value]
    if v == "additionalProperties":
        assert isinstance(value, dict)
        allowed = list(err.schema.get("properties", {}))
        return [((*path, k), _unknown_field(kind, path, k, allowed)) for k in value if k not in allowed]
    if v == "type":
        return [
            (
                path,
                f"must be {_TYPE_WORDS.get(err.validator_value, err.validator_value)}, "
                f"got {_describe(value)}",
            )
        ]
    if v == "enum":
        return [(path, _enum_reason(value, err.validator_value))]
    if v == "const":
        return [(path, f"must be {err.validator_value}, got {_show(value)}")]
    if v == "pattern":
        hint = PATTERN_HINTS.get(err.validator_value, f"must match {err.validator_value}")
        return [(path, f"{hint}, got {_show(value)}")]
    if v in ("minimum", "maximum"):
        lo, hi = err.schema.get("minimum"), err.schema.get("maximum")
        bounds = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else (f"at least {lo}" if lo is not None else f"at most {hi}")
        )
        return [(path, f"must be {bounds}, got {_show(value)}")]
    if v == "minLength":
        return [(path, "must not be empty")]
    if v == "maxLength":
        return [(path, f"must be at most {err.validator_value} characters long, got {len(value)}")]
    if v == "maxItems":
        return [(path, f"must have at most {err.validator_value} entries, got {len(value)}")]
    return [(path, err.message)]


def _enum_reason(value: object, allowed: list[str]) -> str:
    reason = f"must be one of {', '.join(allowed)}, got {_show(value)}"
    if allowed == ACTIONS and isinstance(value, str):
        if value in ("AllowWithAudit", "BlockWithAudit"):
            return reason + " (KubeArmor dropped AllowWithAudit/BlockWithAudit: use Allow or Block)"
        if value.capitalize() in ACTIONS:
            return reason + f" (actions are case-sensitive: {value.capitalize()})"
    if len(allowed) > 20:  # the syscall list
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        return f"unknown syscall {_show(value)}" + _did_you_mean(hint)
    return reason


def _unknown_field(kind: PolicyKind, path: FieldPath, key: str, allowed: list[str]) -> str:
    section = path[1] if len(path) > 1 else None
    if key == "readOnly" and section == "process":
        return "readOnly applies only to file rules"
    if key == "recursive" and path[-2:-1] in (("matchPaths",), ("matchPatterns",)):
        return "recursive applies only to matchDirectories"
    if key in ("dir", "recursive") and path[-2:-1] == ("fromSource",) and section != "syscalls":
        return f"fromSource entries take only path here ({key} is for syscalls rules)"
    if key == "fromSource" and path[-2:-1] == ("matchPatterns",):
        return "matchPatterns rules take no fromSource"
    if path == ("spec", "selector") and key == "matchLabels" and kind is PolicyKind.CSP:
        return "cluster policies select with matchExpressions (key: namespace or label), not matchLabels"
    if path == ("spec",) and key == "selector" and kind is PolicyKind.HSP:
        return "host policies select nodes with nodeSelector, not selector"
    if path == ("spec",) and key == "nodeSelector" and kind in (PolicyKind.KSP, PolicyKind.CSP):
        return "nodeSelector is for KubeArmorHostPolicy; this kind uses selector"
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"unknown field (allowed: {', '.join(sorted(allowed))})" + _did_you_mean(hint)


def _did_you_mean(hint: list[str]) -> str:
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    # bool before int: bool is an int subclass.
    kinds = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))
    name = next((n for t, n in kinds if isinstance(value, t)), type(value).__name__)
    return f"{name} {_show(value)}"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- semantic checks (what the schema cannot express) ---------------------------------------------


def _check(kind: PolicyKind, doc: dict[str, Any], errs: _Errors) -> None:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    if kind is PolicyKind.NSP:
        _check_network_policy(spec, errs)
        return
    if _rule_count(spec) == 0:
        errs.add(
            ("spec",), "the policy has no rules: add process, file, network, capabilities or syscalls rules"
        )
    for section in ("process", "file"):
        for key, rules in _lists(spec, section, ("matchPaths", "matchDirectories", "matchPatterns")):
            for i, rule in _dicts(rules):
                p: FieldPath = ("spec", section, key, i)
                _check_rule_paths(rule, p, errs)
                if key == "matchPaths" and section == "process":
                    if "path" not in rule and "execname" not in rule:
                        errs.add(p, "needs path or execname")
                    elif "path" in rule and "execname" in rule:
                        errs.add((*p, "execname"), "use either path or execname, not both")
                if key == "matchPatterns" and isinstance(rule.get("pattern"), str):
                    _check_glob(rule["pattern"], (*p, "pattern"), errs)
                _check_from_source(rule, p, errs)
    for key, rules in _lists(spec, "network", ("matchProtocols", "matchDNSQueries")):
        for i, rule in _dicts(rules):
            p = ("spec", "network", key, i)
            if isinstance(rule.get("protocol"), str) and re.search(PROTOCOL_PATTERN, rule["protocol"]):
                for name in _split_list(rule["protocol"]):
                    if name.lower() not in PROTOCOLS:
                        errs.add(
                            (*p, "protocol"), f"unknown protocol {name!r} (one of {', '.join(PROTOCOLS)})"
                        )
            if isinstance(rule.get("domain"), str) and not rule["domain"].strip():
                errs.add((*p, "domain"), "must not be empty")
            _check_from_source(rule, p, errs)
    for i, rule in _dicts(_get(spec, "capabilities", "matchCapabilities")):
        p = ("spec", "capabilities", "matchCapabilities", i)
        if isinstance(rule.get("capability"), str) and re.search(CAPABILITY_PATTERN, rule["capability"]):
            for name in _split_list(rule["capability"]):
                if _capability(name) is None:
                    errs.add(
                        (*p, "capability"),
                        f"{name!r} is not a capability KubeArmor supports (e.g. net_raw, sys_admin, chown)",
                    )
        _check_from_source(rule, p, errs)
    for key, rules in _lists(spec, "syscalls", ("matchSyscalls", "matchPaths")):
        for i, rule in _dicts(rules):
            p = ("spec", "syscalls", key, i)
            if not rule.get("syscall"):
                errs.add((*p, "syscall"), "list at least one syscall")
            if key == "matchPaths":
                if "path" not in rule:
                    errs.add((*p, "path"), "required field is missing")
                _check_rule_paths(rule, p, errs)
            _check_syscall_sources(rule, p, errs)
    _check_selector(kind, spec, errs)


def _rule_count(spec: dict[str, Any]) -> int:
    keys = {
        "process": ("matchPaths", "matchDirectories", "matchPatterns"),
        "file": ("matchPaths", "matchDirectories", "matchPatterns"),
        "network": ("matchProtocols", "matchDNSQueries"),
        "capabilities": ("matchCapabilities",),
        "syscalls": ("matchSyscalls", "matchPaths"),
        "device": ("matchDevice",),
    }
    count = sum(len(rules) for section, names in keys.items() for _, rules in _lists(spec, section, names))
    # A raw AppArmor profile or presets are rules too (KubeArmor applies them as they are).
    apparmor = spec.get("apparmor")
    presets = spec.get("presets")
    return (
        count
        + (isinstance(apparmor, str) and bool(apparmor.strip()))
        + (len(presets) if isinstance(presets, list) else 0)
    )


def _check_rule_paths(rule: dict[str, Any], p: FieldPath, errs: _Errors) -> None:
    for key in ("path", "dir", "pattern", "execname"):
        value = rule.get(key)
        if isinstance(value, str) and _CONTROL.search(value):
            errs.add((*p, key), "must not contain control characters (newline, tab, ...)")


def _check_glob(pattern: str, p: FieldPath, errs: _Errors) -> None:
    if not pattern.startswith("/"):
        errs.add(p, f"must be an absolute path glob (start with '/'), got {_show(pattern)}")
        return
    try:
        compile_pattern(pattern)
    except PatternError as e:
        errs.add(p, f"invalid glob: {e}")


def _check_from_source(rule: dict[str, Any], p: FieldPath, errs: _Errors) -> None:
    for j, src in _dicts(rule.get("fromSource")):
        if not src:  # other keys are already reported as unknown fields
            errs.add((*p, "fromSource", j, "path"), "required field is missing")
        else:
            _check_rule_paths(src, (*p, "fromSource", j), errs)


def _check_syscall_sources(rule: dict[str, Any], p: FieldPath, errs: _Errors) -> None:
    for j, src in _dicts(rule.get("fromSource")):
        q = (*p, "fromSource", j)
        if "path" not in src and "dir" not in src:
            errs.add(q, "needs path or dir")
        elif "path" in src and "dir" in src:
            errs.add((*q, "dir"), "use either path or dir, not both")
        d = src.get("dir")
        if isinstance(d, str) and not (d.startswith("/") and d.endswith("/")):
            errs.add((*q, "dir"), f"{PATTERN_HINTS[DIR_PATTERN]}, got {_show(d)}")
        if src.get("recursive") and "dir" not in src:
            errs.add((*q, "recursive"), "recursive applies only to dir")
        _check_rule_paths(src, q, errs)


def _check_selector(kind: PolicyKind, spec: dict[str, Any], errs: _Errors) -> None:
    selector = spec.get("selector")
    if isinstance(selector, dict):
        for i, expr in _dicts(selector.get("matchExpressions")):
            p = ("spec", "selector", "matchExpressions", i)
            for key in ("key", "operator"):
                if key not in expr:
                    errs.add((*p, key), "required field is missing")
            if not expr.get("values"):
                errs.add((*p, "values"), "In and NotIn need at least one value")
            if expr.get("key") == "label":
                for j, value in enumerate(expr.get("values") or ()):
                    if isinstance(value, str) and "=" not in value:
                        errs.add((*p, "values", j), f"a label expression is key=value, got {_show(value)}")
        labels = selector.get("matchLabels")
        if kind is PolicyKind.KSP and isinstance(labels, dict):
            value = labels.get(CONTAINER_NAME_LABEL)
            if isinstance(value, str) and not _CONTAINER_LIST.match(value.strip()):
                errs.add(
                    ("spec", "selector", "matchLabels", CONTAINER_NAME_LABEL),
                    f'must be "[name,...]", "[]" or "", got {_show(value)}',
                )


_CONTAINER_LIST = re.compile(r"^(\[[^\[\]]*\]|[^\[\]]*)$")


def _check_network_policy(spec: dict[str, Any], errs: _Errors) -> None:
    selector = spec.get("selector")
    containers = isinstance(selector, dict) and ("matchLabels" in selector or "matchExpressions" in selector)
    if containers and "nodeSelector" in spec:
        errs.add(("spec",), "a policy cannot target both containers (selector) and host nodes (nodeSelector)")
    count = 0
    for direction, peer in (("ingress", "from"), ("egress", "to")):
        for i, rule in _dicts(spec.get(direction)):
            count += 1
            p: FieldPath = ("spec", direction, i)
            if containers and not ("limit" in rule and "duration" in rule):
                errs.add(
                    p,
                    "container policies support only bandwidth quota rules: "
                    "each rule needs both limit and duration",
                )
            for j, target in _dicts(rule.get(peer)):
                block = target.get("ipBlock")
                cidr = block.get("cidr") if isinstance(block, dict) else None
                if isinstance(cidr, str):
                    try:
                        ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        errs.add((*p, peer, j, "ipBlock", "cidr"), f"not a valid CIDR: {_show(cidr)}")
            for j, port in _dicts(rule.get("ports")):
                _check_port(port, (*p, "ports", j), errs)
    if count == 0:
        errs.add(("spec",), "the policy has no rules: add ingress or egress rules")


def _check_port(port: dict[str, Any], p: FieldPath, errs: _Errors) -> None:
    value = port.get("port")
    if not isinstance(value, str):
        return
    if value.isdigit():
        if not 1 <= int(value) <= 65535:
            errs.add((*p, "port"), f"must be between 1 and 65535, got {_show(value)}")
        end = port.get("endPort")
        if isinstance(end, int) and not isinstance(end, bool) and end < int(value):
            errs.add((*p, "endPort"), f"must not be below port {value}, got {end}")
    elif not _SERVICE_NAME.match(value):
        errs.add((*p, "port"), f"must be a port number or a service name such as dns, got {_show(value)}")
    elif "endPort" in port:
        errs.add((*p, "endPort"), "needs a numeric port")


def _get(spec: dict[str, Any], section: str, key: str) -> object:
    sec = spec.get(section)
    return sec.get(key) if isinstance(sec, dict) else None


def _lists(spec: dict[str, Any], section: str, keys: Iterable[str]) -> list[tuple[str, list[Any]]]:
    out = []
    for key in keys:
        value = _get(spec, section, key)
        if isinstance(value, list):
            out.append((key, value))
    return out


def _dicts(value: object) -> list[tuple[int, dict[str, Any]]]:
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)] if isinstance(value, list) else []


def _split_list(value: str) -> list[str]:
    """KubeArmor expands "tcp,udp" into one rule per item and drops every space."""
    return value.replace(" ", "").split(",")


def _capability(name: str) -> str | None:
    """net_raw, cap_net_raw -> net_raw; None when KubeArmor does not know it."""
    low = name.lower()
    low = low.removeprefix("cap_")
    return low if low in CAPABILITIES else None


# -- building the model ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Level:
    """severity/tags/message/action at one level (spec or section); 0/empty means unset."""

    severity: int = 0
    tags: tuple[str, ...] = ()
    message: str = ""
    action: str = ""

    @staticmethod
    def of(d: Mapping[str, Any]) -> _Level:
        return _Level(
            int(d.get("severity", 0)), tuple(d.get("tags", ())), d.get("message", ""), d.get("action", "")
        )


def _meta(rule: Mapping[str, Any], section: _Level, spec: _Level, *, action: str | None = None) -> RuleMeta:
    # KubeArmor's CreateSecurityPolicy: the first non-zero/non-empty of rule, section, spec.
    r = _Level.of(rule)
    return RuleMeta(
        action=Action(action or r.action or section.action or spec.action),
        severity=r.severity or section.severity or spec.severity,
        tags=r.tags or section.tags or spec.tags,
        message=r.message or section.message or spec.message,
    )


def _sources(rule: Mapping[str, Any]) -> tuple[FromSource, ...]:
    return tuple(
        FromSource(path=s.get("path"), dir=s.get("dir"), recursive=bool(s.get("recursive", False)))
        for s in rule.get("fromSource", ())
    )


def _build(doc: dict[str, Any], file: str) -> Policy:
    kind = _KINDS[doc["kind"]]
    spec: dict[str, Any] = doc["spec"]
    meta: dict[str, Any] = doc["metadata"]
    top = _Level(
        int(spec.get("severity", 1)),
        tuple(spec.get("tags", ())),
        spec.get("message", ""),
        spec.get("action", "Block"),
    )
    common: dict[str, Any] = dict(
        kind=kind,
        name=meta["name"],
        namespace=meta.get("namespace", "default") if kind is PolicyKind.KSP else None,
        selector=_selector(kind, spec),
        action=Action(top.action),
        severity=top.severity,
        tags=top.tags,
        message=top.message,
        source_file=file,
        raw=doc,
    )
    if kind is PolicyKind.NSP:
        return Policy(
            **common, ingress=_bandwidth(spec, "ingress", top), egress=_bandwidth(spec, "egress", top)
        )
    return Policy(
        **common,
        process=_process_rules(spec, top),
        file=_file_rules(spec, top),
        network=_network_rules(spec, top),
        capabilities=_capability_rules(spec, top),
        syscalls=_syscall_rules(spec, top),
    )


def _section(spec: dict[str, Any], name: str) -> tuple[dict[str, Any], _Level]:
    sec: dict[str, Any] = spec.get(name) or {}
    return sec, _Level.of(sec)


def _process_rules(spec: dict[str, Any], top: _Level) -> tuple[ProcessRule, ...]:
    sec, level = _section(spec, "process")
    rules: list[ProcessRule] = []
    for r in sec.get("matchPaths", ()):
        exec_name = "path" not in r
        rules.append(
            ProcessRule(
                Target.PATH,
                r["execname"] if exec_name else r["path"],
                _meta(r, level, top),
                owner_only=r.get("ownerOnly", False),
                from_source=_sources(r),
                exec_name=exec_name,
                allowed_args=tuple(r.get("allowedArgs", ())),
            )
        )
    for r in sec.get("matchDirectories", ()):
        rules.append(
            ProcessRule(
                Target.DIR,
                r["dir"],
                _meta(r, level, top),
                recursive=r.get("recursive", False),
                owner_only=r.get("ownerOnly", False),
                from_source=_sources(r),
            )
        )
    for r in sec.get("matchPatterns", ()):
        rules.append(
            ProcessRule(
                Target.PATTERN, r["pattern"], _meta(r, level, top), owner_only=r.get("ownerOnly", False)
            )
        )
    return tuple(rules)


def _file_rules(spec: dict[str, Any], top: _Level) -> tuple[FileRule, ...]:
    sec, level = _section(spec, "file")
    rules: list[FileRule] = []
    for key, target, value_key in (
        ("matchPaths", Target.PATH, "path"),
        ("matchDirectories", Target.DIR, "dir"),
        ("matchPatterns", Target.PATTERN, "pattern"),
    ):
        for r in sec.get(key, ()):
            rules.append(
                FileRule(
                    target,
                    r[value_key],
                    _meta(r, level, top),
                    recursive=r.get("recursive", False),
                    owner_only=r.get("ownerOnly", False),
                    read_only=r.get("readOnly", False),
                    from_source=_sources(r),
                )
            )
    return tuple(rules)


def _network_rules(spec: dict[str, Any], top: _Level) -> tuple[NetworkRule, ...]:
    sec, level = _section(spec, "network")
    return tuple(
        NetworkRule(name.lower(), _meta(r, level, top), _sources(r))
        for r in sec.get("matchProtocols", ())
        for name in _split_list(r["protocol"])
    )


def _capability_rules(spec: dict[str, Any], top: _Level) -> tuple[Capability, ...]:
    sec, level = _section(spec, "capabilities")
    out: list[Capability] = []
    for r in sec.get("matchCapabilities", ()):
        for name in _split_list(r["capability"]):
            cap = _capability(name)
            assert cap is not None  # validated
            out.append(Capability(cap, _meta(r, level, top), _sources(r)))
    return tuple(out)


def _syscall_rules(spec: dict[str, Any], top: _Level) -> tuple[SyscallRule, ...]:
    sec, level = _section(spec, "syscalls")
    # Syscall rules carry no action in KubeArmor: they are audited.
    out = [
        SyscallRule(tuple(r["syscall"]), _meta(r, level, top, action=Action.AUDIT), from_source=_sources(r))
        for r in sec.get("matchSyscalls", ())
    ]
    out += [
        SyscallRule(
            tuple(r["syscall"]),
            _meta(r, level, top, action=Action.AUDIT),
            path=r["path"],
            recursive=r.get("recursive", False),
            from_source=_sources(r),
        )
        for r in sec.get("matchPaths", ())
    ]
    return tuple(out)


def _selector(kind: PolicyKind, spec: dict[str, Any]) -> Selector:
    selector: dict[str, Any] = spec.get("selector") or {}
    if kind is PolicyKind.HSP or (kind is PolicyKind.NSP and not selector and "nodeSelector" in spec):
        selector = spec.get("nodeSelector") or {}
    labels: dict[str, str] = dict(selector.get("matchLabels") or {})
    containers: tuple[str, ...] | None = None
    if kind is PolicyKind.KSP and CONTAINER_NAME_LABEL in labels:
        containers = _container_names(labels.pop(CONTAINER_NAME_LABEL))
    expressions = tuple(
        Expression(e["key"], e["operator"], tuple(e["values"])) for e in selector.get("matchExpressions", ())
    )
    return Selector(tuple(sorted(labels.items())), containers, expressions)


def _container_names(value: str) -> tuple[str, ...]:
    """ "[a, b]" -> ("a", "b"); "[]" and "" -> () (all containers); a bare "a" -> ("a",)."""
    inner = value.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    return tuple(name.strip() for name in inner.split(",") if name.strip())


def _bandwidth(spec: dict[str, Any], direction: str, top: _Level) -> tuple[NetworkPolicyRule, ...]:
    peer = "from" if direction == "ingress" else "to"
    return tuple(
        NetworkPolicyRule(
            direction,
            _meta(r, _Level(), top),
            cidrs=tuple(t["ipBlock"]["cidr"] for t in r.get(peer, ())),
            ports=tuple(
                PeerPort(p["port"], p.get("endPort"), p["protocol"].lower() if "protocol" in p else None)
                for p in r.get("ports", ())
            ),
            interfaces=tuple(r.get("iface", ())),
            limit=r.get("limit"),
            duration=r.get("duration"),
        )
        for r in spec.get(direction, ())
    )
