"""`armorstream stream`: run one stream worker (several share the raw topic through the consumer group)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from typing import Any

import click

from enforcer.errors import ArmorstreamError

__all__ = ["stream"]


@click.command("stream")
@click.option("--broker", "-b", default="127.0.0.1:9092", show_default=True, envvar="ARMORSTREAM_BROKER",
              help="Kafka bootstrap host:port.")
@click.option("--clickhouse", default=None, envvar="CLICKHOUSE_URL",
              help="History store: chdb:DIR or an http(s):// URL (default: none).")
@click.option("--raw-topic", default="armorstream.raw", show_default=True)
@click.option("--alerts-topic", default="alerts", show_default=True)
@click.option("--logs-topic", default="logs", show_default=True)
@click.option("--dead-letter-topic", default="armorstream.raw.dlq", show_default=True)
@click.option("--control-prefix", default="armorstream.", show_default=True,
              help="Prefix of the control topics (enforcer.control).")
@click.option("--partitions", default=4, show_default=True, type=click.IntRange(1),
              help="Partitions of the raw topic (created with this count if missing).")
@click.option("--siem-partitions", default=4, show_default=True, type=click.IntRange(1))
@click.option("--no-create-topics", is_flag=True, help="Topics exist already; do not create them.")
@click.option("--app-id", default="armorstream-stream", show_default=True, help="Consumer group.")
@click.option("--cluster", default="default", show_default=True, help="ClusterName in alerts and logs.")
@click.option("--late-wait", default=5.0, show_default=True, type=click.FloatRange(0),
              help="Seconds events of an unknown container wait for its metadata.")
@click.option("--late-max-events", default=200_000, show_default=True, type=click.IntRange(0))
@click.option("--max-alerts-per-sec", default=10, show_default=True, type=click.IntRange(1),
              help="Per container, as KubeArmor's maxAlertPerSec.")
@click.option("--throttle-sec", default=30, show_default=True, type=click.IntRange(0))
@click.option("--no-throttle", is_flag=True, help="Send every alert.")
@click.option("--take-max", default=32, show_default=True, type=click.IntRange(1),
              help="Raw messages (batches) processed per step.")
@click.option("--idempotent-producer", is_flag=True,
              help="Use Kafka's idempotent producer (real Kafka only: tansu lacks InitProducerId).")
@click.option("--siem-compression", default="zstd", show_default=True,
              type=click.Choice(["zstd", "lz4", "snappy", "gzip", "none"]),
              help="Codec of the alerts, logs and dead-letter producer (aiokafka's lz4 is LZ4HC: slow).")
@click.option("--resend-stored", is_flag=True,
              help="Send Alerts and Logs of raw batches ClickHouse already holds (a replay under a new "
                   "--app-id); by default a re-delivery after a crash is not sent twice.")
@click.option("--shutdown-timeout", default=20.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a stop signal may take; then the worker exits anyway (unacked batches are "
                   "redelivered and deduplicated), e.g. when the broker is gone.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics (counters, steps in flight) on this port (0: any free port); "
                   "also the pod's probe.")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True)
@click.option("--log-level", default="warn", show_default=True,
              type=click.Choice(["crit", "error", "warn", "info", "debug"]))
def stream(broker: str, clickhouse: str | None, raw_topic: str, alerts_topic: str, logs_topic: str,
           dead_letter_topic: str, control_prefix: str, partitions: int, siem_partitions: int,
           no_create_topics: bool, app_id: str, cluster: str, late_wait: float, late_max_events: int,
           max_alerts_per_sec: int, throttle_sec: int, no_throttle: bool, take_max: int,
           idempotent_producer: bool, siem_compression: str, resend_stored: bool, shutdown_timeout: float,
           metrics_port: int | None, metrics_addr: str, log_level: str) -> None:
    """Turn raw sensor batches into KubeArmor alerts and logs on Kafka (and history in ClickHouse)."""
    import faust

    from stream.agents import build
    from stream.app import StreamSettings
    from stream.topics import ensure_topics

    settings = StreamSettings(
        broker=broker, app_id=app_id, raw_topic=raw_topic, alerts_topic=alerts_topic, logs_topic=logs_topic,
        dead_letter_topic=dead_letter_topic, control_prefix=control_prefix, partitions=partitions,
        siem_partitions=siem_partitions, create_topics=not no_create_topics, cluster=cluster,
        take_max=take_max, late_wait_s=late_wait, late_max_events=late_max_events, throttle=not no_throttle,
        max_alerts_per_sec=max_alerts_per_sec, throttle_s=throttle_sec, clickhouse=clickhouse,
        idempotent_producer=idempotent_producer,
        siem_compression=None if siem_compression == "none" else siem_compression,
        resend_stored=resend_stored,
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if settings.create_topics:
            loop.run_until_complete(asyncio.wait_for(ensure_topics(settings), 30))
        app, runtime = build(settings)
    except (ArmorstreamError, TimeoutError) as e:
        loop.close()
        raise click.ClickException(f"cannot start the stream worker: {e or 'broker did not answer'}") from e
    if metrics_port is not None:
        from stream.metrics import StreamMetrics

        metrics = StreamMetrics(runtime)
        try:
            metrics.serve(metrics_port, metrics_addr)
        except OSError as e:
            loop.close()
            raise click.ClickException(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {e}") from e
        click.echo(f"metrics: http://{metrics_addr}:{metrics.port}/metrics", err=True)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # Every step allocates ~100k container objects (records, tuples); with CPython's default
    # threshold (700) the collector ran ~900 times per 600k events and rescanned the verdict
    # cache and Faust's objects in gen 1/2: 0.35 s of the worker's 3.8 CPU-s. Start-up objects
    # go to the permanent generation, young ones are collected every 50k: 0.14 s.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    worker = _worker_class(faust.Worker, shutdown_timeout)(
        app, runtime, loop=loop, loglevel=log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def _worker_class(base: type[Any], timeout: float) -> type[Any]:
    """Faust's worker, with a deadline on shutdown.

    Faust's graceful stop waits on the broker (commit, leave group); with the broker gone it
    waits forever and a supervisor's SIGTERM never ends the process. Offsets are committed
    only after delivery, so exiting unclean loses nothing: the batches are redelivered.
    """

    class Worker(base):  # type: ignore[misc]
        def _schedule_shutdown(self, signum: signal.Signals) -> None:
            def expire() -> None:
                logging.getLogger(__name__).warning(
                    "shutdown took more than %.0fs (broker unreachable?): exiting; unacked batches "
                    "will be redelivered", timeout)
                os._exit(1)

            t = threading.Timer(timeout, expire)
            t.daemon = True
            t.start()
            super()._schedule_shutdown(signum)

    return Worker
