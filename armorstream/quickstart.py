"""`python -m armorstream.quickstart`: a short demo of what exists (what `./dev run` runs).

1. Validates KubeArmor's example policies (../shared/kubearmor-examples, if present) and ours
   (examples/policies).
2. Simulates examples/events.jsonl against examples/policies, with the namespace
   annotations in examples/namespace-annotations.yaml, and prints each verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from armorstream.simulate_cmd import load_namespace_annotations, simulate_lines
from enforcer.errors import ArmorstreamError
from enforcer.matcher import Matcher
from enforcer.policy.model import Policy
from enforcer.policy.parse import parse_file, policy_files

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KUBEARMOR_EXAMPLES = ROOT.parent / "shared" / "kubearmor-examples"

_STYLE = {"Block": "bold red", "Audit": "yellow", "Allow": "green"}


def validate(console: Console, title: str, root: Path) -> tuple[list[Policy], int]:
    """Parse every policy file under root; print a one-line summary and any errors."""
    # KubeArmor's CRDs and workload manifests live beside its policies: not policies.
    entries = [
        p
        for p in sorted(root.iterdir())
        if (p.is_dir() and p.name not in ("crds", "workloads")) or p.suffix in (".yaml", ".yml")
    ]
    files, errors = policy_files(entries)
    policies: list[Policy] = []
    for f in files:
        found, errs = parse_file(f)
        policies.extend(found)
        errors.extend(errs)
    mark = "[green]ok[/]" if not errors else f"[red]{len(errors)} error(s)[/]"
    console.print(f"{title}: {len(files)} files, {len(policies)} policies, {mark}")
    for e in errors:
        console.print(f"  [red]{e}[/]")
    return policies, len(errors)


def main() -> int:
    console = Console()
    console.rule("armorstream quickstart: KubeArmor policies, validated and simulated")
    bad = 0
    if KUBEARMOR_EXAMPLES.is_dir():
        _, n = validate(console, f"KubeArmor examples ({KUBEARMOR_EXAMPLES})", KUBEARMOR_EXAMPLES)
        bad += n
    else:
        console.print(f"[dim]KubeArmor examples not found at {KUBEARMOR_EXAMPLES}; skipped[/]")
    policies, n = validate(console, "our examples (examples/policies)", EXAMPLES / "policies")
    bad += n

    annotations = load_namespace_annotations(EXAMPLES / "namespace-annotations.yaml")
    matcher = Matcher(policies, namespace_annotations=annotations)
    table = Table(title="examples/events.jsonl, as KubeArmor would report it (default posture: audit)")
    for col in ("where", "operation", "process", "resource", "action", "result", "policy", "type"):
        table.add_column(col, overflow="fold")
    with (EXAMPLES / "events.jsonl").open("rb") as events:
        for item in simulate_lines(matcher, events, "examples/events.jsonl"):
            if isinstance(item, str):
                console.print(f"[red]{item}[/]")
                bad += 1
                continue
            o = orjson.loads(item)
            where = (
                f"{o['NamespaceName']}/{o['PodName']}" if o.get("ContainerID") else f"host {o['HostName']}"
            )
            style = _STYLE.get(str(o["Action"]), "")
            table.add_row(
                where,
                str(o["Operation"]),
                str(o["ProcessName"]),
                str(o["Resource"]),
                f"[{style}]{o['Action']}[/]",
                str(o["Result"]),
                str(o["PolicyName"]) or "-",
                str(o["Type"]),
            )
    console.print(table)
    console.print(
        "Rules behind each verdict: docs/policy-semantics.md. Try: "
        "armorstream policy simulate -f examples/policies "
        "--namespace-annotations examples/namespace-annotations.yaml --events examples/events.jsonl"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ArmorstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
