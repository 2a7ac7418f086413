"""`armorstream` entry point.

Subcommands live in their own modules and are imported only when run, so
`armorstream --help` stays fast and a broken optional dependency of one
command (faust, chdb, libbpf) never breaks the others.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click command or group
COMMANDS: dict[str, tuple[str, str]] = {
    "policy": (
        "armorstream.policy_cmd:policy",
        "Validate KubeArmor policies and simulate their verdicts.",
    ),
    "clickhouse": (
        "armorstream.clickhouse_cmd:clickhouse",
        "Embedded ClickHouse: serve the store over HTTP, run migrations.",
    ),
    "stream": (
        "armorstream.stream_cmd:stream",
        "Run a stream worker: raw batches to alerts, logs and history.",
    ),
    "controller": (
        "armorstream.controller_cmd:controller",
        "Publish pods, namespaces and policies to the control topics.",
    ),
    "sensor": ("armorstream.sensor_cmd:sensor", "Run the kernel sensor: BPF monitors to the raw topic."),
    "query": ("armorstream.query_cmd:query", "SOC reports and SQL over the ClickHouse history."),
    "logs": ("armorstream.logs_cmd:logs", "Alerts and logs from the SIEM topics, like karmor logs."),
    "up": ("armorstream.up:up", "Run the whole pipeline on this machine, under one supervisor."),
    "status": ("armorstream.status_cmd:status", "Health and counters of a running `armorstream up`."),
    "conformance": ("armorstream.conformance_cmd:conformance", "Run KubeArmor-style enforcement scenarios."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, _ = COMMANDS[cmd_name]
        module_name, attr = target.split(":")
        cmd = getattr(importlib.import_module(module_name), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text without importing every command module.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="armorstream")
def cli() -> None:
    """armorstream: runtime security for Kubernetes and Linux hosts.

    eBPF sensors see process, file, network and capability events; Block rules
    from KubeArmor policies are enforced in the kernel; a Faust stream turns
    events into KubeArmor-compatible alerts on Kafka and history in ClickHouse.
    """


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
