"""Open the ClickHouse store (embedded chdb or a server), migrate it, translate its errors.

Embedded: clickhouse-connect's chdb interface on a data directory. chdb hosts one engine
per process and a second process on the same directory fails with an opaque message, so
the store takes an exclusive lock file first and names the holder when it cannot.
Server: `CLICKHOUSE_URL=http(s)://user:pass@host:port/db` (clickhouse-connect's HTTP client).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from enforcer.errors import ArmorstreamError
from stream.store.schema import LEDGER_KIND, MIGRATIONS, RAW_TABLES, ROLLUP_TABLES, SchemaSettings

__all__ = [
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "lock_directory",
    "open_store",
    "translate_errors",
    "unlock_directory",
]

LOCK_NAME = "armorstream.lock"
_CODE_RE = re.compile(r"Code: (\d+)")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StoreError(ArmorstreamError):
    """ClickHouse refused a statement (bad SQL, missing table): retrying will not help."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """ClickHouse cannot be reached or is overloaded: back off and retry the same batch."""


class StoreLocked(StoreError):
    """The embedded data directory is open in another process."""


# ClickHouse error codes that mean "try again later", not "your statement is wrong".
_TRANSIENT_CODES = frozenset({159, 164, 202, 203, 209, 210, 241, 242, 252, 425, 439})


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Raise StoreError/StoreUnavailable instead of clickhouse-connect's and chdb's types."""
    try:
        yield
    except ArmorstreamError:
        raise
    except (ClickHouseError, RuntimeError, OSError) as e:
        text = str(e)
        m = _CODE_RE.search(text)
        code = int(m.group(1)) if m else getattr(e, "code", None)
        transient = code in _TRANSIENT_CODES or (code is None and isinstance(e, OperationalError | OSError))
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        cls = StoreUnavailable if transient else StoreError
        raise cls(f"{what}: {first}", code) from e


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the store is and how long it keeps data (days; 0 keeps forever)."""

    path: Path | None = None  # embedded chdb data directory
    url: str | None = None  # http(s)://user:pass@host:port/db of a ClickHouse server
    database: str = "armorstream"
    retention_days: int = 30  # events, alerts, the batch ledger
    rollup_retention_days: int = 400  # per-minute/per-hour counts
    dedup_window: int = 10_000
    settings: dict[str, Any] = field(default_factory=dict)  # extra client settings

    @classmethod
    def from_env(cls, path: Path | None = None, **kw: Any) -> StoreConfig:
        """CLICKHOUSE_URL wins over the embedded path, as the issue asks."""
        url = os.environ.get("CLICKHOUSE_URL") or None
        if url is None and path is None:
            raise StoreError("no ClickHouse target: give a data directory or set CLICKHOUSE_URL")
        return cls(path=None if url else path, url=url, **kw)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise StoreError("StoreConfig needs exactly one of path (embedded) or url (server)")
        if self.url and urlsplit(self.url).path.strip("/"):
            object.__setattr__(self, "database", urlsplit(self.url).path.strip("/"))
        if not _IDENT_RE.match(self.database):
            raise StoreError(f"database name {self.database!r} is not a plain identifier")
        if self.retention_days < 0 or self.rollup_retention_days < 0:
            raise StoreError("retention days must be >= 0 (0 keeps data forever)")


class _DirLock:
    """An flock on DIR/armorstream.lock, held while the store is open in this process."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise StoreLocked(
                f"ClickHouse data directory {directory} is in use by {holder}; "
                "chdb allows one process per directory: stop it, or query it through "
                "`armorstream clickhouse serve` (HTTP)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} ({' '.join(sys.argv[:3])})\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


# Embedded locks are per process; clients on the same directory share one.
_LOCKS: dict[Path, tuple[_DirLock, int]] = {}


def lock_directory(directory: Path) -> Path:
    """Take (or share, within this process) the data directory's lock; returns its key."""
    key = directory.resolve()
    lock, users = _LOCKS.get(key, (None, 0))
    _LOCKS[key] = (lock or _DirLock(key), users + 1)
    return key


def unlock_directory(key: Path) -> None:
    lock, users = _LOCKS[key]
    if users <= 1:
        lock.release()
        del _LOCKS[key]
    else:
        _LOCKS[key] = (lock, users - 1)


class Store:
    """An open, migrated store. Not thread-safe: one Store per thread."""

    def __init__(self, config: StoreConfig, client: Client, lock_key: Path | None) -> None:
        self.config = config
        self.client = client
        self._lock_key = lock_key

    @property
    def backend(self) -> str:
        return "chdb" if self.config.path is not None else "http"

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with translate_errors("ClickHouse command failed"):
            return self.client.command(sql, parameters=parameters)

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> Sequence[Sequence[Any]]:
        with translate_errors("ClickHouse query failed"):
            return self.client.query(sql, parameters=parameters).result_rows

    def applied_migrations(self) -> list[int]:
        return [
            int(r[0]) for r in self.rows("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
        ]

    def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded, in order; returns the versions applied now."""
        self.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
            "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = set(self.applied_migrations())
        applied = []
        for m in MIGRATIONS:
            if m.version in done:
                continue
            tables = self.rows("SELECT name FROM system.tables WHERE database = currentDatabase() "
                               "AND engine NOT LIKE '%View'")
            settings = SchemaSettings(dedup_window=self.config.dedup_window,
                                      tables=frozenset(str(t) for t, in tables))
            for sql in m.statements(settings):
                self.command(sql)
            self.command(
                "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
                {"v": m.version, "n": m.name},
            )
            applied.append(m.version)
        self.apply_table_settings()
        return applied

    def apply_table_settings(self) -> None:
        """Bring TTL and the dedup window in line with the config; ALTER only what differs."""
        for table in RAW_TABLES + ROLLUP_TABLES:
            current = self.table_ttl(table)
            want = self.wanted_ttl(table)
            if current != want:
                # Existing rows are checked at the next merge rather than by a mutation now.
                self.command(
                    f"ALTER TABLE {table} REMOVE TTL"
                    if want is None
                    else f"ALTER TABLE {table} MODIFY TTL {want} SETTINGS materialize_ttl_after_modify = 0"
                )
            if self.table_setting(table, "non_replicated_deduplication_window") != str(
                self.config.dedup_window
            ):
                self.command(
                    f"ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = "
                    f"{self.config.dedup_window}"
                )

    def wanted_ttl(self, table: str) -> str | None:
        """The TTL clause the config asks for (as ClickHouse prints it back), None for none."""
        raw, rollup = self.config.retention_days, self.config.rollup_retention_days
        if table in RAW_TABLES:
            return f"toDateTime(Timestamp) + toIntervalDay({raw})" if raw else None
        # rollups: the ledger rows live as long as the events they describe
        parts = [f"toDateTime(bucket) + toIntervalDay({days}) WHERE kind {op} '{LEDGER_KIND}'"
                 for days, op in ((raw, "="), (rollup, "!=")) if days]
        return ", ".join(parts) or None

    def _engine_full(self, table: str) -> str:
        rows = self.rows(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": table},
        )
        if not rows:
            raise StoreError(f"table {table} does not exist in {self.config.database}")
        return str(rows[0][0])

    def table_ttl(self, table: str) -> str | None:
        m = re.search(r"\bTTL (.+?)(?: SETTINGS |$)", self._engine_full(table))
        return m.group(1).strip() if m else None

    def table_setting(self, table: str, name: str) -> str | None:
        m = re.search(rf"\b{name} = (\w+)", self._engine_full(table))
        return m.group(1) if m else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self._lock_key is not None:
            unlock_directory(self._lock_key)
            self._lock_key = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(config: StoreConfig, database: str | None) -> Client:
    if config.path is not None:
        return clickhouse_connect.get_client(
            interface="chdb", path=str(config.path), database=database, settings=config.settings
        )
    assert config.url is not None
    parts = urlsplit(config.url)
    # The database comes separately: it may not exist yet when the URL names it.
    base = parts._replace(path="/").geturl()
    return clickhouse_connect.get_client(dsn=base, database=database, settings=config.settings)


def open_store(config: StoreConfig, *, migrate: bool = True) -> Store:
    """Connect, create the database if needed and (by default) apply pending migrations."""
    lock_key = lock_directory(config.path) if config.path is not None else None
    try:
        with translate_errors(f"cannot open ClickHouse at {config.path or _redact(config.url)}"):
            bootstrap = _connect(config, None)
            try:
                bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {config.database}")
            finally:
                bootstrap.close()
            client = _connect(config, config.database)
        store = Store(config, client, lock_key)
    except BaseException:
        if lock_key is not None:
            unlock_directory(lock_key)
        raise
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


def _redact(url: str | None) -> str:
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return parts.geturl()
