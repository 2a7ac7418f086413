"""`armorstream policy ...`: validate KubeArmor policies (simulate lives in its own module)."""

from __future__ import annotations

from pathlib import Path

import click

from enforcer.errors import PolicyError
from enforcer.policy import parse_file, policy_files

__all__ = ["policy"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def policy() -> None:
    """Validate KubeArmor policies and simulate their verdicts."""


@policy.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(paths: tuple[Path, ...]) -> None:
    """Check KubeArmor policy files (or directories of *.yaml/*.yml, recursively).

    Prints one line per error (file:line: field.path: reason) and exits 1 if any.
    Documents that are other Kubernetes objects (Deployments, ...) are skipped.
    """
    files, errors = policy_files(paths)
    valid = 0
    for f in files:
        found, errs = parse_file(f)
        valid += len(found)
        errors.extend(errs)
    for e in errors:
        click.echo(_format(e))
    bad_files = len({e.file for e in errors})
    summary = (
        f"{_count(valid, 'policy', 'policies')} valid, {_count(len(errors), 'error', 'errors')} "
        f"in {_count(bad_files, 'file', 'files')}"
    )  # fmt: skip
    if not errors and valid == 0:
        click.secho("no KubeArmor policies found", fg="red", err=True)
        raise SystemExit(1)
    click.secho(summary, fg="red" if errors else "green")
    if errors:
        raise SystemExit(1)


def _format(e: PolicyError) -> str:
    where = e.file if e.line is None else f"{e.file}:{e.line}"
    if e.document:
        where += f" (document {e.document + 1})"
    field = f"{click.style(e.path, fg='yellow')}: " if e.path else ""
    return f"{click.style(where, bold=True)}: {field}{e.reason}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _register_simulate() -> None:
    # simulate lives in its own module (it pulls in the matcher); one `policy` group holds both.
    from armorstream.simulate_cmd import simulate

    policy.add_command(simulate)


_register_simulate()
