"""`armorstream sensor`: the node agent. Kernel monitors -> batch envelopes -> the raw Kafka topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

import click

from enforcer.errors import ArmorstreamError
from enforcer.records import Visibility


def parse_visibility(text: str, option: str) -> Visibility:
    from sensor.agent import AgentError
    from sensor.agent import parse_visibility as parse

    try:  # the agent owns the spelling, shared with the kubearmor-visibility annotation
        return parse(text)
    except AgentError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


@click.command("sensor")
@click.option("--broker", default="127.0.0.1:9092", show_default=True, envvar="ARMORSTREAM_BROKER",
              help="Kafka bootstrap servers.")
@click.option("--node-name", default=None, help="This node's name (default: the host name).")
@click.option("--topic", default=None, help="Raw event topic (default: armorstream.raw).")
@click.option("--visibility", default="process,file,network,capabilities", show_default=True,
              help="What to report for watched containers: process,file,network,capabilities or none.")
@click.option("--host-visibility", default="none", show_default=True,
              help="What to report for host processes (same words).")
@click.option("--watch-cgroup", "watch_cgroups", multiple=True, type=click.Path(path_type=Path),
              help="Watch this cgroup (absolute, or relative to the cgroup2 mount); repeatable. "
                   "Default: every kubelet/containerd/CRI-O/Docker container found in the cgroup tree.")
@click.option("--namespace-visibility/--no-namespace-visibility", default=True, show_default=True,
              help="Follow the control topics: a namespace's kubearmor-visibility annotation overrides "
                   "--visibility for its containers.")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/armorstream/spool"), show_default=True,
              help="Where batches wait while the broker is unreachable.")
@click.option("--spool-max-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Spool bound; batches beyond it are dropped and counted.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus /metrics on this port (0: any free port).")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True)
@click.option("--poll-interval", type=click.FloatRange(min=0.001), default=0.05, show_default=True,
              help="Seconds between ring-buffer drains (sooner when a ring fills).")
@click.option("--refresh-interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between re-walks of the cgroup tree for new and gone containers.")
@click.option("--pin-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/sys/fs/bpf/armorstream"), show_default=True,
              help="bpffs directory for pinned maps (state survives a restart).")
@click.option("--ring-mb", type=click.IntRange(min=1), default=None,
              help="Ring buffer size per monitor, MiB (a power of 2; default: as compiled).")
@click.option("--runtime", type=click.Choice(["containerd", "cri-o", "docker"]), default=None,
              help="Runtime for cgroup paths that do not name one (default: detected from its socket).")
@click.option("--compression", default="auto", show_default=True,
              help="Kafka compression: auto, zstd, lz4, snappy, gzip or none.")
@click.option("--enforce/--no-enforce", default=True, show_default=True,
              help="Enforce the policies bound to the watched cgroups (control topics; kept in --state-dir).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local copy of the control tables, so enforcement survives restarts without the broker "
                   "(default: beside the spool directory, in enforce/).")
@click.option("-v", "--verbose", is_flag=True)
def sensor(broker: str, node_name: str | None, topic: str | None, visibility: str, host_visibility: str,
           watch_cgroups: tuple[Path, ...], namespace_visibility: bool, spool_dir: Path, spool_max_mb: int,
           metrics_port: int | None, metrics_addr: str, poll_interval: float, refresh_interval: float,
           pin_dir: Path, ring_mb: int | None, runtime: str | None, compression: str, enforce: bool,
           state_dir: Path | None, verbose: bool) -> None:
    """Run the kernel sensor on this node (as root).

    Loads the BPF monitors for the visibility asked for, watches container cgroups,
    drains the ring buffers in batches and ships them to the raw topic, keyed by
    cgroup so one container's events stay in order. While the broker is away batches
    go to the spool and are replayed in order when it returns. SIGINT/SIGTERM drain
    the rings, flush and exit.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not verbose:
        # aiokafka logs every refused connection at ERROR; the shipper reports the broker's state.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        from sensor.agent import Agent, AgentConfig
        from sensor.shipper import RAW_TOPIC

        vis = parse_visibility(visibility, "--visibility")
        host_vis = parse_visibility(host_visibility, "--host-visibility")

        config = AgentConfig(
            broker=broker, node=node_name or socket.gethostname(), spool_dir=spool_dir,
            topic=topic or RAW_TOPIC, visibility=vis, host_visibility=host_vis,
            watch_cgroups=tuple(watch_cgroups), spool_max_bytes=spool_max_mb << 20,
            metrics_port=metrics_port, metrics_addr=metrics_addr, poll_interval_s=poll_interval,
            refresh_interval_s=refresh_interval, pin_dir=pin_dir,
            ring_bytes=ring_mb << 20 if ring_mb else None, runtime=runtime, compression=compression,
            namespace_visibility=namespace_visibility, enforce=enforce, state_dir=state_dir,
        )  # fmt: skip
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # libbpf.so.1 missing: the import of sensor.libbpf fails
        raise click.ClickException(f"cannot load the BPF library: {e}") from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        agent = Agent(config)
        report = await agent.start()
        try:
            for line in [*report.lines(), *agent.enforcement_notes]:
                click.echo(line)
            click.echo("ready", err=True)  # tests and supervisors wait for this line
            await agent.run(stop)
        finally:
            await agent.stop()
        c = agent.metrics.counters
        click.echo(f"stopped: {c.events_seen} events seen, {c.events_shipped} shipped, "
                   f"{c.events_spooled} spooled, {c.events_dropped_kernel} dropped in the kernel, "
                   f"{c.events_dropped_user} dropped in user space", err=True)  # fmt: skip

    try:
        asyncio.run(main())
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from None
