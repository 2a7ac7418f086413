"""Publish control records to Kafka with aiokafka: deltas, tombstones and full snapshots."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from enforcer.control import (
    SNAPSHOT_KEY,
    ControlRecord,
    ControlTopics,
    SnapshotMarker,
    encode,
    encode_key,
)
from enforcer.errors import ArmorstreamError

__all__ = ["PublishError", "Publisher"]

log = logging.getLogger("armorstream.controller")


class PublishError(ArmorstreamError):
    """The broker refused or could not be reached."""


@dataclass
class Publisher:
    """Keyed control records onto the control topics (one partition each, so markers stay in order).

    one_record_per_batch waits for each record before sending the next: tansu reports
    wrong end offsets after a multi-record batch, which breaks consumers that read up to
    the end offset; real Kafka does not need it.
    """

    bootstrap: str
    topics: ControlTopics = field(default_factory=ControlTopics)
    one_record_per_batch: bool = False
    replication_factor: int = 1
    sent: int = 0
    snapshots: int = 0
    _producer: AIOKafkaProducer | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> None:
        await self.ensure_topics()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, compression_type=None,
            enable_idempotence=False)  # tansu has no InitProducerId
        try:
            await self._producer.start()
        except KafkaError as e:
            self._producer = None
            raise PublishError(f"cannot reach the broker at {self.bootstrap}: {e}") from e

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            await admin.start()
        except KafkaError as e:
            raise PublishError(f"cannot reach the broker at {self.bootstrap}: {e}") from e
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(t, num_partitions=1, replication_factor=self.replication_factor,
                            topic_configs={"cleanup.policy": "compact"})
                   for t in self.topics.all() if t not in existing]
            if new:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(new)
        finally:
            await admin.close()

    async def _send(self, items: Iterable[tuple[str, str, bytes | None]]) -> int:
        assert self._producer is not None, "start() first"
        futures = []
        n = 0
        try:
            for topic, key, value in items:
                if self.one_record_per_batch:
                    await self._producer.send_and_wait(topic, key=encode_key(key), value=value)
                else:
                    futures.append(await self._producer.send(topic, key=encode_key(key), value=value))
                n += 1
            for f in futures:
                await f
        except KafkaError as e:
            raise PublishError(f"publishing control records failed: {e}") from e
        self.sent += n
        return n

    async def publish(self, changes: Iterable[tuple[str, str, ControlRecord | None]]) -> int:
        """Deltas from ClusterState.apply: (table, key, record or None for a tombstone)."""
        return await self._send(
            (getattr(self.topics, table), key, encode(rec)) for table, key, rec in changes)

    async def snapshot(self, tables: Mapping[str, Mapping[str, ControlRecord]]) -> str:
        """Every table in full, framed by begin/end markers with one snapshot id."""
        sid = f"{time.time_ns()}-{next(self._ids)}"

        def items() -> Iterable[tuple[str, str, bytes | None]]:
            for table, rows in tables.items():
                topic = getattr(self.topics, table)
                yield topic, SNAPSHOT_KEY, encode(SnapshotMarker(sid, "begin"))
                for key in sorted(rows):
                    yield topic, key, encode(rows[key])
                yield topic, SNAPSHOT_KEY, encode(SnapshotMarker(sid, "end", len(rows)))

        await self._send(items())
        self.snapshots += 1
        log.info("published snapshot %s: %s", sid, ", ".join(f"{t}={len(r)}" for t, r in tables.items()))
        return sid
