"""The Faust application and the worker's settings (the bottom of stream's Faust layers).

app.py <- topics.py <- agents.py: each module imports only the ones before it.
The app is built by `make_app(settings)` rather than at import time because the
broker, topic names and partitions come from the `armorstream stream` command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

__all__ = ["StreamSettings", "make_app"]


@dataclass(frozen=True)
class StreamSettings:
    broker: str = "127.0.0.1:9092"  # bootstrap host:port
    app_id: str = "armorstream-stream"
    raw_topic: str = "armorstream.raw"
    alerts_topic: str = "alerts"
    logs_topic: str = "logs"
    dead_letter_topic: str = "armorstream.raw.dlq"
    control_prefix: str = "armorstream."
    partitions: int = 4  # raw topic partitions (the unit of sharing between workers)
    siem_partitions: int = 4
    create_topics: bool = True
    cluster: str = "default"
    # batching: raw messages taken per agent step, and how long to wait for them
    take_max: int = 32  # same rate as 64 here, ~100 MiB less peak RSS (bench/stream_throughput.py)
    take_within_s: float = 0.05
    fetch_max_bytes: int = 16 * 1024 * 1024  # per partition
    # Faust waits 1.5 s per fetch at the log end; tansu holds every such fetch that long
    # (stream.agents.shorten_fetch_wait). None keeps Faust's value.
    fetch_max_wait_ms: int | None = 100
    # SIEM and dead-letter producer batches. zstd (Kafka >= 2.1) cuts the broker's bytes
    # for Log JSON several-fold, tansu's CPU here ~5x; aiokafka's lz4 is LZ4HC (level 9),
    # 5x slower to make than zstd-3 (bench/stream_throughput.py). None: uncompressed.
    siem_compression: str | None = "zstd"
    # A SIEM producer batch as sent (compressed), below Kafka's default message.max.bytes
    # (1,048,588): a step's Logs go in a few such batches (stream.recordbatch.Batcher).
    siem_batch_bytes: int = 1_000_000
    # Re-delivered raw batches the store already holds are not sent to the SIEM topics again
    # (StreamRuntime.stored); True sends them anyway (a deliberate replay under a new group).
    resend_stored: bool = False
    # Exactly once on the SIEM topics: where each raw partition's unstored sends begin (marks,
    # in ClickHouse, at most every mark_interval_s) and, after a crash, how far back the SIEM
    # partitions are read at most when a raw partition has no mark (StreamRuntime.stored).
    mark_interval_s: float = 1.0
    siem_scan_max: int = 1_000_000
    max_inflight: int = 2  # steps being delivered while the next is processed (back-pressure bound)
    # late metadata
    late_wait_s: float = 5.0
    late_max_events: int = 200_000
    # KubeArmor alert throttling
    throttle: bool = True
    max_alerts_per_sec: int = 10
    throttle_s: int = 30
    # ClickHouse target: None (no history), "chdb:DIR", or an http(s):// URL
    clickhouse: str | None = None
    # tansu cannot do idempotent producers (InitProducerId); real Kafka can
    idempotent_producer: bool = False
    session_timeout_s: float = 2.0
    produce_timeout_s: float = 60.0  # a producer batch not queued within this fails the step
    stop_timeout_s: float = 10.0  # at shutdown, wait this long for steps being delivered
    control_catchup_s: float = 5.0  # at start, raw batches wait at most this long for the control topics


def make_app(s: StreamSettings) -> faust.App:
    return faust.App(
        s.app_id,
        broker=f"kafka://{s.broker}",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=s.partitions,
        topic_allow_declare=False,  # topics are created beforehand with the right partition counts
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=min(1.0, s.session_timeout_s / 4),
        broker_rebalance_timeout=max(1.0, s.session_timeout_s),
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=-1,
        # No tables: control state is plain dicts rebuilt from the control topics, so the
        # changelog recovery that tansu's end offsets break is never needed.
        table_standby_replicas=0,
        stream_wait_empty=False,
        # Raw messages are envelopes of ~1000 records (hundreds of KiB): fetch many at once.
        consumer_max_fetch_size=s.fetch_max_bytes,
        stream_buffer_maxsize=max(64, 2 * s.take_max),
    )
