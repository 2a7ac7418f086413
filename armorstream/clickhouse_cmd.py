"""`armorstream clickhouse`: the embedded ClickHouse store (serve it over HTTP, migrate it)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from enforcer.errors import ArmorstreamError

DEFAULT_PATH = Path("/var/lib/armorstream/clickhouse")


def _fail(e: ArmorstreamError) -> None:
    raise click.ClickException(str(e)) from None


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@click.group()
def clickhouse() -> None:
    """Embedded ClickHouse (chdb): serve the store over HTTP, run migrations."""


@clickhouse.command()
@click.option(
    "--path",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_PATH,
    show_default=True,
    help="chdb data directory.",
)
@click.option("--listen", default="127.0.0.1:8123", show_default=True, help="HOST:PORT to listen on.")
@click.option("--database", default="armorstream", show_default=True, help="Database to create and migrate.")
@click.option(
    "--migrate/--no-migrate", default=True, show_default=True, help="Apply schema migrations first."
)
def serve(path: Path, listen: str, database: str, migrate: bool) -> None:
    """Serve the embedded store over ClickHouse's HTTP interface (curl, clickhouse-connect, Grafana).

    There is no authentication: keep it on loopback or behind a proxy that authenticates.
    """
    from stream.chhttp import ChdbHttpServer
    from stream.store import StoreConfig, open_store

    host, port = _listen(listen)
    try:
        if migrate:
            open_store(StoreConfig(path=path, database=database)).close()
        server = ChdbHttpServer(path, host, port).start()
    except ArmorstreamError as e:
        _fail(e)
        return
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"serving {path} on {server.url} (database {database}); Ctrl-C stops", err=True)
    stop.wait()
    server.stop()


@clickhouse.command()
@click.option(
    "--path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="chdb data directory (default: CLICKHOUSE_URL, else the standard directory).",
)
@click.option("--database", default="armorstream", show_default=True)
@click.option(
    "--retention-days",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="TTL of events and alerts (0 keeps forever).",
)
@click.option(
    "--rollup-retention-days",
    type=click.IntRange(min=0),
    default=400,
    show_default=True,
    help="TTL of the per-minute/per-hour rollups (0 keeps forever).",
)
def migrate(path: Path | None, database: str, retention_days: int, rollup_retention_days: int) -> None:
    """Create or upgrade the schema (idempotent) and apply the retention settings."""
    import os

    from stream.store import StoreConfig, open_store

    try:
        if path is None and not os.environ.get("CLICKHOUSE_URL"):
            path = DEFAULT_PATH
        config = StoreConfig.from_env(
            path,
            database=database,
            retention_days=retention_days,
            rollup_retention_days=rollup_retention_days,
        )
        with open_store(config, migrate=False) as store:
            applied = store.migrate()
            versions = store.applied_migrations()
    except ArmorstreamError as e:
        _fail(e)
        return
    now = ", ".join(map(str, applied)) or "none"
    click.echo(f"{store.backend} {database}: schema at version {max(versions)} (applied now: {now})")
