"""`armorstream policy simulate`: KubeArmor Log records in, the Alert/Log KubeArmor would emit out."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import click
import orjson
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from enforcer.errors import ArmorstreamError, PolicyErrors
from enforcer.karmor_log import LogRecordError, event_from_log, workload_from_log
from enforcer.matcher import Matcher
from enforcer.policy.model import Policy
from enforcer.workload import DefaultPosture, Posture

__all__ = ["SimulationError", "parse_default_posture", "simulate", "simulate_lines"]

_KINDS = ("file", "network", "capabilities")


class SimulationError(ArmorstreamError):
    """Bad simulator input other than a bad event line (those are reported per line)."""


def parse_default_posture(specs: Iterable[str]) -> DefaultPosture:
    """ "block" / "audit" set every kind; "file=block,network=audit" set some."""
    values: dict[str, Posture] = {}
    for spec in specs:
        for part in spec.split(","):
            part = part.strip().lower()
            if not part:
                continue
            kind, eq, value = part.partition("=")
            if not eq:
                kind, value = "", kind
            if value not in ("audit", "block"):
                raise SimulationError(f"--default-posture: {value!r} is not audit or block")
            if kind and kind not in _KINDS:
                raise SimulationError(f"--default-posture: unknown kind {kind!r} (use {', '.join(_KINDS)})")
            for k in (kind,) if kind else _KINDS:
                values[k] = Posture(value)
    return DefaultPosture(**values)


def load_namespace_annotations(path: Path) -> dict[str, dict[str, str]]:
    """A YAML or JSON mapping: namespace -> {annotation: value}."""
    try:
        doc = YAML(typ="safe").load(path.read_text())
    except (OSError, YAMLError) as e:
        raise SimulationError(f"{path}: cannot read namespace annotations: {e}") from e
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise SimulationError(f"{path}: expected a mapping of namespace -> annotations")
    out: dict[str, dict[str, str]] = {}
    for ns, values in doc.items():
        if not isinstance(values, Mapping):
            raise SimulationError(f"{path}: {ns}: expected a mapping of annotation -> value")
        out[str(ns)] = {str(k): str(v) for k, v in values.items()}
    return out


def simulate_lines(matcher: Matcher, lines: Iterable[bytes], name: str = "<events>") -> Iterator[bytes | str]:
    """One output JSON line (bytes, newline-terminated) per record, or an error message (str).

    Every input field is kept; the verdict's fields (Action, Result, PolicyName, ...) are set.
    """
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            yield f"{name}:{lineno}: not valid JSON: {e}"
            continue
        if not isinstance(rec, dict):
            yield f"{name}:{lineno}: expected a JSON object, got {type(rec).__name__}"
            continue
        try:
            verdict = matcher.decide(workload_from_log(rec), event_from_log(rec))
        except LogRecordError as e:
            yield f"{name}:{lineno}: {e}"
            continue
        rec.update(verdict.fields())
        yield orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)


def _load_policies(paths: tuple[str, ...]) -> list[Policy]:
    try:
        from enforcer.policy.parse import load_policies
    except ImportError as e:  # the parser lands separately; say so instead of a traceback
        raise SimulationError(f"the policy parser is not available: {e}") from e
    return list(load_policies([Path(p) for p in paths]))


@click.command("simulate")
@click.option(
    "-f",
    "--file",
    "policy_paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Policy file or directory (repeatable).",
)
@click.option(
    "--namespace-annotations",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML/JSON: namespace -> annotations (kubearmor-file-posture: block, ...).",
)
@click.option(
    "--default-posture",
    "postures",
    multiple=True,
    metavar="POSTURE",
    help="Global default posture: audit|block for every kind, or file=block,network=audit,... "
    "(KubeArmor's default: audit).",
)
@click.option(
    "--events",
    required=True,
    type=click.File("rb"),
    help="KubeArmor Log records, one JSON object a line ('-' for stdin).",
)
def simulate(
    policy_paths: tuple[str, ...],
    namespace_annotations: Path | None,
    postures: tuple[str, ...],
    events: IO[bytes],
) -> None:
    """Print the Alert or Log KubeArmor would emit for each event, as JSON lines.

    Extra input fields: OwnerUID (file or binary owner, for ownerOnly), Write (bool,
    else derived from the open flags in Data), NodeLabels (k=v,... for host policies).
    """
    try:
        matcher = Matcher(
            _load_policies(policy_paths),
            parse_default_posture(postures),
            load_namespace_annotations(namespace_annotations) if namespace_annotations else None,
        )
    except PolicyErrors as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        sys.exit(1)
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from e

    out = click.get_binary_stream("stdout")
    bad = 0
    buf: list[bytes] = []
    for item in simulate_lines(matcher, events, getattr(events, "name", "<events>")):
        if isinstance(item, str):
            bad += 1
            click.echo(item, err=True)
            continue
        buf.append(item)
        if len(buf) >= 1024:
            out.write(b"".join(buf))
            buf.clear()
    out.write(b"".join(buf))
    out.flush()
    if bad:
        click.echo(f"{bad} bad event line(s)", err=True)
        sys.exit(1)
